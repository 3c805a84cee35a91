#!/usr/bin/env bash
# Make sure a `pgbouncer` binary exists (tests/test_pgbouncer.py runs two gateways through a real
# PgBouncer in transaction mode). Debian's `pgbouncer` package ships it in /usr/sbin, which is not on
# a non-root PATH, so that is searched too; installed with apt-get when missing. Prints the binary's
# path on stdout (messages go to stderr); quiet when it is already there. Exit 0 = binary found.
set -euo pipefail
say() { printf 'ensure-pgbouncer: %s\n' "$*" >&2; }

find_pgbouncer() {
    command -v pgbouncer 2>/dev/null && return 0
    [[ -x /usr/sbin/pgbouncer ]] && { echo /usr/sbin/pgbouncer; return 0; }
    return 1
}

if find_pgbouncer; then
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { say "pgbouncer not found and apt-get unavailable; install PgBouncer"; exit 1; }
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { say "need root or sudo to apt-get install pgbouncer"; exit 1; }
    SUDO="sudo"
fi
say "installing Debian's pgbouncer package"
$SUDO apt-get update -qq >&2
# the package's system service is not wanted here (tests start their own): keep it from starting
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends pgbouncer >&2
find_pgbouncer || { say "pgbouncer still not found after installing the package"; exit 1; }
