#!/usr/bin/env bash
# `make ha`: a pg_auto_failover formation (monitor, primary, synchronous standby) on loopback and a
# gateway (demo catalog, simulated upstream, funded demo key) following it, so a person can watch a
# failover. Ctrl-C stops the gateway, then the formation (its data stays in TF_HA_DIR for next time).
#
#   deploy/ha/run.sh [PORT]       TF_HA_DIR (/tmp/tokensforge-ha), TF_HA_PORT (6000: monitor, +1, +2)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
port="${1:-8080}"
dir="${TF_HA_DIR:-/tmp/tokensforge-ha}"
base="${TF_HA_PORT:-6000}"

echo "ha: starting the pg_auto_failover formation in $dir (monitor :$base, nodes :$((base + 1)) :$((base + 2)))..."
urls="$("$here/autofailover.sh" start "$dir" "$base")"
trap 'trap "" INT TERM HUP PIPE; echo "ha: stopping the formation" >&2; "$here/autofailover.sh" stop "$dir" >/dev/null 2>&1' EXIT
while IFS='=' read -r name value; do
    [[ -n "$name" ]] && export "$name=$value"
done <<<"$urls"
"$here/autofailover.sh" state "$dir"
af="deploy/ha/autofailover.sh"
cat <<TEXT

ha: the gateway below writes to $TOKENSFORGE_DATABASE_URL
    and its views read from $TOKENSFORGE_READ_DATABASE_URL
Watch a failover from another terminal:
  who is the primary:                  $af state $dir
  a planned switchover:                $af failover $dir      (pg_autoctl perform failover)
  a crash of the primary node:         $af kill-primary $dir
      (SIGKILL; the monitor promotes the standby after pgautofailover.primary_demote_timeout,
       TF_HA_DEMOTE_MS, 30 s by default)
  bring a killed node back (standby):  $af start $dir
  what the gateway sees:               watch -n 0.5 curl -s http://127.0.0.1:$port/readyz
                                       curl -s http://127.0.0.1:$port/metrics | grep tokensforge_database_
TEXT
mkdir -p "$root/.tokensforge-ha"
"${PYTHON:-$root/.venv/bin/python}" -m tokensforge demo --port "$port" --data-dir "$root/.tokensforge-ha"
