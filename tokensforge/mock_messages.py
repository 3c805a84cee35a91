"""The simulated Anthropic Messages endpoint: replies, scripted tool turns, prompt caching at
`cache_control` markers and signed extended thinking, unary and streamed as Anthropic sends them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .mock_cache import (
    CACHE_KEY,
    CacheMarkerError,
    CacheUse,
    anthropic_units,
    boundaries,
    scope_of,
)
from .mock_core import (
    credential_of,
    DEFAULT_COMPLETION_TOKENS,
    MAX_COMPLETION_TOKENS,
    TOOL_RESULT_PREFIX,
    WORD_RE,
    ApiError,
    Faults,
    MockState,
    Script,
    anthropic_prompt_tokens,
    apply_faults,
    count_model,
    count_tokens,
    is_int,
    json_response,
    reply_text,
    require_model,
    require_object,
    send_events,
    sse,
    text_of,
    tool_call_script,
    user_request,
)
from .mock_thinking import ThinkingError, check_thinking_blocks, sign, thinking_budget, thinking_text


def _messages_script(body: dict[str, Any], messages: list[Any]) -> Script | None:
    """Messages: text quoting the results when the user's last turn returns tool results; a tool call
    when tools are offered and the user spoke last (system turns an agent appends do not count)."""
    turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    last = turns[-1] if turns else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    results = (
        [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if isinstance(content, list)
        else []
    )
    if results:
        return Script(text=TOOL_RESULT_PREFIX + " ".join(text_of(b.get("content")) for b in results))
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or not isinstance(tools, list) or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    named = [(t["name"], t.get("input_schema"))
             for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    return tool_call_script(named, user_request(messages))


def _messages_request(body: Any) -> tuple[dict[str, Any], str, int, list[Any]]:
    body = require_object(body)
    model = require_model(body)
    max_tokens = body.get("max_tokens")
    if not is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, "max_tokens: Field required (an integer >= 1)", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: Field required (a non-empty array)", param="messages")
    return body, model, max_tokens, messages


@dataclass(frozen=True)
class _Reply:
    """What the model says: optional signed thinking, then text or one tool call."""

    script: Script
    thinking: str | None
    signature: str
    output_tokens: int
    stop_reason: str


def _plan_reply(
    body: dict[str, Any], turns: list[Any], max_tokens: int, budget: int | None, state: MockState, faults: Faults
) -> _Reply:
    """Thinking first (within its budget), then the answer in what max_tokens leaves."""
    thinking, signature, thought = None, "", 0
    if budget is not None:
        last = turns[-1].get("content") if isinstance(turns[-1], dict) else None
        thinking = thinking_text(text_of(last), min(state.config.thinking_tokens, budget))
        signature = sign(state.config.thinking_secret, thinking)
        thought = count_tokens(thinking)
    room = max(max_tokens - thought, 1)
    script = _messages_script(body, turns)
    if script is not None:
        n = min(script.tokens, room)
        stop_reason = "tool_use" if script.tool_name is not None else "end_turn"
    elif faults.completion_tokens is not None:
        n, stop_reason = min(max(faults.completion_tokens, 0), MAX_COMPLETION_TOKENS), "end_turn"
    else:
        n = min(DEFAULT_COMPLETION_TOKENS, room)
        stop_reason = "max_tokens" if room < DEFAULT_COMPLETION_TOKENS else "end_turn"
    return _Reply(script or Script(text=reply_text(n)), thinking, signature, thought + n, stop_reason)


def _validate(body: dict[str, Any], turns: list[Any], max_tokens: int, state: MockState) -> int | None:
    """Thinking settings and returned thinking blocks as Anthropic checks them; the budget or None."""
    try:
        budget = thinking_budget(body, max_tokens)
        check_thinking_blocks(turns, state.config.thinking_secret, budget is not None)
    except ThinkingError as exc:
        raise ApiError(400, str(exc)) from exc
    return budget


def _cache_use(request: web.Request, state: MockState, model: str, body: dict[str, Any]) -> CacheUse:
    """Read and write this request's marked prefixes in the cache of (model, credential)."""
    try:
        units = anthropic_units(body)
    except CacheMarkerError as exc:
        raise ApiError(400, str(exc)) from exc
    if all(u.marker_ttl_s is None for u in units):
        return CacheUse()
    credential = credential_of(request)
    bounds = boundaries(scope_of("messages", model, credential), units)
    return request.app[CACHE_KEY].anthropic(bounds, state.config.cache_min_tokens)


