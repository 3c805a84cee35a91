"""Simulated OpenAI-compatible and Anthropic Messages upstream with deterministic token counts,
scripted tool calls and fault injection.

Used by the demo, the end-to-end tests and the benchmarks, so the hot paths avoid per-request
work that can be done once at import time (reply text, token JSON, stream chunk envelopes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import hmac
import itertools
import random
import re
import signal
import struct
import sys
import time
from array import array
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
_U32_TO_UNIT = 2.0 / 0xFFFFFFFF
_SENTINEL = "\x00tokensforge-token\x00"
_SENTINEL_JSON = orjson.dumps(_SENTINEL)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE_EVENT = b"data: [DONE]\n\n"
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


def _content_tokens(content: Any) -> int:
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
        _content_tokens(m.get("content") if isinstance(m, dict) else None) + PER_MESSAGE_TOKENS
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


def _token_json(i: int, n: int) -> bytes:
    """JSON string of stream token i of n; every token but the last carries its trailing space."""
    table = _LAST_TOKEN_JSON if i == n - 1 else _SPACED_TOKEN_JSON
    return table[i % len(WORDS)]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Faults:
    """Behaviour of the mock for one model (or the default)."""

    latency_ms: int = 0
    chunk_delay_ms: int = 0
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


_FAULT_TYPES: dict[str, tuple[type, ...]] = {
    "latency_ms": (int,),
    "chunk_delay_ms": (int,),
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
class _Stats:
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


class _State:
    """Per-app mutable state: current faults, seeded RNG, id counter and stats."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.default = config.default
        self.per_model = dict(config.per_model)
        self.rng = random.Random(config.seed)
        self.ids = itertools.count(1)
        self.stats = _Stats()
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


STATE_KEY = web.AppKey("tokensforge_mock_state", _State)


class _ApiError(Exception):
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


class _StreamCut(Exception):
    """The stream was deliberately broken; carries the response aiohttp must finish."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("stream cut by fault injection")
        self.response = response


def _json_response(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


# --------------------------------------------------------------------------- request plumbing

Handler = Callable[[web.Request, _State, Any], Awaitable[web.StreamResponse]]


def _parse_body(raw: bytes) -> Any:
    """Parsed JSON body, or None when absent/invalid (handlers decide whether that is an error)."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _record(request: web.Request, stats: _Stats, body: Any) -> None:
    stats.requests += 1
    stats.last_request = {
        "path": request.path,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body,
    }


def _check_auth(request: web.Request, state: _State) -> None:
    if state.expected_auth is None:
        return
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, state.expected_auth):
        raise _ApiError(401)


def _check_api_key(request: web.Request, state: _State) -> None:
    """Anthropic's auth: the key in `x-api-key`, or as a bearer token (recent anthropic SDKs)."""
    if state.config.api_key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        _check_auth(request, state)
    elif not hmac.compare_digest(given.encode(), state.config.api_key.encode()):
        raise _ApiError(401, "invalid x-api-key")


def _endpoint(
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
            body = _parse_body(await request.read())
            _record(request, stats, body)
            check_auth(request, state)
            response = await handler(request, state, body)
        except _ApiError as exc:
            response = exc.anthropic_response() if anthropic else exc.response()
        except _StreamCut as exc:
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


async def _apply_faults(request: web.Request, state: _State, faults: Faults) -> web.Response | None:
    """Run the pre-response faults; returns a response that replaces the normal one, if any."""
    if faults.hang:
        await _sleep_connected(request, float("inf"))
    if faults.latency_ms > 0:
        await _sleep_connected(request, faults.latency_ms / 1000)
    if state.should_fail(faults):
        assert faults.error_status is not None
        retry_after = faults.retry_after_s
        headers = {"retry-after": str(retry_after)} if retry_after is not None else None
        raise _ApiError(faults.error_status, headers=headers)
    if faults.malformed_json:
        return web.Response(body=MALFORMED_BODY, content_type="application/json")
    if faults.error_in_200:
        return _json_response({"error": {"message": "upstream overloaded (in a 200)", "type": "server_error"}})
    return None


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _ApiError(400, "We could not parse the JSON body of your request.")
    return body


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "you must provide a model parameter", param="model")
    return model


def _count_model(stats: _Stats, model: str) -> None:
    stats.by_model[model] = stats.by_model.get(model, 0) + 1


