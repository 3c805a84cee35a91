#!/usr/bin/env bash
# A pg_auto_failover formation on loopback: a monitor and two data nodes (a primary and a synchronous
# standby), from Debian's postgresql-<major>-auto-failover (deploy/ensure-auto-failover.sh installs it).
#
#   deploy/ha/autofailover.sh start [DIR] [BASE_PORT]  # monitor on BASE_PORT (6000), nodes on +1 and +2;
#                                                      # waits for primary + secondary; prints the gateway URLs
#   deploy/ha/autofailover.sh state [DIR]              # pg_autoctl show state
#   deploy/ha/autofailover.sh failover [DIR]           # pg_autoctl perform failover (a planned switchover)
#   deploy/ha/autofailover.sh kill-primary [DIR]       # SIGKILL the primary node (keeper and postgres): the
#                                                      # monitor fails over once it finds the node unhealthy
#   deploy/ha/autofailover.sh ctl [DIR] ARGS...        # any pg_autoctl command against the monitor
#   deploy/ha/autofailover.sh stop [DIR]               # stop every node (keeps DIR; start again resumes)
#
# DIR defaults to /tmp/tokensforge-ha (the `postgres` account must reach it: PostgreSQL and
# pg_autoctl refuse to run as root, so as root everything runs as `postgres`). pg_autoctl's own
# config and state live in DIR too (XDG_*), so nothing lands in the account's home.
# The monitor is tuned to act within seconds (health checks every second, a node unhealthy after
# TF_HA_UNHEALTHY_MS, 3000 by default; pg_auto_failover's defaults take ~20-30 s).
set -euo pipefail

