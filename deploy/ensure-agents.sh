#!/usr/bin/env bash
# Install the real coding agents that tests/test_agents_e2e.py drives — Claude Code and OpenAI's Codex CLI —
# at pinned versions from npm into a project-local prefix (.agents/, gitignored). Both ship their native binary
# inside a platform npm package, so nothing else is downloaded. Node.js and npm come from Debian's packages
# when `npm` is missing. Quick when the pinned versions are already there (it runs each binary's --version,
# with a throwaway HOME so nothing is written to the user's). Prints the prefix's bin directory on stdout
# (messages go to stderr). Exit 0 = both agents run at the pinned versions.
set -euo pipefail
say() { printf 'ensure-agents: %s\n' "$*" >&2; }

CLAUDE_CODE_VERSION=2.1.337
CODEX_VERSION=0.171.0
# the Vercel AI SDK and its two providers (tests/test_vercel_ai.py drives them from Node)
AI_SDK="ai@6.0.333 @ai-sdk/openai@3.0.141 @ai-sdk/anthropic@3.0.140"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${TOKENSFORGE_AGENTS_PREFIX:-$ROOT/.agents}
BIN=$PREFIX/node_modules/.bin

# Each agent's own switches for "no updater, no telemetry, no browser": the same ones the tests set.
installed_versions() {
    local home
    home=$(mktemp -d)
    HOME=$home CODEX_HOME=$home DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 \
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 BROWSER=true \
        timeout 30 "$BIN/claude" --version 2>/dev/null | head -1 || true
    HOME=$home CODEX_HOME=$home BROWSER=true timeout 30 "$BIN/codex" --version 2>/dev/null | head -1 || true
    rm -rf "$home"
}

is_current() {
    [[ -x $BIN/claude && -x $BIN/codex ]] || return 1
    local versions
    versions=$(installed_versions)
    grep -qx "$CLAUDE_CODE_VERSION (Claude Code)" <<<"$versions" && grep -qx "codex-cli $CODEX_VERSION" <<<"$versions" \
        && ai_sdk_current
}

ai_sdk_current() {
    local spec name version
    for spec in $AI_SDK; do
        name=${spec%@*}
        version=${spec##*@}
        grep -q "\"version\": \"$version\"" "$PREFIX/node_modules/$name/package.json" 2>/dev/null || return 1
    done
}

ensure_npm() {
    command -v npm >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || { say "npm not found and apt-get unavailable; install Node.js and npm"; exit 1; }
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { say "need root or sudo to apt-get install nodejs npm"; exit 1; }
        sudo="sudo"
    fi
    say "installing Debian's nodejs and npm packages"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm >&2
}

if is_current; then
    echo "$BIN"
    exit 0
fi
ensure_npm
say "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION and @openai/codex@$CODEX_VERSION into $PREFIX"
mkdir -p "$PREFIX"
# A package.json of the prefix's own keeps npm from walking up to (or writing) anything of the project's.
[[ -f $PREFIX/package.json ]] || printf '{"name": "tokensforge-agents", "private": true}\n' >"$PREFIX/package.json"
# Claude Code's engines field asks for Node 22; its binary is native and runs under any Node, so the
# engine check is advisory here (npm only warns).
npm install --prefix "$PREFIX" --no-audit --no-fund --no-update-notifier --loglevel=error \
    --save-exact "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" "@openai/codex@$CODEX_VERSION" $AI_SDK >&2
# Claude Code's postinstall copies the platform binary over its bin/claude.exe placeholder; an npm that holds
# back install scripts leaves the placeholder, so run it ourselves when the binary does not answer.
if ! is_current && [[ -f $PREFIX/node_modules/@anthropic-ai/claude-code/install.cjs ]]; then
    say "running Claude Code's postinstall (install.cjs)"
    (cd "$PREFIX/node_modules/@anthropic-ai/claude-code" && node install.cjs >&2)
fi
is_current || { say "agents still not at the pinned versions after installing: $(installed_versions | tr '\n' ' ')"; exit 1; }
echo "$BIN"