# --------------------------------------------------------------------------- chat completions


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _completion_length(body: dict[str, Any], faults: Faults) -> tuple[int, str]:
    """Output length and the finish_reason it implies (a client cap means "length")."""
    if faults.completion_tokens is not None:
        return min(max(faults.completion_tokens, 0), MAX_COMPLETION_TOKENS), "stop"
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise _ApiError(400, f"Invalid '{key}': expected an integer >= 1.", param=key)
        return min(value, MAX_COMPLETION_TOKENS), "length"
    return DEFAULT_COMPLETION_TOKENS, "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def chat_completions(request: web.Request, state: _State, body: Any) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    body = _require_object(body)
    model = _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _ApiError(400, "'messages' must be an array.", param="messages")
    _count_model(state.stats, model)
    faults = state.faults_for(model)
    n, finish_reason = _completion_length(body, faults)
    replacement = await _apply_faults(request, state, faults)
    if replacement is not None:
        return replacement
    head = {
        "id": f"chatcmpl-mock-{next(state.ids)}",
        "created": int(time.time()),
        "model": model,
    }
    script = _chat_script(body, messages)
    if script is not None:
        n = min(script.tokens, _cap(body, ("max_completion_tokens", "max_tokens")))
    usage = None if faults.no_usage else _usage(prompt_tokens(messages), n)
    if usage is not None and faults.absurd_usage:
        usage = _usage(2**60, n)
    if body.get("stream") is True:
        if faults.malformed_stream is not None:
            return await _send_malformed_stream(request, head, faults)
        include_usage = _include_usage(body) and usage is not None
        if script is not None:
            return await _send_chat_script(
                request, head, script, usage if include_usage else None, faults
            )
        stream = _ChatStream(head, n, finish_reason, usage if include_usage else None)
        return await stream.send(request, faults)
    if script is not None:
        return _json_response(_chat_script_completion(head, script, usage))
    return _json_response(_chat_completion(head, n, finish_reason, usage))


