"""Simulated OpenAI-compatible and Anthropic Messages upstream with deterministic token counts,
scripted tool calls, prompt caches, signed thinking, a native Responses API and fault injection.

Used by the demo, the end-to-end tests and the benchmarks, so the hot paths avoid per-request
work that can be done once at import time (reply text, token JSON, stream chunk envelopes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import signal
import struct
import sys
import time
from array import array
from typing import Any

import orjson
from aiohttp import web

from .mock_cache import CACHE_KEY, PromptCache, boundaries, chat_units, openai_scope, openai_ttl_s
from .mock_core import (
    credential_of,
    ApiError,
    DEFAULT_COMPLETION_TOKENS,
    DONE_EVENT,
    Faults,
    MAX_COMPLETION_TOKENS,
    MAX_EMBEDDING_DIM,
    MOCK_MODEL,
    MockConfig,
    MockState,
    SENTINEL,
    SENTINEL_JSON,
    SSE_HEADERS,
    STATE_KEY,
    Script,
    StreamCut,
    TOOL_RESULT_PREFIX,
    U32_TO_UNIT,
    WORDS,
    anthropic_prompt_tokens,
    apply_faults,
    count_model,
    count_tokens,
    data_event,
    endpoint,
    faults_from_dict,
    is_int,
    json_response,
    output_cap,
    parse_body,
    per_model_from_dict,
    prompt_tokens,
    reply_text,
    require_model,
    require_object,
    send_events,
    text_of,
    token_json,
    tool_arguments,
    tool_call_script,
    user_request,
)
from .mock_messages import count_message_tokens, messages
from .mock_responses import RESPONSES_KEY, ResponseStore, delete_response, get_response, responses

__all__ = [
    "MOCK_MODEL",
    "TOOL_RESULT_PREFIX",
    "Faults",
    "MockConfig",
    "add_arguments",
    "anthropic_prompt_tokens",
    "config_from_args",
    "count_tokens",
    "create_app",
    "embedding_vector",
    "faults_from_dict",
    "per_model_from_dict",
    "prompt_tokens",
    "reply_text",
    "run_from_args",
    "tool_arguments",
]

# --------------------------------------------------------------------------- chat completions


def _completion_length(body: dict[str, Any], faults: Faults) -> tuple[int, str]:
    """Output length and the finish_reason it implies (a client cap means "length")."""
    if faults.completion_tokens is not None:
        return min(max(faults.completion_tokens, 0), MAX_COMPLETION_TOKENS), "stop"
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not is_int(value) or value < 1:
            raise ApiError(400, f"Invalid '{key}': expected an integer >= 1.", param=key)
        return min(value, MAX_COMPLETION_TOKENS), "length"
    return DEFAULT_COMPLETION_TOKENS, "stop"


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """Chat usage as OpenAI reports it: cached tokens are part of prompt_tokens, named in its details."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _chat_cached_tokens(
    request: web.Request, state: MockState, body: dict[str, Any], messages: list[Any], prompt: int
) -> int:
    """Automatic prefix caching; a prompt below the minimum costs no hashing at all (the benchmarks' case)."""
    config = state.config
    if prompt < config.cache_min_tokens:
        return 0
    credential = credential_of(request)
    bounds = boundaries(openai_scope("chat", str(body["model"]), credential, body), chat_units(messages))
    ttl_s = openai_ttl_s(body, config.openai_cache_ttl_s)
    return request.app[CACHE_KEY].openai(bounds, config.cache_min_tokens, config.cache_quantum_tokens, ttl_s)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def chat_completions(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    body = require_object(body)
    model = require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be an array.", param="messages")
    count_model(state.stats, model)
    faults = state.faults_for(model)
    n, finish_reason = _completion_length(body, faults)
    replacement = await apply_faults(request, state, faults)
    if replacement is not None:
        return replacement
    head = {
        "id": f"chatcmpl-mock-{next(state.ids)}",
        "created": int(time.time()),
        "model": model,
    }
    script = _chat_script(body, messages)
    if script is not None:
        n = min(script.tokens, output_cap(body, ("max_completion_tokens", "max_tokens")))
    prompt = prompt_tokens(messages)
    usage = None if faults.no_usage else _usage(prompt, n, _chat_cached_tokens(request, state, body, messages, prompt))
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
        return json_response(_chat_script_completion(head, script, usage))
    return json_response(_chat_completion(head, n, finish_reason, usage))


async def _send_malformed_stream(
    request: web.Request, head: dict[str, Any], faults: Faults
) -> web.StreamResponse:
    """A few good content chunks, then one event that breaks the chat-chunk shape, then [DONE]."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    base = {**head, "object": "chat.completion.chunk"}
    good = faults.cut_after_chunks if faults.cut_after_chunks is not None else 2
    for i in range(good):
        delta = {"content": WORDS[i % len(WORDS)] + " "}
        await resp.write(data_event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
    kind = faults.malformed_stream
    if kind == "bad_delta":
        await resp.write(data_event({**base, "choices": [{"index": 0, "delta": "x", "finish_reason": None}]}))
    elif kind == "bad_choices":
        await resp.write(data_event({**base, "choices": 1}))
    elif kind == "long_line":
        await resp.write(b"data: " + b"x" * (2 * 1024 * 1024) + b"\n\n")
    else:
        await resp.write(data_event({"error": {"message": "the model crashed mid-stream", "type": "server_error"}}))
    await resp.write(DONE_EVENT)
    await resp.write_eof()
    return resp


def _chat_completion(
    head: dict[str, Any], n: int, finish_reason: str, usage: dict[str, Any] | None
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
        self, head: dict[str, Any], n: int, finish_reason: str, usage: dict[str, Any] | None
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
        template = orjson.dumps(self._chunk({"content": SENTINEL}, None))
        prefix, _, suffix = template.rpartition(SENTINEL_JSON)
        return b"data: " + prefix, suffix + b"\n\n"

    async def send(self, request: web.Request, faults: Faults) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        await resp.write(data_event(self._chunk({"role": "assistant", "content": ""}, None)))
        await self._send_content(request, resp, faults)
        await resp.write(data_event(self._chunk({}, self.finish_reason)))
        if self.usage is not None:
            await resp.write(data_event({**self.base, "choices": [], "usage": self.usage}))
        await resp.write(DONE_EVENT)
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
            elif not i and faults.first_token_delay_ms:
                await asyncio.sleep(faults.first_token_delay_ms / 1000)
            await resp.write(self.prefix + token_json(i, self.n) + self.suffix)
        if cut is not None:
            if request.transport is not None:
                request.transport.close()
            raise StreamCut(resp)


def _chat_script(body: dict[str, Any], messages: list[Any]) -> Script | None:
    """Chat: a tool call when tools are offered and the user spoke last; text after a tool result. System
    messages after the last turn (agents append reminders) do not change who spoke last."""
    turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))]
    last = turns[-1] if turns else None
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
    return tool_call_script(named, user_request(messages))


def _chat_tool_call(script: Script, call_id: str) -> dict[str, Any]:
    function = {"name": script.tool_name, "arguments": script.arguments}
    return {"id": call_id, "type": "function", "function": function}


def _chat_script_completion(
    head: dict[str, Any], script: Script, usage: dict[str, Any] | None
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
    usage: dict[str, Any] | None,
    faults: Faults,
) -> web.StreamResponse:
    """Stream a scripted reply as OpenAI does: text deltas, or one tool call whose first delta carries
    index, id and name and whose arguments follow in pieces."""
    base = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return data_event({**base, "choices": [choice], **({"usage": None} if usage else {})})

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
        tail.append(data_event({**base, "choices": [], "usage": usage}))
    tail.append(DONE_EVENT)
    return await send_events(
        request, [chunk({"role": "assistant", "content": None})], body, tail, faults
    )


# --------------------------------------------------------------------------- embeddings


def _embedding_inputs(raw: Any) -> list[tuple[bytes, int]]:
    """Normalise `input` to (hash key, token count) pairs; token ids count one token each."""
    if isinstance(raw, str):
        return [(raw.encode(), count_tokens(raw))]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, str) for x in raw):
            return [(x.encode(), count_tokens(x)) for x in raw]
        if all(is_int(x) for x in raw):
            return [(orjson.dumps(raw), len(raw))]
        if all(isinstance(x, list) and x and all(is_int(y) for y in x) for x in raw):
            return [(orjson.dumps(x), len(x)) for x in raw]
    message = "'input' must be a string, an array of strings or an array of token arrays."
    raise ApiError(400, message, param="input")


def embedding_vector(key: bytes, dim: int) -> array[float]:
    """Deterministic float32 vector in [-1, 1] expanded from sha256(key)."""
    seed = hashlib.sha256(key).digest()
    blocks = [seed]
    extra = range(1, (dim * 4 + 31) // 32)
    blocks.extend(hashlib.sha256(seed + struct.pack("<I", i)).digest() for i in extra)
    ints = struct.unpack(f"<{dim}I", b"".join(blocks)[: dim * 4])
    return array("f", [v * U32_TO_UNIT - 1.0 for v in ints])


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
    if not is_int(dims) or not 1 <= dims <= MAX_EMBEDDING_DIM:
        message = f"Invalid 'dimensions': expected 1..{MAX_EMBEDDING_DIM}."
        raise ApiError(400, message, param="dimensions")
    return dims


async def embeddings(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """POST /v1/embeddings."""
    body = require_object(body)
    model = require_model(body)
    inputs = _embedding_inputs(body.get("input"))
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        message = "'encoding_format' must be 'float' or 'base64'."
        raise ApiError(400, message, param="encoding_format")
    dim = _embedding_dim(body, state.config.embedding_dim)
    count_model(state.stats, model)
    faults = state.faults_for(model)
    replacement = await apply_faults(request, state, faults)
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
    return json_response(payload)


# --------------------------------------------------------------------------- models, health, hooks


async def list_models(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """GET /v1/models: the default model plus every model with its own faults."""
    names = [MOCK_MODEL, *sorted(m for m in state.per_model if m != MOCK_MODEL)]
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "tokensforge-mock"} for m in names
    ]
    return json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _faults_json(state: MockState) -> dict[str, Any]:
    return {
        "default": dataclasses.asdict(state.default),
        "per_model": {m: dataclasses.asdict(f) for m, f in state.per_model.items()},
    }


async def set_faults(request: web.Request) -> web.Response:
    """POST /_mock/faults: replace default and per-model faults so a test can change behaviour."""
    state = request.app[STATE_KEY]
    body = parse_body(await request.read())
    try:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        default = faults_from_dict(body.get("default") or {})
        per_model = per_model_from_dict(body.get("per_model") or {})
    except (ValueError, TypeError) as exc:
        return ApiError(400, str(exc)).response()
    state.replace_faults(default, per_model)
    return json_response(_faults_json(state))


async def get_stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE_KEY].stats.to_json())


async def reset_stats(request: web.Request) -> web.Response:
    """POST /_mock/reset: zero the stats, forget every prompt cache and stored response (tests start clean)."""
    stats = request.app[STATE_KEY].stats
    stats.reset()
    request.app[CACHE_KEY].clear()
    request.app[RESPONSES_KEY].clear()
    return json_response(stats.to_json())


async def reset_cache(request: web.Request) -> web.Response:
    """POST /_mock/cache/reset: forget every cached prompt prefix, keep the stats."""
    request.app[CACHE_KEY].clear()
    return json_response({"entries": 0})


async def advance_cache_clock(request: web.Request) -> web.Response:
    """POST /_mock/cache/advance {"seconds": N}: move the caches' clock forward so TTLs can expire."""
    body = parse_body(await request.read())
    seconds = body.get("seconds") if isinstance(body, dict) else None
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
        return ApiError(400, "'seconds' must be a number >= 0.").response()
    cache = request.app[CACHE_KEY]
    cache.skew_s += seconds
    return json_response({"entries": len(cache), "skew_s": cache.skew_s})


def create_app(config: MockConfig | None = None) -> web.Application:
    """Build the mock upstream application; each app has its own state and seeded RNG."""
    app = web.Application()
    app[STATE_KEY] = MockState(config or MockConfig())
    app[CACHE_KEY] = PromptCache()
    app[RESPONSES_KEY] = ResponseStore()
    app.router.add_post("/v1/chat/completions", endpoint(chat_completions))
    app.router.add_post("/v1/embeddings", endpoint(embeddings))
    app.router.add_post("/v1/responses", endpoint(responses))
    app.router.add_get("/v1/responses/{response_id}", endpoint(get_response))
    app.router.add_delete("/v1/responses/{response_id}", endpoint(delete_response))
    app.router.add_post("/v1/messages", endpoint(messages, anthropic=True))
    app.router.add_post(
        "/v1/messages/count_tokens", endpoint(count_message_tokens, anthropic=True)
    )
    app.router.add_get("/v1/models", endpoint(list_models))
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/_mock/faults", set_faults)
    app.router.add_get("/_mock/stats", get_stats)
    app.router.add_post("/_mock/reset", reset_stats)
    app.router.add_post("/_mock/cache/reset", reset_cache)
    app.router.add_post("/_mock/cache/advance", advance_cache_clock)
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
    parser.add_argument("--cache-min-tokens", type=int, default=1024,
                        help="smallest prompt prefix the simulated prompt caches keep")  # fmt: skip
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
        cache_min_tokens=getattr(args, "cache_min_tokens", 1024),
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
