"""Foundations of the simulated upstream shared by its endpoint modules: deterministic token
counting and reply text, fault configuration, per-app state, request plumbing (auth, error
rendering, fault injection, SSE writing) and scripted tool calls.

The hot paths avoid per-request work that can be done once at import time (reply text, token JSON).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson
from aiohttp import web

MOCK_MODEL = "mock-model"
DEFAULT_COMPLETION_TOKENS = 16
MAX_COMPLETION_TOKENS = 4096
MAX_EMBEDDING_DIM = 4096
WORDS = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
    "dolore", "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis",
)  # fmt: skip
PER_MESSAGE_TOKENS = 3
DISCONNECT_POLL_S = 0.02
MALFORMED_BODY = b'{"id": "chatcmpl-mock", "object": "chat.completion", "choices": [{'
U32_TO_UNIT = 2.0 / 0xFFFFFFFF
SENTINEL = "\x00tokensforge-token\x00"
SENTINEL_JSON = orjson.dumps(SENTINEL)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE_EVENT = b"data: [DONE]\n\n"
_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (mock upstream)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "permission_denied", "Permission denied (mock upstream)."),
    404: ("invalid_request_error", "not_found", "Not found (mock upstream)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (mock upstream)."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway (mock upstream)."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


# --------------------------------------------------------------------------- token accounting


def count_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: one token per 4 UTF-8 bytes, rounded up."""
    if not text:
        return 0
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    return (size + 3) // 4


def content_tokens(content: Any) -> int:
    """Count string content or the text parts of multimodal content; anything else is free."""
    if isinstance(content, str):
        return count_tokens(content)
    if isinstance(content, list):
        return sum(
            count_tokens(part["text"])
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return 0


def prompt_tokens(messages: list[Any]) -> int:
    """Prompt size the mock bills: content tokens plus a fixed per-message overhead."""
    return sum(
        content_tokens(m.get("content") if isinstance(m, dict) else None) + PER_MESSAGE_TOKENS
        for m in messages
    )


def _build_reply_text() -> tuple[str, tuple[int, ...]]:
    """Prebuild the longest reply once; any shorter reply is a prefix slice of it."""
    words = [WORDS[i % len(WORDS)] for i in range(MAX_COMPLETION_TOKENS)]
    ends = tuple(itertools.accumulate(len(w) + (1 if i else 0) for i, w in enumerate(words)))
    return " ".join(words), ends


_REPLY_TEXT, _REPLY_ENDS = _build_reply_text()
_SPACED_TOKEN_JSON = tuple(orjson.dumps(w + " ") for w in WORDS)
_LAST_TOKEN_JSON = tuple(orjson.dumps(w) for w in WORDS)


def reply_text(n: int) -> str:
    """The n-token reply: n words from WORDS, cycled, joined by single spaces."""
    return _REPLY_TEXT[: _REPLY_ENDS[n - 1]] if n > 0 else ""


def token_json(i: int, n: int) -> bytes:
    """JSON string of stream token i of n; every token but the last carries its trailing space."""
    table = _LAST_TOKEN_JSON if i == n - 1 else _SPACED_TOKEN_JSON
    return table[i % len(WORDS)]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Faults:
    """Behaviour of the mock for one model (or the default)."""

    latency_ms: int = 0
    chunk_delay_ms: int = 0
    first_token_delay_ms: int = 0  # after the stream's head (status, role chunk), before its first content
    error_status: int | None = None
    error_rate: float = 1.0
    retry_after_s: int | None = None
    hang: bool = False
    cut_after_chunks: int | None = None
    no_usage: bool = False
    malformed_json: bool = False
    completion_tokens: int | None = None
    # an upstream that lies: usage beyond 2**53, a 200 that carries an error, or a stream that breaks its
    # own shape after `cut_after_chunks` (default 2) content chunks: "bad_delta" ("delta": "x"),
    # "bad_choices" ("choices": 1), "long_line" (one 2 MiB line), "error_event" ({"error": …} mid-stream)
    absurd_usage: bool = False
    error_in_200: bool = False
    malformed_stream: str | None = None


MALFORMED_STREAMS = ("bad_delta", "bad_choices", "long_line", "error_event")


@dataclass
class MockConfig:
    """Startup configuration; per_model entries replace the default for that model name."""

    default: Faults = field(default_factory=Faults)
    per_model: dict[str, Faults] = field(default_factory=dict)
    api_key: str | None = None
    embedding_dim: int = 8
    seed: int = 0
    # prompt caches: the smallest cacheable prefix (both providers), OpenAI's read granularity and
    # the lifetime of its automatic prefixes
    cache_min_tokens: int = 1024
    cache_quantum_tokens: int = 128
    openai_cache_ttl_s: float = 300.0
    # signs Anthropic thinking blocks and OpenAI encrypted reasoning; thinking length before the budget cap
    thinking_secret: bytes = b"tokensforge-mock-thinking"
    thinking_tokens: int = 32


_FAULT_TYPES: dict[str, tuple[type, ...]] = {
    "latency_ms": (int,),
    "chunk_delay_ms": (int,),
    "first_token_delay_ms": (int,),
    "error_status": (int, type(None)),
    "error_rate": (int, float),
    "retry_after_s": (int, type(None)),
    "hang": (bool,),
    "cut_after_chunks": (int, type(None)),
    "no_usage": (bool,),
    "malformed_json": (bool,),
    "completion_tokens": (int, type(None)),
    "absurd_usage": (bool,),
    "error_in_200": (bool,),
    "malformed_stream": (str, type(None)),
}


def faults_from_dict(data: Any) -> Faults:
    """Build Faults from JSON, rejecting unknown keys and wrong types so typos fail loudly."""
    if not isinstance(data, dict):
        raise ValueError("faults must be a JSON object")
    for key, value in data.items():
        allowed = _FAULT_TYPES.get(key)
        if allowed is None:
            raise ValueError(f"unknown fault {key!r}; known: {', '.join(_FAULT_TYPES)}")
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"fault {key!r} has invalid value {value!r}")
    return Faults(**data)