async def _send_malformed_stream(
    request: web.Request, head: dict[str, Any], faults: Faults
) -> web.StreamResponse:
    """A few good content chunks, then one event that breaks the chat-chunk shape, then [DONE]."""
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    base = {**head, "object": "chat.completion.chunk"}
    good = faults.cut_after_chunks if faults.cut_after_chunks is not None else 2
    for i in range(good):
        delta = {"content": WORDS[i % len(WORDS)] + " "}
        await resp.write(_event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
    kind = faults.malformed_stream
    if kind == "bad_delta":
        await resp.write(_event({**base, "choices": [{"index": 0, "delta": "x", "finish_reason": None}]}))
    elif kind == "bad_choices":
        await resp.write(_event({**base, "choices": 1}))
    elif kind == "long_line":
        await resp.write(b"data: " + b"x" * (2 * 1024 * 1024) + b"\n\n")
    else:
        await resp.write(_event({"error": {"message": "the model crashed mid-stream", "type": "server_error"}}))
    await resp.write(_DONE_EVENT)
    await resp.write_eof()
    return resp


def _chat_completion(
    head: dict[str, Any], n: int, finish_reason: str, usage: dict[str, int] | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": head["id"],
        "object": "chat.completion",
        "created": head["created"],
        "model": head["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply_text(n), "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
    }
    if usage is not None:
        payload["usage"] = usage
    return payload


class _ChatStream:
    """Renders one streamed completion; content chunks are spliced from a prebuilt envelope."""

    def __init__(
        self, head: dict[str, Any], n: int, finish_reason: str, usage: dict[str, int] | None
    ) -> None:
        self.base = {**head, "object": "chat.completion.chunk"}
        self.n = n
        self.finish_reason = finish_reason
        self.usage = usage
        self.prefix, self.suffix = self._content_envelope()

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            **self.base,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.usage is not None:
            chunk["usage"] = None  # OpenAI sends an explicit null until the usage chunk
        return chunk

    def _content_envelope(self) -> tuple[bytes, bytes]:
        """Split a serialized content chunk around its token so each chunk is two concatenations."""
        template = orjson.dumps(self._chunk({"content": _SENTINEL}, None))
        prefix, _, suffix = template.rpartition(_SENTINEL_JSON)
        return b"data: " + prefix, suffix + b"\n\n"

    async def send(self, request: web.Request, faults: Faults) -> web.StreamResponse:
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        await resp.write(_event(self._chunk({"role": "assistant", "content": ""}, None)))
        await self._send_content(request, resp, faults)
        await resp.write(_event(self._chunk({}, self.finish_reason)))
        if self.usage is not None:
            await resp.write(_event({**self.base, "choices": [], "usage": self.usage}))
        await resp.write(_DONE_EVENT)
        await resp.write_eof()
        return resp

    async def _send_content(
        self, request: web.Request, resp: web.StreamResponse, faults: Faults
    ) -> None:
        """Write the token chunks; a cut fault stops after N of them and drops the connection."""
        cut = faults.cut_after_chunks
        count = self.n if cut is None else min(self.n, max(cut, 0))
        delay = faults.chunk_delay_ms / 1000
        for i in range(count):
            if delay > 0 and i:
                await asyncio.sleep(delay)
            await resp.write(self.prefix + _token_json(i, self.n) + self.suffix)
        if cut is not None:
            if request.transport is not None:
                request.transport.close()
            raise _StreamCut(resp)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# --------------------------------------------------------------------------- scripted tool calls

TOOL_ARGUMENT_CHARS = 64
ARGUMENT_CHUNK_CHARS = 16
TOOL_RESULT_PREFIX = "The tool said: "
_WORD_RE = re.compile(r"\S+\s*|\s+")


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
        return _WORD_RE.findall(self.text)


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


def _tool_call_script(tools: list[tuple[str, Any]], text: str) -> Script | None:
    """Call the tool the user's text names, else the first one."""
    if not tools:
        return None
    name, schema = next(((n, s) for n, s in tools if n in text), tools[0])
    return Script(tool_name=name, arguments=tool_arguments(schema, text))


def _chat_script(body: dict[str, Any], messages: list[Any]) -> Script | None:
    """Chat: a tool call when tools are offered and the user spoke last; text after a tool result."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict):
        return None
    role = last.get("role")
    if role == "tool":
        return Script(text=TOOL_RESULT_PREFIX + text_of(last.get("content")))
    tools = body.get("tools")
    if (
        role != "user"
        or not tools
        or not isinstance(tools, list)
        or body.get("tool_choice") == "none"
    ):
        return None
    functions = [t.get("function") for t in tools if isinstance(t, dict)]
    named = [
        (f["name"], f.get("parameters"))
        for f in functions
        if isinstance(f, dict) and isinstance(f.get("name"), str)
    ]
    return _tool_call_script(named, text_of(last.get("content")))


def _cap(body: dict[str, Any], keys: tuple[str, ...]) -> int:
    """The client's output cap (validated by the caller), else the mock's maximum."""
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and value >= 1:
            return value
    return MAX_COMPLETION_TOKENS


def _chat_tool_call(script: Script, call_id: str) -> dict[str, Any]:
    function = {"name": script.tool_name, "arguments": script.arguments}
    return {"id": call_id, "type": "function", "function": function}


def _chat_script_completion(
    head: dict[str, Any], script: Script, usage: dict[str, int] | None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": script.text or None, "refusal": None}
    finish_reason = "stop"
    if script.tool_name is not None:
        message["tool_calls"] = [_chat_tool_call(script, head["id"].replace("chatcmpl", "call"))]
        finish_reason = "tool_calls"
    payload: dict[str, Any] = {
        "id": head["id"],
        "object": "chat.completion",
        "created": head["created"],
        "model": head["model"],
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if usage is not None:
        payload["usage"] = usage
    return payload


async def _send_chat_script(
    request: web.Request,
    head: dict[str, Any],
    script: Script,
    usage: dict[str, int] | None,
    faults: Faults,
) -> web.StreamResponse:
    """Stream a scripted reply as OpenAI does: text deltas, or one tool call whose first delta carries
    index, id and name and whose arguments follow in pieces."""
    base = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event({**base, "choices": [choice], **({"usage": None} if usage else {})})

    if script.tool_name is None:
        body = [chunk({"content": piece}) for piece in script.text_chunks()]
        finish_reason = "stop"
    else:
        call = _chat_tool_call(script, head["id"].replace("chatcmpl", "call"))
        call["function"]["arguments"] = ""
        body = [chunk({"tool_calls": [{"index": 0, **call}]})]
        body += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in script.argument_chunks()
        ]
        finish_reason = "tool_calls"
    tail = [chunk({}, finish_reason)]
    if usage is not None:
        tail.append(_event({**base, "choices": [], "usage": usage}))
    tail.append(_DONE_EVENT)
    return await _send_events(
        request, [chunk({"role": "assistant", "content": None})], body, tail, faults
    )


async def _send_events(
    request: web.Request, head: list[bytes], body: list[bytes], tail: list[bytes], faults: Faults
) -> web.StreamResponse:
    """Write head, the content events (a cut fault stops after N of them and drops the connection), tail."""
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    for event in head:
        await resp.write(event)
    cut = faults.cut_after_chunks
    delay = faults.chunk_delay_ms / 1000
    for i, event in enumerate(body if cut is None else body[: max(cut, 0)]):
        if delay > 0 and i:
            await asyncio.sleep(delay)
        await resp.write(event)
    if cut is not None:
        if request.transport is not None:
            request.transport.close()
        raise _StreamCut(resp)
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


def _messages_script(body: dict[str, Any], messages: list[Any]) -> Script | None:
    """Messages: text quoting the results when the user's last turn returns tool results; a tool call
    when tools are offered and the user spoke last."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    results = (
        [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if isinstance(content, list)
        else []
    )
    if results:
        return Script(
            text=TOOL_RESULT_PREFIX + " ".join(text_of(b.get("content")) for b in results)
        )
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if (
        not tools
        or not isinstance(tools, list)
        or (isinstance(choice, dict) and choice.get("type") == "none")
    ):
        return None
    named = [
        (t["name"], t.get("input_schema"))
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("name"), str)
    ]
    return _tool_call_script(named, text_of(content))


def _messages_request(body: Any) -> tuple[dict[str, Any], str, int, list[Any]]:
    body = _require_object(body)
    model = _require_model(body)
    max_tokens = body.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _ApiError(400, "max_tokens: Field required (an integer >= 1)", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "messages: Field required (a non-empty array)", param="messages")
    return body, model, max_tokens, messages


async def messages(request: web.Request, state: _State, body: Any) -> web.StreamResponse:
    """POST /v1/messages (Anthropic): a reply of min(16, max_tokens) tokens, or a scripted tool turn."""
    body, model, max_tokens, turns = _messages_request(body)
    _count_model(state.stats, model)
    faults = state.faults_for(model)
    script = _messages_script(body, turns)
    if script is not None:
        n = min(script.tokens, max_tokens)
        stop_reason = "tool_use" if script.tool_name is not None else "end_turn"
    elif faults.completion_tokens is not None:
        n, stop_reason = min(max(faults.completion_tokens, 0), MAX_COMPLETION_TOKENS), "end_turn"
    else:
        n = min(DEFAULT_COMPLETION_TOKENS, max_tokens)
        stop_reason = "max_tokens" if max_tokens < DEFAULT_COMPLETION_TOKENS else "end_turn"
    replacement = await _apply_faults(request, state, faults)
    if replacement is not None:
        return replacement
    message_id = f"msg_mock_{next(state.ids)}"
    usage = (
        None
        if faults.no_usage
        else {"input_tokens": anthropic_prompt_tokens(body), "output_tokens": n}
    )
    script = script or Script(text=reply_text(n))
    if body.get("stream") is True:
        return await _send_messages_stream(
            request, message_id, model, script, stop_reason, usage, faults
        )
    content: list[dict[str, Any]] = []
    if script.tool_name is None:
        content.append({"type": "text", "text": script.text})
    else:
        arguments = orjson.loads(script.arguments)
        content.append(
            {
                "type": "tool_use",
                "id": message_id.replace("msg", "toolu"),
                "name": script.tool_name,
                "input": arguments,
            }
        )
    payload: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
    }
    if usage is not None:
        payload["usage"] = usage
    return _json_response(payload)


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def _send_messages_stream(
    request: web.Request,
    message_id: str,
    model: str,
    script: Script,
    stop_reason: str,
    usage: dict[str, int] | None,
    faults: Faults,
) -> web.StreamResponse:
    """Stream as Anthropic does: message_start, one content block (text_delta or input_json_delta
    pieces), message_delta with stop_reason and output tokens, message_stop."""
    message: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
    }  # fmt: skip
    if usage is not None:
        message["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": 1}
    if script.tool_name is None:
        block: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in script.text_chunks()]
    else:
        block = {
            "type": "tool_use",
            "id": message_id.replace("msg", "toolu"),
            "name": script.tool_name,
            "input": {},
        }
        deltas = [
            {"type": "input_json_delta", "partial_json": piece}
            for piece in script.argument_chunks()
        ]
    head = [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        _sse("ping", {"type": "ping"}),
    ]
    body = [
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
        for d in deltas
    ]
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
    }
    if usage is not None:
        delta["usage"] = {"output_tokens": usage["output_tokens"]}
    tail = [
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", delta),
        _sse("message_stop", {"type": "message_stop"}),
    ]
    return await _send_events(request, head, body, tail, faults)


