#!/usr/bin/env bash
# Print the container engine to build and run the image with, as the words to start its commands with:
#   `docker`                when a Docker daemon answers (`docker info`), else
#   `podman --runtime runc` Debian's podman, installed with runc from Debian's packages when missing.
# Why runc: crun fails on hosts whose cgroups are in hybrid mode ("cgroups in hybrid mode not supported"),
# runc does not. The other podman quirks of such hosts are flags of `build`/`run`, not of the engine:
# see deploy/build-image.sh and README "Deploying". Messages go to stderr; quiet when all is there.
set -euo pipefail
say() { printf 'ensure-podman: %s\n' "$*" >&2; }

if [[ ${TOKENSFORGE_ENGINE:-} == docker ]] || { [[ -z ${TOKENSFORGE_ENGINE:-} ]] && command -v docker >/dev/null 2>&1 \
        && timeout 10 docker info >/dev/null 2>&1; }; then
    echo docker
    exit 0
fi

if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { say "no Docker daemon, no podman, and apt-get unavailable; install one"; exit 1; }
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { say "need root or sudo to apt-get install podman"; exit 1; }
        SUDO="sudo"
    fi
    # debootstrap too (deploy/ensure-base-image.sh needs it where no registry answers): one apt-get update
    say "installing Debian's podman, runc and debootstrap packages"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends podman runc debootstrap >&2
fi
command -v podman >/dev/null 2>&1 || { say "podman still not found after installing it"; exit 1; }
echo "podman --runtime $(command -v runc)"