def per_model_from_dict(data: Any) -> dict[str, Faults]:
    """Parse `{"model": {fault: value}}` into per-model Faults."""
    if not isinstance(data, dict):
        raise ValueError("per-model faults must be a JSON object keyed by model name")
    return {str(model): faults_from_dict(spec) for model, spec in data.items()}


# --------------------------------------------------------------------------- runtime state


@dataclass
class MockStats:
    """Counters the tests read through /_mock/stats."""

    requests: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    inflight: int = 0
    cancelled: int = 0
    completed: int = 0
    cut: int = 0
    last_request: dict[str, Any] | None = None

    def reset(self) -> None:
        """Zero everything except inflight, which still has live handlers to decrement it."""
        inflight = self.inflight
        self.__init__()  # type: ignore[misc]
        self.inflight = inflight

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MockState:
    """Per-app mutable state: current faults, seeded RNG, id counter and stats."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.default = config.default
        self.per_model = dict(config.per_model)
        self.rng = random.Random(config.seed)
        self.ids = itertools.count(1)
        self.stats = MockStats()
        self.expected_auth = f"Bearer {config.api_key}".encode() if config.api_key else None

    def faults_for(self, model: str) -> Faults:
        return self.per_model.get(model, self.default)

    def replace_faults(self, default: Faults, per_model: dict[str, Faults]) -> None:
        """Swap faults and reseed so error_rate sequences restart deterministically."""
        self.default = default
        self.per_model = per_model
        self.rng = random.Random(self.config.seed)

    def should_fail(self, faults: Faults) -> bool:
        if faults.error_status is None:
            return False
        return faults.error_rate >= 1.0 or self.rng.random() < faults.error_rate


STATE_KEY = web.AppKey("tokensforge_mock_state", MockState)


class ApiError(Exception):
    """Raised inside handlers; rendered as an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        err_type, code, default_message = _ERROR_KINDS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, "")
        )
        super().__init__(message or default_message or f"Mock upstream error {status}.")
        self.status = status
        error = {"message": str(self), "type": err_type, "code": code, "param": param}
        self.body = {"error": error}
        self.headers = headers

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body),
            content_type="application/json",
            headers=self.headers,
        )

    def anthropic_response(self) -> web.Response:
        default = "api_error" if self.status >= 500 else "invalid_request_error"
        error = {"type": _ANTHROPIC_ERROR_TYPES.get(self.status, default), "message": str(self)}
        return web.Response(
            status=self.status,
            body=orjson.dumps({"type": "error", "error": error}),
            content_type="application/json",
            headers=self.headers,
        )


