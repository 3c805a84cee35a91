#!/usr/bin/env bash
# Make a Debian base image for deploy/Dockerfile where no registry image (python:3.11-slim) can be pulled:
# `debootstrap --variant=minbase` of Debian bookworm from Debian's own package mirror, with Debian's Python
# (3.11 in bookworm, the version python:3.11-slim has), imported into the engine as one layer.
# Cached by its inputs: the tag is a hash of this script, the suite, the mirror and the package list, so a
# second call finds the image and returns at once; a change to any input makes a new one.
# Usage: deploy/ensure-base-image.sh ENGINE-WORDS...   (e.g. `podman --runtime /usr/sbin/runc`)
# Prints the image name (messages go to stderr).
set -euo pipefail
say() { printf 'ensure-base-image: %s\n' "$*" >&2; }
(( $# )) || { say "usage: $0 ENGINE [ENGINE ARGS...]"; exit 2; }
ENGINE=("$@")

SUITE=${TOKENSFORGE_BASE_SUITE:-bookworm}
MIRROR=${TOKENSFORGE_BASE_MIRROR:-http://deb.debian.org/debian}
# python3-venv: the Dockerfile's build stage makes a venv; ca-certificates: pip and the gateway's HTTPS
# upstreams verify TLS; netbase: /etc/services and /etc/protocols, as in python:3.11-slim.
PACKAGES=python3,python3-venv,ca-certificates,netbase

KEY=$( { cat "$0"; echo "$SUITE $MIRROR $PACKAGES"; } | sha256sum | cut -c1-12)
NAME=localhost/tokensforge-base:$SUITE-$KEY

if "${ENGINE[@]}" image inspect "$NAME" >/dev/null 2>&1; then
    echo "$NAME"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { say "debootstrap not found and apt-get unavailable"; exit 1; }
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { say "need root or sudo for debootstrap"; exit 1; }
        SUDO="sudo"
    fi
    say "installing Debian's debootstrap package"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >&2
fi
[[ $(id -u) -eq 0 ]] || { say "debootstrap needs root (it creates device nodes and chroots)"; exit 1; }

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/tokensforge-base.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
start=$SECONDS
say "debootstrap --variant=minbase $SUITE (+ $PACKAGES) from $MIRROR into $ROOTFS"
LOG=$(mktemp "${TMPDIR:-/tmp}/tokensforge-base.log.XXXXXX")
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2; rm -f "$LOG"; say "debootstrap failed"; exit 1
fi
rm -f "$LOG"
# what a published base leaves out: package caches and lists, docs and man pages
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log
# python:3.11-slim has `python`; the Dockerfile's build stage calls python3, but keep the name familiar
ln -sf python3 "$ROOTFS"/usr/bin/python
tar --numeric-owner -C "$ROOTFS" -c . | "${ENGINE[@]}" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$NAME" >/dev/null
say "made $NAME in $((SECONDS - start)) s"
# bases made from older inputs are not used any more: untag them (layers an image still uses stay)
"${ENGINE[@]}" images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null \
    | grep -E '^(localhost/)?tokensforge-base:' | grep -vxF "$NAME" \
    | while read -r old; do "${ENGINE[@]}" rmi "$old" >/dev/null 2>&1 || true; done
echo "$NAME"