async def count_message_tokens(
    request: web.Request, state: _State, body: Any
) -> web.StreamResponse:
    """POST /v1/messages/count_tokens (Anthropic)."""
    body = _require_object(body)
    _require_model(body)
    if not isinstance(body.get("messages"), list):
        raise _ApiError(400, "messages: Field required", param="messages")
    return _json_response({"input_tokens": anthropic_prompt_tokens(body)})


# --------------------------------------------------------------------------- embeddings


def _embedding_inputs(raw: Any) -> list[tuple[bytes, int]]:
    """Normalise `input` to (hash key, token count) pairs; token ids count one token each."""
    if isinstance(raw, str):
        return [(raw.encode(), count_tokens(raw))]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, str) for x in raw):
            return [(x.encode(), count_tokens(x)) for x in raw]
        if all(_is_int(x) for x in raw):
            return [(orjson.dumps(raw), len(raw))]
        if all(isinstance(x, list) and x and all(_is_int(y) for y in x) for x in raw):
            return [(orjson.dumps(x), len(x)) for x in raw]
    message = "'input' must be a string, an array of strings or an array of token arrays."
    raise _ApiError(400, message, param="input")


def embedding_vector(key: bytes, dim: int) -> array[float]:
    """Deterministic float32 vector in [-1, 1] expanded from sha256(key)."""
    seed = hashlib.sha256(key).digest()
    blocks = [seed]
    extra = range(1, (dim * 4 + 31) // 32)
    blocks.extend(hashlib.sha256(seed + struct.pack("<I", i)).digest() for i in extra)
    ints = struct.unpack(f"<{dim}I", b"".join(blocks)[: dim * 4])
    return array("f", [v * _U32_TO_UNIT - 1.0 for v in ints])


def _encode_vector(vector: array[float], encoding_format: str) -> list[float] | str:
    """float -> JSON numbers; base64 -> little-endian float32 bytes, as the openai SDK decodes."""
    if encoding_format == "float":
        return vector.tolist()
    if sys.byteorder != "little":
        vector = array("f", vector)
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")


def _embedding_dim(body: dict[str, Any], default: int) -> int:
    dims = body.get("dimensions")
    if dims is None:
        return default
    if not _is_int(dims) or not 1 <= dims <= MAX_EMBEDDING_DIM:
        message = f"Invalid 'dimensions': expected 1..{MAX_EMBEDDING_DIM}."
        raise _ApiError(400, message, param="dimensions")
    return dims


async def embeddings(request: web.Request, state: _State, body: Any) -> web.StreamResponse:
    """POST /v1/embeddings."""
    body = _require_object(body)
    model = _require_model(body)
    inputs = _embedding_inputs(body.get("input"))
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        message = "'encoding_format' must be 'float' or 'base64'."
        raise _ApiError(400, message, param="encoding_format")
    dim = _embedding_dim(body, state.config.embedding_dim)
    _count_model(state.stats, model)
    faults = state.faults_for(model)
    replacement = await _apply_faults(request, state, faults)
    if replacement is not None:
        return replacement
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _encode_vector(embedding_vector(key, dim), encoding_format),
        }
        for i, (key, _) in enumerate(inputs)
    ]
    payload: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if not faults.no_usage:
        tokens = sum(t for _, t in inputs)
        payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _json_response(payload)


