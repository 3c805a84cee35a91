#!/usr/bin/env bash
# Make sure `promtool` exists (used by the tests to check deploy/prometheus/alerts.yml).
# Debian's `prometheus` package ships it; installed with apt-get when missing.
set -euo pipefail
say() { printf 'ensure-promtool: %s\n' "$*" >&2; }

if command -v promtool >/dev/null 2>&1; then
    command -v promtool
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { say "promtool not found and apt-get unavailable; install Prometheus' promtool"; exit 1; }
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { say "need root or sudo to apt-get install prometheus"; exit 1; }
    SUDO="sudo"
fi
say "installing Debian's prometheus package for promtool"
$SUDO apt-get update -qq >&2
# the package's service is not wanted here: keep it from starting
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends prometheus >&2
command -v promtool || { say "promtool still not found after installing prometheus"; exit 1; }