say() { printf 'autofailover: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"; shift || true
dir="${1:-/tmp/tokensforge-ha}"; [[ $# -gt 0 ]] && shift
bindir="${TOKENSFORGE_PG_BINDIR:-$("$here/../ensure-postgres.sh" 2>/dev/null)}"
"$here/../ensure-auto-failover.sh" >/dev/null

as_pg() {
    local envs=(PATH="$bindir:$PATH" HOME="$dir" XDG_CONFIG_HOME="$dir/xdg/config" XDG_DATA_HOME="$dir/xdg/data"
                XDG_RUNTIME_DIR="$dir/xdg/run")
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- env "${envs[@]}" "$@"; else env "${envs[@]}" "$@"; fi
}
autoctl() { as_pg pg_autoctl "$@"; }
port_of() { cat "$dir/$1.port"; }
sql() { as_pg psql -h 127.0.0.1 -p "$1" -U postgres -d "${3:-postgres}" -qAtX -c "$2"; }

run_node() {  # NAME ARGS...: `pg_autoctl create ... --run` in the background, its own process group
    local name="$1"; shift
    if [[ "$(id -u)" == 0 ]]; then
        setsid runuser -u postgres -- env PATH="$bindir:$PATH" HOME="$dir" XDG_CONFIG_HOME="$dir/xdg/config" \
            XDG_DATA_HOME="$dir/xdg/data" XDG_RUNTIME_DIR="$dir/xdg/run" pg_autoctl "$@" \
            >>"$dir/$name.log" 2>&1 </dev/null &
    else
        setsid env HOME="$dir" XDG_CONFIG_HOME="$dir/xdg/config" XDG_DATA_HOME="$dir/xdg/data" \
            XDG_RUNTIME_DIR="$dir/xdg/run" pg_autoctl "$@" >>"$dir/$name.log" 2>&1 </dev/null &
    fi
    echo $! >"$dir/$name.pid"
}

running() { [[ -f "$dir/$1.pid" ]] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

wait_for() {  # SECONDS DESCRIPTION COMMAND...
    local limit="$1" what="$2"; shift 2
    local until=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < until )) || die "$what not reached in ${limit} s (logs in $dir)"
        sleep 0.5
    done
}

primary_port() {
    local node
    for node in node1 node2; do
        [[ "$(sql "$(port_of "$node")" "SELECT pg_is_in_recovery()" 2>/dev/null)" == f ]] && { port_of "$node"; return 0; }
    done
    return 1
}

formation_ready() {  # a primary and a synchronous secondary; nudges the base backup's checkpoint along
    local p
    p="$(primary_port)" || return 1
    sql "$p" "CHECKPOINT" >/dev/null 2>&1 || true
    [[ "$(sql "$p" "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')")" == 1 ]]
}

start() {
    local base="${1:-6000}"
    mkdir -p "$dir/xdg/config" "$dir/xdg/data" "$dir/xdg/run"
    [[ "$(id -u)" == 0 ]] && chown -R postgres "$dir"
    chmod 700 "$dir/xdg/run"
    [[ -f "$dir/monitor.port" ]] || { echo "$base" >"$dir/monitor.port"; echo $((base + 1)) >"$dir/node1.port"
                                      echo $((base + 2)) >"$dir/node2.port"; }
    local common=(--auth trust --no-ssl --hostname 127.0.0.1 --pgctl "$bindir/pg_ctl")
    if running monitor; then :
    elif [[ -f "$dir/monitor/PG_VERSION" ]]; then run_node monitor run --pgdata "$dir/monitor"
    else run_node monitor create monitor --pgdata "$dir/monitor" --pgport "$(port_of monitor)" "${common[@]}" --run
    fi
    wait_for 60 "the monitor" sql "$(port_of monitor)" "SELECT 1 FROM pgautofailover.node LIMIT 0" pg_auto_failover
    echo "postgres://autoctl_node@127.0.0.1:$(port_of monitor)/pg_auto_failover?sslmode=disable" >"$dir/monitor.uri"
    local unhealthy="${TF_HA_UNHEALTHY_MS:-3000}"
    sql "$(port_of monitor)" "ALTER SYSTEM SET pgautofailover.health_check_period = 1000" >/dev/null
    sql "$(port_of monitor)" "ALTER SYSTEM SET pgautofailover.health_check_timeout = 1000" >/dev/null
    sql "$(port_of monitor)" "ALTER SYSTEM SET pgautofailover.health_check_max_retries = 1" >/dev/null
    sql "$(port_of monitor)" "ALTER SYSTEM SET pgautofailover.health_check_retry_delay = 500" >/dev/null
    sql "$(port_of monitor)" "ALTER SYSTEM SET pgautofailover.node_considered_unhealthy_timeout = $unhealthy" >/dev/null
    # how long a failover waits for the lost primary to have demoted itself before the standby takes writes
    # (pg_auto_failover's default, 30 s, guards against two primaries when the old one is only cut off)
    sql "$(port_of monitor)" "ALTER SYSTEM SET pgautofailover.primary_demote_timeout = ${TF_HA_DEMOTE_MS:-30000}" >/dev/null
    sql "$(port_of monitor)" "SELECT pg_reload_conf()" >/dev/null
    local node
    for node in node1 node2; do
        if running "$node"; then :
        elif [[ -f "$dir/$node/PG_VERSION" ]]; then run_node "$node" run --pgdata "$dir/$node"  # rejoins as it can
        else
            run_node "$node" create postgres --pgdata "$dir/$node" --pgport "$(port_of "$node")" "${common[@]}" \
                --name "$node" --dbname tokensforge --monitor "$(cat "$dir/monitor.uri")" --run
        fi
        if [[ "$node" == node1 ]]; then wait_for 90 "a primary" primary_port; fi
    done
    wait_for 180 "a primary with a synchronous standby" formation_ready
    urls
}

urls() {
    local p1 p2
    p1="$(port_of node1)"; p2="$(port_of node2)"
    echo "TOKENSFORGE_DATABASE_URL=postgresql://postgres@127.0.0.1:$p1,127.0.0.1:$p2/tokensforge?target_session_attrs=read-write"
    echo "TOKENSFORGE_READ_DATABASE_URL=postgresql://postgres@127.0.0.1:$p1,127.0.0.1:$p2/tokensforge?target_session_attrs=prefer-standby"
}

stop() {
    local node
    for node in node2 node1 monitor; do
        [[ -d "$dir/$node" ]] && autoctl stop --pgdata "$dir/$node" >/dev/null 2>&1 || true
    done
    for node in node2 node1 monitor; do
        if running "$node"; then
            for _ in $(seq 60); do running "$node" || break; sleep 0.5; done
            running "$node" && kill -KILL -- "-$(cat "$dir/$node.pid")" 2>/dev/null || true
        fi
        rm -f "$dir/$node.pid"
        # a PostgreSQL its keeper left behind (the keeper was killed): stop it too
        if [[ -f "$dir/$node/postmaster.pid" ]]; then
            as_pg "$bindir/pg_ctl" stop -D "$dir/$node" -m fast -w >/dev/null 2>&1 || true
        fi
    done
}

kill_primary() {
    local p node
    p="$(primary_port)" || die "no primary to kill"
    for node in node1 node2; do
        if [[ "$(port_of "$node")" == "$p" ]]; then
            kill -KILL -- "-$(cat "$dir/$node.pid")"
            echo "$node"
            return 0
        fi
    done
}

case "$cmd" in
    start) start "$@" ;;
    urls) urls ;;
    state) autoctl show state --pgdata "$dir/monitor" ;;
    failover) autoctl perform failover --pgdata "$dir/monitor" ;;
    kill-primary) kill_primary ;;
    ctl) autoctl "$@" ;;
    primary-port) primary_port ;;
    stop) stop ;;
    *) die "usage: $0 start|state|failover|kill-primary|ctl|urls|primary-port|stop [DIR] ..." ;;
esac