# --------------------------------------------------------------------------- models, health, hooks


async def list_models(request: web.Request, state: _State, body: Any) -> web.StreamResponse:
    """GET /v1/models: the default model plus every model with its own faults."""
    names = [MOCK_MODEL, *sorted(m for m in state.per_model if m != MOCK_MODEL)]
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "tokensforge-mock"} for m in names
    ]
    return _json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _faults_json(state: _State) -> dict[str, Any]:
    return {
        "default": dataclasses.asdict(state.default),
        "per_model": {m: dataclasses.asdict(f) for m, f in state.per_model.items()},
    }


async def set_faults(request: web.Request) -> web.Response:
    """POST /_mock/faults: replace default and per-model faults so a test can change behaviour."""
    state = request.app[STATE_KEY]
    body = _parse_body(await request.read())
    try:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        default = faults_from_dict(body.get("default") or {})
        per_model = per_model_from_dict(body.get("per_model") or {})
    except (ValueError, TypeError) as exc:
        return _ApiError(400, str(exc)).response()
    state.replace_faults(default, per_model)
    return _json_response(_faults_json(state))


async def get_stats(request: web.Request) -> web.Response:
    return _json_response(request.app[STATE_KEY].stats.to_json())


async def reset_stats(request: web.Request) -> web.Response:
    stats = request.app[STATE_KEY].stats
    stats.reset()
    return _json_response(stats.to_json())


