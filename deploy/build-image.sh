#!/usr/bin/env bash
# `make image`: build deploy/Dockerfile from the repository root with Docker or Podman, whichever this
# machine has (deploy/ensure-podman.sh), on the registry's python:3.11-slim when it can be pulled, else on
# a Debian base made from Debian's packages (deploy/ensure-base-image.sh).
#
# Environment:
#   IMAGE       tag to build (default tokensforge:local)
#   BASE_IMAGE  base to build on, skipping the choice above
#   CA_BUNDLE   CA bundle the build's `pip install` trusts (a build secret, in no layer of the image);
#               default: the host's bundle ($SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt) when it
#               exists, so a build behind a TLS-intercepting proxy the host trusts works. CA_BUNDLE= turns it off.
# Podman on hosts like this project's CI (cgroups v1/hybrid, low hard ulimits, no CNI bridge needed): the
# runc runtime, ulimits under the hard limits, host networking, and the docker image format (the OCI
# format has no HEALTHCHECK). Prints the image name on the last line of stdout.
set -euo pipefail
say() { printf 'build-image: %s\n' "$*" >&2; }
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-tokensforge:local}
read -r -a ENGINE <<<"$(bash deploy/ensure-podman.sh)"

if [[ -z ${BASE_IMAGE:-} ]]; then
    for candidate in python:3.11-slim docker.io/library/python:3.11-slim; do
        if "${ENGINE[@]}" image inspect "$candidate" >/dev/null 2>&1; then BASE_IMAGE=$candidate; break; fi
    done
fi
if [[ -z ${BASE_IMAGE:-} ]]; then
    if timeout 120 "${ENGINE[@]}" pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=docker.io/library/python:3.11-slim
    else
        say "python:3.11-slim cannot be pulled here: making a Debian base from Debian's packages"
        BASE_IMAGE=$(bash deploy/ensure-base-image.sh "${ENGINE[@]}")
    fi
fi

if [[ -z ${CA_BUNDLE+set} ]]; then
    CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    [[ -f $CA_BUNDLE ]] || CA_BUNDLE=""
fi
# always a secret, empty when none: podman fails a RUN whose secret mount was not given
SECRET_SRC=${CA_BUNDLE:-/dev/null}
[[ -r $SECRET_SRC ]] || { say "CA_BUNDLE=$CA_BUNDLE is not a readable file"; exit 1; }

ARGS=(build -f deploy/Dockerfile -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE"
      --secret "id=ca_bundle,src=$SECRET_SRC" --network host)
if [[ ${ENGINE[0]} == podman ]]; then
    ARGS+=(--format docker --ulimit nofile=4096:8192 --ulimit nproc=2048:4096)
else
    export DOCKER_BUILDKIT=1
fi
previous=$("${ENGINE[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
start=$SECONDS
say "${ENGINE[*]} ${ARGS[*]} ."
"${ENGINE[@]}" "${ARGS[@]}" . >&2
say "built $IMAGE on $BASE_IMAGE in $((SECONDS - start)) s"
# the image this tag named before, now untagged: remove it (kept if another tag or container still uses it)
current=$("${ENGINE[@]}" image inspect --format '{{.Id}}' "$IMAGE")
if [[ -n $previous && $previous != "$current" ]]; then
    "${ENGINE[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$IMAGE"