class StreamCut(Exception):
    """The stream was deliberately broken; carries the response aiohttp must finish."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("stream cut by fault injection")
        self.response = response


def json_response(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


# --------------------------------------------------------------------------- request plumbing

Handler = Callable[[web.Request, MockState, Any], Awaitable[web.StreamResponse]]


def parse_body(raw: bytes) -> Any:
    """Parsed JSON body, or None when absent/invalid (handlers decide whether that is an error)."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _record(request: web.Request, stats: MockStats, body: Any) -> None:
    stats.requests += 1
    stats.last_request = {
        "path": request.path,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body,
    }


def _check_auth(request: web.Request, state: MockState) -> None:
    if state.expected_auth is None:
        return
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, state.expected_auth):
        raise ApiError(401)


def credential_of(request: web.Request) -> str:
    """The caller's key however it was sent (x-api-key or bearer token): caches are per credential."""
    key = request.headers.get("x-api-key")
    if key is not None:
        return key
    return (request.headers.get("Authorization") or "").removeprefix("Bearer ")


def _check_api_key(request: web.Request, state: MockState) -> None:
    """Anthropic's auth: the key in `x-api-key`, or as a bearer token (recent anthropic SDKs)."""
    if state.config.api_key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        _check_auth(request, state)
    elif not hmac.compare_digest(given.encode(), state.config.api_key.encode()):
        raise ApiError(401, "invalid x-api-key")


