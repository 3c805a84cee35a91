#!/usr/bin/env bash
# Make sure pg_auto_failover (pg_autoctl + the pgautofailover extension) is installed for the
# PostgreSQL major version the embedded database uses; installs Debian's
# `postgresql-<major>-auto-failover` with apt-get when it is missing. Prints the pg_autoctl path.
set -euo pipefail

say() { printf 'ensure-auto-failover: %s\n' "$*" >&2; }

bindir="$("$(dirname "$0")/ensure-postgres.sh")"
major="$(basename "$(dirname "$bindir")")"
found() {  # Debian ships pg_autoctl in /usr/bin (pg-auto-failover-cli), the extension per major version
    [[ -f "$bindir/../lib/pgautofailover.so" ]] && command -v pg_autoctl
}
if found; then
    exit 0
fi
command -v apt-get >/dev/null || { say "error: no apt-get; install postgresql-$major-auto-failover by hand"; exit 1; }
sudo=""
[[ "$(id -u)" == 0 ]] || sudo="sudo"
say "installing postgresql-$major-auto-failover"
$sudo apt-get update -qq >&2 || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "postgresql-$major-auto-failover" >&2
found || { say "error: pg_autoctl or pgautofailover.so missing after the install"; exit 1; }
