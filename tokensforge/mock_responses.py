"""The simulated OpenAI Responses API: `POST /v1/responses` (unary and streamed), stored responses
with `previous_response_id`, scripted function calls, reasoning items (with encrypted_content when
asked) and automatic prompt caching, answered in OpenAI's own shapes so the openai SDK reads them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .mock_cache import CACHE_KEY, Unit, boundaries, openai_scope, openai_ttl_s
from .mock_core import (
    credential_of,
    DEFAULT_COMPLETION_TOKENS,
    MAX_COMPLETION_TOKENS,
    PER_MESSAGE_TOKENS,
    TOOL_RESULT_PREFIX,
    WORD_RE,
    ApiError,
    Faults,
    MockState,
    Script,
    apply_faults,
    count_model,
    count_tokens,
    is_int,
    json_response,
    reply_text,
    require_model,
    require_object,
    send_events,
    tool_call_script,
)
from .mock_thinking import REASONING_TOKENS_BY_EFFORT, encrypt_reasoning, reasoning_verifies, thinking_text

MIN_OUTPUT_TOKENS = 16
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text")


@dataclass
class ResponseStore:
    """Stored responses (store defaults to true): the payload and the whole conversation it ends."""

    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    contexts: dict[str, list[Any]] = field(default_factory=dict)

    def clear(self) -> None:
        self.payloads.clear()
        self.contexts.clear()


RESPONSES_KEY = web.AppKey("tokensforge_mock_responses", ResponseStore)


@dataclass(frozen=True)
class _Request:
    model: str
    items: list[Any]  # the whole context: the previous response's, then this input
    instructions: str | None
    cap: int | None
    effort: str | None
    encrypted: bool
    store: bool


# --------------------------------------------------------------------------- request


def _text_of_parts(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(
        p["text"]
        for p in content
        if isinstance(p, dict) and p.get("type") in _TEXT_PARTS and isinstance(p.get("text"), str)
    )


def item_tokens(item: Any) -> int:
    """Input tokens of one item: its texts (message parts, call name and arguments, call output,
    reasoning summary) plus the per-message overhead; images are free as in the chat counting."""
    if not isinstance(item, dict):
        return PER_MESSAGE_TOKENS
    kind = item.get("type", "message")
    if kind == "message":
        text = _text_of_parts(item.get("content"))
    elif kind == "function_call":
        text = str(item.get("name", "")) + str(item.get("arguments", ""))
    elif kind == "function_call_output":
        text = _text_of_parts(item.get("output"))
    elif kind == "reasoning":
        text = _text_of_parts(item.get("summary"))
    else:
        text = ""
    return count_tokens(text) + PER_MESSAGE_TOKENS


def _input_items(raw: Any) -> list[Any]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise ApiError(400, "Invalid type for 'input': expected a string or an array of input items.", param="input")
    return raw


def _check_reasoning_items(items: list[Any], secret: bytes) -> None:
    """encrypted_content must come back exactly as this upstream issued it."""
    for item in items:
        if isinstance(item, dict) and item.get("type") == "reasoning" and item.get("encrypted_content") is not None:
            blob = item["encrypted_content"]
            if not isinstance(blob, str) or not reasoning_verifies(secret, blob):
                message = f"The encrypted content for item {item.get('id')} could not be verified."
                raise ApiError(400, message, param="input")


def _parse(body: Any, store: ResponseStore, secret: bytes) -> _Request:
    body = require_object(body)
    model = require_model(body)
    items = _input_items(body.get("input"))
    previous = body.get("previous_response_id")
    context: list[Any] = []
    if previous is not None:
        if not isinstance(previous, str) or previous not in store.contexts:
            raise ApiError(400, f"Previous response with id '{previous}' not found.", param="previous_response_id")
        context = store.contexts[previous]
    cap = body.get("max_output_tokens")
    if cap is not None and (not is_int(cap) or cap < MIN_OUTPUT_TOKENS):
        message = f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= {MIN_OUTPUT_TOKENS}."
        raise ApiError(400, message, param="max_output_tokens")
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None and effort not in REASONING_TOKENS_BY_EFFORT:
        raise ApiError(400, f"Invalid value for 'reasoning.effort': {effort!r}.", param="reasoning.effort")
    include = body.get("include")
    instructions = body.get("instructions")
    _check_reasoning_items(items, secret)
    return _Request(
        model=model,
        items=[*context, *items],
        instructions=instructions if isinstance(instructions, str) and instructions else None,
        cap=cap,
        effort=effort if effort != "none" else None,
        encrypted=isinstance(include, list) and "reasoning.encrypted_content" in include,
        store=body.get("store") is not False,
    )


def _script(body: dict[str, Any], items: list[Any]) -> Script | None:
    """Like chat: text quoting a function's output when one came last; a call when function tools
    are offered and the user spoke last (system and developer messages after it do not count)."""
    turns = [i for i in items if not (isinstance(i, dict) and i.get("role") in ("system", "developer"))]
    last = turns[-1] if turns else None
    if not isinstance(last, dict):
        return None
    if last.get("type") == "function_call_output":
        return Script(text=TOOL_RESULT_PREFIX + _text_of_parts(last.get("output")))
    tools = body.get("tools")
    if last.get("type", "message") != "message" or last.get("role") != "user" or body.get("tool_choice") == "none":
        return None
    functions = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    named = [
        (t["name"], t.get("parameters"))
        for t in functions
        if t.get("type") == "function" and isinstance(t.get("name"), str)
    ]
    return tool_call_script(named, _text_of_parts(last.get("content")))


# --------------------------------------------------------------------------- reply


@dataclass(frozen=True)
class _Plan:
    reasoning_tokens: int
    script: Script | None  # None: nothing fits after the reasoning
    output_tokens: int
    incomplete: bool


def _plan(body: dict[str, Any], req: _Request, faults: Faults) -> _Plan:
    """Reasoning first, then the answer in what max_output_tokens leaves; hitting the cap is "incomplete"."""
    cap = req.cap if req.cap is not None else MAX_COMPLETION_TOKENS
    reasoning = REASONING_TOKENS_BY_EFFORT[req.effort] if req.effort else 0
    if reasoning >= cap:
        return _Plan(cap, None, cap, True)
    room = cap - reasoning
    script = _script(body, req.items)
    if script is None:
        n = DEFAULT_COMPLETION_TOKENS
        if faults.completion_tokens is not None:
            n = min(max(faults.completion_tokens, 0), MAX_COMPLETION_TOKENS)
        script = Script(text=reply_text(min(n, room)))
        return _Plan(reasoning, script, reasoning + min(n, room), n > room)
    if script.tokens <= room:
        return _Plan(reasoning, script, reasoning + script.tokens, False)
    if script.tool_name is not None:
        return _Plan(reasoning, None, cap, True)  # the call was cut off: no usable item
    return _Plan(reasoning, Script(text=script.text[: room * 4]), cap, True)


def _output(state: MockState, req: _Request, plan: _Plan, n: int) -> list[dict[str, Any]]:
    """Output items: a reasoning item when reasoning ran, then a message or a function call."""
    output: list[dict[str, Any]] = []
    if plan.reasoning_tokens:
        item: dict[str, Any] = {"id": f"rs_mock_{n}", "type": "reasoning", "summary": []}
        if req.encrypted:
            text = thinking_text(str(req.items[-1])[:64] if req.items else "", plan.reasoning_tokens)
            item["encrypted_content"] = encrypt_reasoning(state.config.thinking_secret, item["id"], text)
        output.append(item)
    script = plan.script
    if script is None:
        return output
    if script.tool_name is not None:
        output.append({
            "id": f"fc_mock_{n}", "type": "function_call", "status": "completed", "arguments": script.arguments,
            "call_id": f"call_mock_{n}", "name": script.tool_name,
        })  # fmt: skip
    else:
        part = {"type": "output_text", "text": script.text, "annotations": [], "logprobs": []}
        status = "incomplete" if plan.incomplete else "completed"
        message = {"id": f"msg_mock_{n}", "type": "message", "status": status, "role": "assistant"}
        output.append({**message, "content": [part]})
    return output


def _usage(prompt: int, cached: int, plan: _Plan, faults: Faults) -> dict[str, Any] | None:
    if faults.no_usage:
        return None
    if faults.absurd_usage:
        prompt = 2**60
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": prompt + plan.output_tokens,
    }


def _units(req: _Request) -> list[Unit]:
    units = []
    if req.instructions is not None:
        tokens = count_tokens(req.instructions) + PER_MESSAGE_TOKENS
        units.append(Unit(b"instructions\x00" + req.instructions.encode(), tokens))
    units += [Unit(orjson.dumps(item, option=orjson.OPT_SORT_KEYS), item_tokens(item)) for item in req.items]
    return units


def _cached_tokens(request: web.Request, state: MockState, body: dict[str, Any], units: list[Unit], prompt: int) -> int:
    config = state.config
    if prompt < config.cache_min_tokens:
        return 0
    credential = credential_of(request)
    bounds = boundaries(openai_scope("responses", str(body["model"]), credential, body), units)
    ttl_s = openai_ttl_s(body, config.openai_cache_ttl_s)
    return request.app[CACHE_KEY].openai(bounds, config.cache_min_tokens, config.cache_quantum_tokens, ttl_s)


def _payload(body: dict[str, Any], req: _Request, rid: str, output: list[Any], plan: _Plan) -> dict[str, Any]:
    """The Response object with the fields the openai SDK and real clients read."""
    tools = body.get("tools")
    return {
        "id": rid, "object": "response", "created_at": int(time.time()),
        "status": "incomplete" if plan.incomplete else "completed", "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if plan.incomplete else None,
        "instructions": req.instructions, "max_output_tokens": req.cap, "model": req.model, "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": req.effort, "summary": None}, "store": req.store,
        "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"), "tools": tools if isinstance(tools, list) else [],
        "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": None,
        "user": None, "metadata": body.get("metadata") or {},
    }  # fmt: skip


async def responses(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """POST /v1/responses."""
    store = request.app[RESPONSES_KEY]
    req = _parse(body, store, state.config.thinking_secret)
    count_model(state.stats, req.model)
    faults = state.faults_for(req.model)
    plan = _plan(body, req, faults)
    replacement = await apply_faults(request, state, faults)
    if replacement is not None:
        return replacement
    units = _units(req)
    prompt = sum(u.tokens for u in units)
    cached = _cached_tokens(request, state, body, units, prompt)
    n = next(state.ids)
    output = _output(state, req, plan, n)
    payload = _payload(body, req, f"resp_mock_{n}", output, plan)
    payload["usage"] = _usage(prompt, cached, plan, faults)
    if req.store:
        store.payloads[payload["id"]] = payload
        store.contexts[payload["id"]] = [*req.items, *output]
    if body.get("stream") is True:
        return await _send_stream(request, payload, faults)
    return json_response(payload)


# --------------------------------------------------------------------------- streaming


def _item_events(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    """output_item.added, the item's parts and deltas, output_item.done — as OpenAI orders them."""
    kind = item["type"]
    where = {"item_id": item["id"], "output_index": index}
    if kind == "reasoning":
        added = {k: v for k, v in item.items() if k != "encrypted_content"}
        return [{"type": "response.output_item.added", "output_index": index, "item": added},
                {"type": "response.output_item.done", "output_index": index, "item": item}]  # fmt: skip
    if kind == "function_call":
        added = {**item, "arguments": "", "status": "in_progress"}
        arguments = Script(tool_name=item["name"], arguments=item["arguments"]).argument_chunks()
        deltas = [{"type": "response.function_call_arguments.delta", **where, "delta": p} for p in arguments]
        done = {"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"]}
        return [{"type": "response.output_item.added", "output_index": index, "item": added}, *deltas, done,
                {"type": "response.output_item.done", "output_index": index, "item": item}]  # fmt: skip
    part = item["content"][0]
    at = {**where, "content_index": 0}
    empty = {**part, "text": ""}
    pieces = WORD_RE.findall(part["text"])
    deltas = [{"type": "response.output_text.delta", **at, "delta": p, "logprobs": []} for p in pieces]
    return [
        {"type": "response.output_item.added", "output_index": index, "item": {**item, "status": "in_progress",
                                                                                "content": []}},
        {"type": "response.content_part.added", **at, "part": empty},
        *deltas,
        {"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]  # fmt: skip


def _event(seq: int, data: dict[str, Any]) -> bytes:
    data["sequence_number"] = seq
    kind: str = data["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _send_stream(request: web.Request, payload: dict[str, Any], faults: Faults) -> web.StreamResponse:
    """response.created, response.in_progress, each output item's events, then response.completed (or
    response.incomplete) with the whole response; a cut fault counts events from the first delta on."""
    start = {**payload, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    items = [e for i, item in enumerate(payload["output"]) for e in _item_events(i, item)]
    final = "response.incomplete" if payload["status"] == "incomplete" else "response.completed"
    events = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
        *items,
        {"type": final, "response": payload},
    ]
    encoded = [_event(seq, e) for seq, e in enumerate(events)]
    first_delta = next((i for i, e in enumerate(events) if e["type"].endswith(".delta")), len(events) - 1)
    return await send_events(request, encoded[:first_delta], encoded[first_delta:-1], encoded[-1:], faults)


# --------------------------------------------------------------------------- stored responses


async def get_response(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """GET /v1/responses/{id}."""
    payload = request.app[RESPONSES_KEY].payloads.get(request.match_info["response_id"])
    if payload is None:
        raise ApiError(404, f"Response with id '{request.match_info['response_id']}' not found.")
    return json_response(payload)


async def delete_response(request: web.Request, state: MockState, body: Any) -> web.StreamResponse:
    """DELETE /v1/responses/{id}."""
    store = request.app[RESPONSES_KEY]
    rid = request.match_info["response_id"]
    if store.payloads.pop(rid, None) is None:
        raise ApiError(404, f"Response with id '{rid}' not found.")
    store.contexts.pop(rid, None)
    return json_response({"id": rid, "object": "response.deleted", "deleted": True})

