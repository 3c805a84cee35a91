#!/usr/bin/env bash
# Make sure /usr/bin/chromium exists: the console's browser tests (tests/test_playground.py) drive it headless
# through Playwright with executable_path, so Playwright never downloads a browser of its own. The `playwright`
# Python package itself comes from pyproject's test extras (make venv-test).
set -euo pipefail
say() { printf 'ensure-chromium: %s\n' "$*" >&2; }
if [[ -x /usr/bin/chromium ]]; then echo /usr/bin/chromium; exit 0; fi
command -v apt-get >/dev/null 2>&1 || { say "chromium missing and apt-get unavailable"; exit 1; }
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { say "need root or sudo to apt-get install chromium"; exit 1; }
    SUDO="sudo"
fi
say "installing Debian's chromium package"
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >&2
[[ -x /usr/bin/chromium ]] || { say "chromium still missing after install"; exit 1; }
echo /usr/bin/chromium
