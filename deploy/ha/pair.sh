#!/usr/bin/env bash
# A PostgreSQL primary and a synchronous streaming standby on loopback, without a failover manager:
# what the failover tests drive by hand (kill the primary, `pg_ctl promote` the standby), and the
# manual fallback where pg_auto_failover cannot run (README "High availability").
#
#   deploy/ha/pair.sh start DIR PRIMARY_PORT STANDBY_PORT   # initdb, base backup, both running; prints the URLs
#   deploy/ha/pair.sh kill-primary DIR                       # pg_ctl stop -m immediate (a crash)
#   deploy/ha/pair.sh promote DIR                            # pg_ctl promote the standby (waits until it is)
#   deploy/ha/pair.sh stop DIR                               # stop both (fast), keep DIR
#
# The standby replicates synchronously (synchronous_standby_names = 'standby', synchronous_commit on,
# set on the primary only after the standby streams, so the promoted standby does not wait for a
# standby of its own). Servers run as the `postgres` account when started as root (PostgreSQL refuses
# root). TF_HA_FSYNC=on makes them durable across an OS crash (off by default: tests only crash servers).
set -euo pipefail

say() { printf 'pair: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

bindir="${TOKENSFORGE_PG_BINDIR:-$("$(dirname "$0")/../ensure-postgres.sh")}"
as_pg() {
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
ctl() { as_pg "$bindir/pg_ctl" "$@"; }

start() {
    local dir="$1" p1="$2" p2="$3"
    mkdir -p "$dir"
    [[ "$(id -u)" == 0 ]] && chown postgres "$dir"
    local primary="$dir/primary" standby="$dir/standby"
    local opts="-c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c fsync=${TF_HA_FSYNC:-off}"
    opts+=" -c max_connections=200 -c shared_buffers=64MB -c wal_level=replica -c max_wal_senders=5"
    opts+=" -c hot_standby=on -c hot_standby_feedback=on -c wal_receiver_status_interval=1"
    if [[ ! -d "$primary" ]]; then
        as_pg "$bindir/initdb" -D "$primary" -U tokensforge --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
            || die "initdb failed: $(tail -5 "$dir/initdb.log")"
    fi
    ctl start -w -D "$primary" -l "$dir/primary.log" -o "-p $p1 $opts" >/dev/null \
        || die "primary did not start: $(tail -5 "$dir/primary.log")"
    as_pg "$bindir/psql" -h 127.0.0.1 -p "$p1" -U tokensforge -d postgres -qAt \
        -c "SELECT 1 FROM pg_database WHERE datname = 'tokensforge'" | grep -q 1 \
        || as_pg "$bindir/createdb" -h 127.0.0.1 -p "$p1" -U tokensforge tokensforge
    if [[ ! -d "$standby" ]]; then
        as_pg "$bindir/pg_basebackup" -h 127.0.0.1 -p "$p1" -U tokensforge -D "$standby" -X stream -c fast --no-sync \
            >"$dir/basebackup.log" 2>&1 || die "pg_basebackup failed: $(tail -5 "$dir/basebackup.log")"
        as_pg touch "$standby/standby.signal"
        printf "primary_conninfo = 'host=127.0.0.1 port=%s user=tokensforge application_name=standby'\n" "$p1" \
            | as_pg tee -a "$standby/postgresql.auto.conf" >/dev/null
    fi
    ctl start -w -D "$standby" -l "$dir/standby.log" -o "-p $p2 $opts" >/dev/null \
        || die "standby did not start: $(tail -5 "$dir/standby.log")"
    local psql=(as_pg "$bindir/psql" -h 127.0.0.1 -p "$p1" -U tokensforge -d postgres -qAt)
    for _ in $(seq 100); do
        [[ "$("${psql[@]}" -c "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'standby'
                                AND state = 'streaming'")" == 1 ]] && break
        sleep 0.1
    done
    "${psql[@]}" -c "ALTER SYSTEM SET synchronous_standby_names = 'standby'" -c "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 100); do
        [[ "$("${psql[@]}" -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'")" \
            == sync ]] && break
        sleep 0.1
    done
    [[ "$("${psql[@]}" -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'")" == sync ]] \
        || die "the standby is not synchronous: $(tail -5 "$dir/standby.log")"
    echo "$p1" >"$dir/primary.port"
    echo "$p2" >"$dir/standby.port"
    echo "TOKENSFORGE_DATABASE_URL=postgresql://tokensforge@127.0.0.1:$p1,127.0.0.1:$p2/tokensforge?target_session_attrs=read-write"
    echo "TOKENSFORGE_READ_DATABASE_URL=postgresql://tokensforge@127.0.0.1:$p2/tokensforge"
}

case "${1:-}" in
    start) [[ $# == 4 ]] || die "usage: $0 start DIR PRIMARY_PORT STANDBY_PORT"; start "$2" "$3" "$4" ;;
    kill-primary) ctl stop -D "$2/primary" -m immediate -w >/dev/null ;;
    promote) ctl promote -D "$2/standby" -w >/dev/null ;;
    stop)
        for node in standby primary; do
            if [[ -f "$2/$node/postmaster.pid" ]]; then ctl stop -D "$2/$node" -m fast -w >/dev/null || true; fi
        done ;;
    *) die "usage: $0 start|kill-primary|promote|stop DIR ..." ;;
esac