def anthropic_usage(prompt_tokens: int, use: CacheUse, output_tokens: int) -> dict[str, Any]:
    """Usage as Anthropic reports it: input_tokens is only the fresh part; cache reads and writes apart."""
    written = use.write_5m_tokens + use.write_1h_tokens
    return {
        "input_tokens": prompt_tokens - use.read_tokens - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": use.read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": use.write_5m_tokens,
            "ephemeral_1h_input_tokens": use.write_1h_tokens,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


async def messages(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """POST /v1/messages (Anthropic): a reply of min(16, max_tokens) tokens or a scripted tool turn,
    after signed thinking when `thinking` is on; usage truthful to the prompt cache."""
    body, model, max_tokens, turns = _messages_request(body)
    budget = _validate(body, turns, max_tokens, state)
    count_model(state.stats, model)
    faults = state.faults_for(model)
    reply = _plan_reply(body, turns, max_tokens, budget, state, faults)
    replacement = await apply_faults(request, state, faults)
    if replacement is not None:
        return replacement
    use = _cache_use(request, state, model, body)
    message_id = f"msg_mock_{next(state.ids)}"
    usage = None if faults.no_usage else anthropic_usage(anthropic_prompt_tokens(body), use, reply.output_tokens)
    content = _content(message_id, reply)
    if body.get("stream") is True:
        return await _send_messages_stream(request, message_id, model, content, reply.stop_reason, usage, faults)
    payload: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": reply.stop_reason, "stop_sequence": None,
    }  # fmt: skip
    if usage is not None:
        payload["usage"] = usage
    return json_response(payload)


def _content(message_id: str, reply: _Reply) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if reply.thinking is not None:
        content.append({"type": "thinking", "thinking": reply.thinking, "signature": reply.signature})
    script = reply.script
    if script.tool_name is None:
        content.append({"type": "text", "text": script.text})
    else:
        tool_id = message_id.replace("msg", "toolu")
        tool = {"type": "tool_use", "id": tool_id, "name": script.tool_name, "input": orjson.loads(script.arguments)}
        content.append(tool)
    return content


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    """content_block_start, its deltas and content_block_stop for one finished content block."""
    kind = block["type"]
    start: dict[str, Any]
    if kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": p} for p in WORD_RE.findall(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in WORD_RE.findall(block["text"])]
    else:
        start = {**block, "input": {}}
        arguments = Script(tool_name=block["name"], arguments=orjson.dumps(block["input"]).decode())
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in arguments.argument_chunks()]
    events = [sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})]
    events += [sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
    events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


async def _send_messages_stream(
    request: web.Request,
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str,
    usage: dict[str, Any] | None,
    faults: Faults,
) -> web.StreamResponse:
    """Stream as Anthropic does: message_start (input side of usage), each content block (thinking_delta
    pieces and a signature_delta; text_delta or input_json_delta pieces), message_delta with stop_reason
    and the final counts, message_stop. A cut fault counts the events after the first block's start."""
    message: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
    }  # fmt: skip
    if usage is not None:
        message["usage"] = {**usage, "output_tokens": 1}
    events = [e for i, block in enumerate(content) for e in _block_events(i, block)]
    start = sse("message_start", {"type": "message_start", "message": message})
    head = [start, events[0], sse("ping", {"type": "ping"})]
    delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}}
    if usage is not None:
        keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
        delta["usage"] = {k: usage[k] for k in keys}
    tail = [events[-1], sse("message_delta", delta), sse("message_stop", {"type": "message_stop"})]
    return await send_events(request, head, events[1:-1], tail, faults)


async def count_message_tokens(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """POST /v1/messages/count_tokens (Anthropic)."""
    body = require_object(body)
    require_model(body)
    if not isinstance(body.get("messages"), list):
        raise ApiError(400, "messages: Field required", param="messages")
    return json_response({"input_tokens": anthropic_prompt_tokens(body)})