def create_app(config: MockConfig | None = None) -> web.Application:
    """Build the mock upstream application; each app has its own state and seeded RNG."""
    app = web.Application()
    app[STATE_KEY] = _State(config or MockConfig())
    app.router.add_post("/v1/chat/completions", _endpoint(chat_completions))
    app.router.add_post("/v1/embeddings", _endpoint(embeddings))
    app.router.add_post("/v1/messages", _endpoint(messages, anthropic=True))
    app.router.add_post(
        "/v1/messages/count_tokens", _endpoint(count_message_tokens, anthropic=True)
    )
    app.router.add_get("/v1/models", _endpoint(list_models))
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/_mock/faults", set_faults)
    app.router.add_get("/_mock/stats", get_stats)
    app.router.add_post("/_mock/reset", reset_stats)
    return app


# --------------------------------------------------------------------------- command line


def _model_faults_arg(text: str) -> dict[str, Faults]:
    """argparse type for --model-faults, so bad JSON is reported as a usage error."""
    try:
        return per_model_from_dict(orjson.loads(text))
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"invalid --model-faults: {exc}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the mock-upstream command line options."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=int, default=0, help="delay before answering")
    parser.add_argument("--chunk-delay-ms", type=int, default=0, help="delay between stream chunks")
    parser.add_argument("--error-status", type=int, default=None, help="answer with this status")
    parser.add_argument("--error-rate", type=float, default=1.0, help="fraction that fails")
    parser.add_argument("--retry-after", type=int, default=None, help="retry-after on errors")
    parser.add_argument("--hang", action="store_true", help="never answer")
    parser.add_argument("--cut-after", type=int, default=None, metavar="N",
                        help="drop streams after N content chunks")  # fmt: skip
    parser.add_argument("--no-usage", action="store_true", help="omit usage from responses")
    parser.add_argument("--malformed-json", action="store_true", help="answer 200 with broken JSON")
    parser.add_argument("--completion-tokens", type=int, default=None, help="fixed output length")
    parser.add_argument("--api-key", default=None, help="require this key (Bearer, or x-api-key)")
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed for --error-rate sampling")
    parser.add_argument("--model-faults", type=_model_faults_arg, default={}, metavar="JSON",
                        help='per-model faults, e.g. {"m": {"error_status": 500}}')  # fmt: skip


def config_from_args(args: argparse.Namespace) -> MockConfig:
    """Translate parsed options into a MockConfig."""
    default = Faults(
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        error_status=args.error_status,
        error_rate=args.error_rate,
        retry_after_s=args.retry_after,
        hang=args.hang,
        cut_after_chunks=args.cut_after,
        no_usage=args.no_usage,
        malformed_json=args.malformed_json,
        completion_tokens=getattr(args, "completion_tokens", None),
    )
    return MockConfig(
        default=default,
        per_model=dict(args.model_faults or {}),
        api_key=args.api_key,
        embedding_dim=getattr(args, "embedding_dim", 8),
        seed=getattr(args, "seed", 0),
    )


async def serve(config: MockConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, announcing the bound URL (real port when port is 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"mock-upstream listening on http://{host}:{bound}/v1", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_from_args(args: argparse.Namespace) -> int:
    """CLI entry point: run the mock on uvloop; returns 0 after a clean signal shutdown."""
    import uvloop

    uvloop.run(serve(config_from_args(args), args.host, args.port))
    return 0