def endpoint(
    handler: Handler, *, anthropic: bool = False
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a /v1 handler with auth, error rendering and inflight/cancelled/completed stats;
    `anthropic` endpoints also take the key as `x-api-key` and answer errors in Anthropic's shape."""
    check_auth = _check_api_key if anthropic else _check_auth

    async def wrapper(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        stats = state.stats
        stats.inflight += 1
        try:
            body = parse_body(await request.read())
            _record(request, stats, body)
            check_auth(request, state)
            response = await handler(request, state, body)
        except ApiError as exc:
            response = exc.anthropic_response() if anthropic else exc.response()
        except StreamCut as exc:
            stats.cut += 1
            return exc.response
        except ConnectionResetError:
            # The client went away; aiohttp silently drops whatever we return now.
            stats.cancelled += 1
            return web.Response(status=499)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        finally:
            stats.inflight -= 1
        stats.completed += 1
        return response

    return wrapper


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _sleep_connected(request: web.Request, seconds: float) -> None:
    """Sleep but notice a departed client: aiohttp does not cancel handlers on disconnect."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        if _client_gone(request):
            raise ConnectionResetError("client disconnected")
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, DISCONNECT_POLL_S))


async def apply_faults(request: web.Request, state: MockState, faults: Faults) -> web.Response | None:
    """Run the pre-response faults; returns a response that replaces the normal one, if any."""
    if faults.hang:
        await _sleep_connected(request, float("inf"))
    if faults.latency_ms > 0:
        await _sleep_connected(request, faults.latency_ms / 1000)
    if state.should_fail(faults):
        assert faults.error_status is not None
        retry_after = faults.retry_after_s
        headers = {"retry-after": str(retry_after)} if retry_after is not None else None
        raise ApiError(faults.error_status, headers=headers)
    if faults.malformed_json:
        return web.Response(body=MALFORMED_BODY, content_type="application/json")
    if faults.error_in_200:
        return json_response({"error": {"message": "upstream overloaded (in a 200)", "type": "server_error"}})
    return None


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "We could not parse the JSON body of your request.")
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    return model


def count_model(stats: MockStats, model: str) -> None:
    stats.by_model[model] = stats.by_model.get(model, 0) + 1



def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def data_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# --------------------------------------------------------------------------- scripted tool calls

TOOL_ARGUMENT_CHARS = 64
ARGUMENT_CHUNK_CHARS = 16
TOOL_RESULT_PREFIX = "The tool said: "
WORD_RE = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True)
class Script:
    """A reply that is not lorem ipsum: one call to a tool, or text quoting a tool's result."""

    text: str = ""
    tool_name: str | None = None
    arguments: str = ""  # JSON text

    @property
    def tokens(self) -> int:
        if self.tool_name is None:
            return count_tokens(self.text)
        return count_tokens(self.tool_name) + count_tokens(self.arguments)

    def argument_chunks(self) -> list[str]:
        size = ARGUMENT_CHUNK_CHARS
        return [self.arguments[i : i + size] for i in range(0, len(self.arguments), size)]

    def text_chunks(self) -> list[str]:
        return WORD_RE.findall(self.text)


def text_of(content: Any) -> str:
    """The text of string content or of a list of text blocks (OpenAI parts or Anthropic blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            b["text"]
            for b in content
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
    return ""


def tool_arguments(schema: Any, text: str) -> str:
    """Deterministic arguments: the user's text (truncated) for every required string property of the
    schema, or `{"query": text}` when it has none."""
    value = text[:TOOL_ARGUMENT_CHARS]
    required = schema.get("required") if isinstance(schema, dict) else None
    properties = schema.get("properties") if isinstance(schema, dict) else None
    names = [
        name
        for name in required or ()
        if isinstance(name, str)
        and isinstance(properties, dict)
        and isinstance(properties.get(name), dict)
        and properties[name].get("type") == "string"
    ]
    return orjson.dumps({name: value for name in names} if names else {"query": value}).decode()


#: context an agent wraps around the user's words (Claude Code's `<system-reminder>` blocks, Codex's
#: `<environment_context>`): not what the user asked, so never a tool argument
_AGENT_CONTEXT = re.compile(r"<(system-reminder|environment_context)>.*?</\1>", re.DOTALL)


def user_request(messages: list[Any]) -> str:
    """What the user last asked in words: the newest user turn with text besides agent context (an agent's
    latest user turn may hold only reminders)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _AGENT_CONTEXT.sub("", text_of(message.get("content"))).strip()
            if text:
                return text
    return ""


def tool_call_script(tools: list[tuple[str, Any]], text: str) -> Script | None:
    """Call the tool the user's text names, else the first one."""
    if not tools:
        return None
    text = _AGENT_CONTEXT.sub("", text).strip()

    name, schema = next(((n, s) for n, s in tools if n in text), tools[0])
    return Script(tool_name=name, arguments=tool_arguments(schema, text))


def output_cap(body: dict[str, Any], keys: tuple[str, ...]) -> int:
    """The client's output cap (validated by the caller), else the mock's maximum."""
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and value >= 1:
            return value
    return MAX_COMPLETION_TOKENS


async def send_events(
    request: web.Request, head: list[bytes], body: list[bytes], tail: list[bytes], faults: Faults
) -> web.StreamResponse:
    """Write head, the content events (a cut fault stops after N of them and drops the connection), tail."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    for event in head:
        await resp.write(event)
    cut = faults.cut_after_chunks
    delay = faults.chunk_delay_ms / 1000
    for i, event in enumerate(body if cut is None else body[: max(cut, 0)]):
        if delay > 0 and i:
            await asyncio.sleep(delay)
        elif not i and faults.first_token_delay_ms:
            await asyncio.sleep(faults.first_token_delay_ms / 1000)
        await resp.write(event)
    if cut is not None:
        if request.transport is not None:
            request.transport.close()
        raise StreamCut(resp)
    for event in tail:
        await resp.write(event)
    await resp.write_eof()
    return resp


# --------------------------------------------------------------------------- anthropic messages


def anthropic_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt size for Messages: like chat, with the top-level `system` counted as one more message."""
    messages = body.get("messages")
    tokens = prompt_tokens(messages if isinstance(messages, list) else [])
    system = body.get("system")
    if system:
        tokens += count_tokens(text_of(system)) + PER_MESSAGE_TOKENS
    return tokens


def sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


