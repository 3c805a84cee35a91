#!/usr/bin/env bash
# Make sure PostgreSQL server binaries exist for the embedded database.
#
# Searches like tokensforge/embedded_pg.py (TOKENSFORGE_PG_BINDIR, PATH, pg_config --bindir,
# /usr/lib/postgresql/*/bin highest version first); installs the distro `postgresql` package
# with apt-get when nothing is found. Prints the bindir on stdout (messages go to stderr), so
#   export TOKENSFORGE_PG_BINDIR="$(deploy/ensure-postgres.sh)"
# works. Exit 0 = usable bindir found.
set -euo pipefail

REQUIRED=(initdb pg_ctl postgres psql createdb)

say() { printf 'ensure-postgres: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# usable_bindir DIR: true when DIR holds every binary the gateway runs.
usable_bindir() {
    local dir="$1" name
    [[ -n "$dir" && -d "$dir" ]] || return 1
    for name in "${REQUIRED[@]}"; do
        [[ -f "$dir/$name" && -x "$dir/$name" ]] || return 1
    done
}

# find_bindir: print the first usable bindir in search order, or fail.
find_bindir() {
    local initdb dir
    if initdb="$(command -v initdb)" && command -v pg_ctl >/dev/null; then
        for dir in "$(dirname "$(readlink -f "$initdb")")" "$(dirname "$initdb")"; do
            usable_bindir "$dir" && { echo "$dir"; return 0; }
        done
    fi
    if command -v pg_config >/dev/null; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        usable_bindir "$dir" && { echo "$dir"; return 0; }
    fi
    # Highest major version first: version-sort the distro dirs, newest last, then reverse.
    while IFS= read -r dir; do
        usable_bindir "$dir" && { echo "$dir"; return 0; }
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V -r)
    return 1
}

# install_postgres: apt-get install postgresql, via sudo when not root.
install_postgres() {
    command -v apt-get >/dev/null \
        || die "PostgreSQL not found and no apt-get: install the PostgreSQL server (initdb, pg_ctl) with your package manager, then set TOKENSFORGE_PG_BINDIR to its bin directory"
    local -a sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null \
            || die "PostgreSQL not found; installing it needs root and sudo is missing: run this script as root"
        sudo=(sudo)
    fi
    say "PostgreSQL not found; installing the 'postgresql' package with apt-get"
    "${sudo[@]}" apt-get update >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2
}

main() {
    local bindir
    if [[ -n "${TOKENSFORGE_PG_BINDIR:-}" ]]; then
        usable_bindir "$TOKENSFORGE_PG_BINDIR" \
            || die "TOKENSFORGE_PG_BINDIR=$TOKENSFORGE_PG_BINDIR lacks one of: ${REQUIRED[*]} (fix or unset it)"
        say "using TOKENSFORGE_PG_BINDIR=$TOKENSFORGE_PG_BINDIR"
        echo "$TOKENSFORGE_PG_BINDIR"
        return 0
    fi
    if bindir="$(find_bindir)"; then
        say "PostgreSQL found in $bindir"
        echo "$bindir"
        return 0
    fi
    install_postgres
    bindir="$(find_bindir)" \
        || die "installed 'postgresql' but still no ${REQUIRED[*]} on PATH, via pg_config or under /usr/lib/postgresql/*/bin"
    say "PostgreSQL installed in $bindir"
    echo "$bindir"
}

main "$@"
