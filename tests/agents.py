"""Drive the real coding agents (Claude Code, OpenAI's Codex CLI) against a local gateway, and see what they send.

The agents are installed by deploy/ensure-agents.sh (`make agents`) into .agents/. Each run gets a private HOME
(and CODEX_HOME) in a temp dir, every switch that stops an updater, telemetry or a browser, a bounded time and
its own process group, killed in a `finally`. A `Recorder` sits between the agent and the gateway: it forwards
every request unchanged (streaming the answer back as it comes) and keeps what was sent — path, headers without
secrets, the JSON body — and the gateway's `x-request-id`, so a test can read each request's receipt.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tokensforge.server import listening_socket, running

ROOT = Path(__file__).resolve().parent.parent
AGENTS_BIN = Path(os.environ.get("TOKENSFORGE_AGENTS_PREFIX", ROOT / ".agents")) / "node_modules" / ".bin"
CLAUDE = AGENTS_BIN / "claude"
CODEX = AGENTS_BIN / "codex"
AGENT_TIMEOUT_S = 45.0

#: request headers whose values are secrets or vary per run; kept by name only
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})
#: hop-by-hop headers a proxy must not copy
HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                         "content-encoding"})


def ensure_agents() -> Path:
    """The agents' bin directory, installing them first when they are missing (quick when present)."""
    if not (CLAUDE.exists() and CODEX.exists() and (AGENTS_BIN.parent / "@ai-sdk" / "anthropic").exists()):
        subprocess.run(["bash", str(ROOT / "deploy" / "ensure-agents.sh")], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    return AGENTS_BIN


# ------------------------------------------------------------------------------------------ recording proxy


@dataclass
class Exchange:
    """One request an agent made, and what the gateway answered (status, request id)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0
    request_id: str | None = None
    response_text: str = ""  # the whole answer (SSE text for streams), for diagnosis

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None


def public_headers(headers: Any) -> dict[str, str]:
    """Lower-cased request headers with secrets masked (their presence is part of the shape)."""
    return {k.lower(): ("<redacted>" if k.lower() in SECRET_HEADERS else v) for k, v in headers.items()}


SESSION = web.AppKey("session", aiohttp.ClientSession)


@dataclass
class Recorder:
    """A transparent HTTP proxy on loopback that keeps every exchange (see the module docstring)."""

    target: str  # the gateway's origin, e.g. http://127.0.0.1:1234
    exchanges: list[Exchange] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        exchange = Exchange(request.method, request.path_qs, public_headers(request.headers), body)
        self.exchanges.append(exchange)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        session = request.app[SESSION]
        async with session.request(request.method, self.target + request.path_qs, data=raw, headers=headers,
                                   auto_decompress=True) as upstream:
            exchange.status = upstream.status
            exchange.request_id = upstream.headers.get("x-request-id")
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS})
            await response.prepare(request)
            seen = bytearray()
            async for chunk in upstream.content.iter_any():
                seen += chunk
                await response.write(chunk)
            exchange.response_text = seen.decode("utf-8", "replace")
            await response.write_eof()
            return response

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def session_ctx(app: web.Application) -> Any:
            app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=AGENT_TIMEOUT_S))
            yield
            await app[SESSION].close()

        app.cleanup_ctx.append(session_ctx)
        return app

    def start(self) -> tuple[Any, str]:
        """(async context manager serving the proxy, its origin URL)."""
        sock = listening_socket("127.0.0.1", 0)
        return running(self.app(), sock), f"http://127.0.0.1:{sock.getsockname()[1]}"

    def model_requests(self) -> list[Exchange]:
        """The exchanges that asked a model for an answer (not count_tokens, not model lists)."""
        return [e for e in self.exchanges if e.method == "POST" and e.path.split("?")[0] in MODEL_PATHS]


MODEL_PATHS = frozenset({"/v1/messages", "/v1/responses", "/v1/chat/completions"})


# ------------------------------------------------------------------------------------------ running an agent


@dataclass
class AgentRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n"
                f"--- stderr\n{self.stderr[-4000:]}")


def quiet_env(home: Path) -> dict[str, str]:
    """The environment every agent run starts from: a private HOME, no updater, telemetry or browser."""
    keep = ("PATH", "LANG", "LC_ALL", "TERM", "TZ", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"), "BROWSER": "true", "NO_COLOR": "1", "CI": "true",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    return env


def claude_env(home: Path, base_url: str, key: str, model: str) -> dict[str, str]:
    """Claude Code against `base_url` with only a base URL and a key; every background model is `model`."""
    env = quiet_env(home)
    env.update({
        "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model, "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_BUG_COMMAND": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1", "CLAUDE_CODE_IDE_SKIP_AUTO_INSTALL": "1",
        "DISABLE_INSTALLATION_CHECKS": "1", "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
        "IS_SANDBOX": "1",  # lets --dangerously-skip-permissions run as root (this machine's tests do)
    })
    return env


def claude_argv(prompt: str, tools: str = "Read") -> list[str]:
    """A non-interactive `claude -p` whose only tool is `tools`, permissions skipped, JSON out."""
    return [str(CLAUDE), "-p", prompt, "--output-format", "json", "--tools", tools, "--allowedTools", tools,
            "--dangerously-skip-permissions", "--max-turns", "4", "--no-session-persistence"]


CODEX_CONFIG = """\
model = "{model}"
model_provider = "tokensforge"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[model_providers.tokensforge]
name = "Tokens Forge"
base_url = "{base_url}/v1"
env_key = "TOKENSFORGE_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"
"""


def codex_env(home: Path, base_url: str, key: str, model: str) -> dict[str, str]:
    """Codex CLI with a `config.toml` custom provider (wire_api = "responses") in a private CODEX_HOME."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(CODEX_CONFIG.format(model=model, base_url=base_url), encoding="utf-8")
    env = quiet_env(home)
    env.update({"CODEX_HOME": str(codex_home), "TOKENSFORGE_API_KEY": key})
    return env


def codex_argv(prompt: str, workdir: Path) -> list[str]:
    """A non-interactive `codex exec`: no git repo needed, no sandbox, no approvals, JSON events out."""
    return [str(CODEX), "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
            "--json", "-C", str(workdir), prompt]


async def run_agent(argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float = AGENT_TIMEOUT_S
                    ) -> AgentRun:
    """Run an agent in its own process group; whatever happens, the whole group is killed afterwards."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            kill_group(proc.pid)
            stdout, stderr = await proc.communicate()
            stderr += f"\n[killed after {timeout_s} s]".encode()
        return AgentRun(argv, proc.returncode if proc.returncode is not None else -1,
                        stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))
    finally:
        kill_group(proc.pid)
        if proc.returncode is None:
            await proc.wait()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------ fixtures


FIXTURE_TEXT_CHARS = 200
#: differ on every run and say nothing about the agent
VOLATILE_HEADERS = frozenset({"host", "content-length", "connection"})


def trim(value: Any, limit: int = FIXTURE_TEXT_CHARS) -> Any:
    """The same shape with long strings cut (every key and list kept; long lists keep a few items)."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"…[{len(value) - limit} chars trimmed]"
    if isinstance(value, list):
        head = [trim(v, limit) for v in value[:12]]
        return head + ([f"…[{len(value) - 12} more items trimmed]"] if len(value) > 12 else [])
    if isinstance(value, dict):
        return {k: trim(v, limit) for k, v in value.items()}
    return value


def fixture_of(exchange: Exchange) -> dict[str, Any]:
    """What a decoder test needs of one recorded request: path, headers (secrets masked), trimmed body."""
    headers = {k: v for k, v in sorted(exchange.headers.items()) if k not in VOLATILE_HEADERS}
    return {"method": exchange.method, "path": exchange.path, "headers": headers, "body": trim(exchange.body),
            "gateway_status": exchange.status}


def write_fixtures(directory: Path, name: str, exchanges: list[Exchange]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_bytes(orjson.dumps([fixture_of(e) for e in exchanges], option=orjson.OPT_INDENT_2) + b"\n")
    return path
