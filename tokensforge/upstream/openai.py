"""Upstream codec for `kind = "openai"` channels (any OpenAI-compatible chat API), pure.

A request that arrived as OpenAI chat is forwarded as the client sent it (unknown fields
intact) with only what the gateway owns rewritten: the model, the output cap it reserved
for, and `stream_options.include_usage`. Other dialects are encoded from the canonical
request. Answers are validated into canonical types; anything off-shape is a
`MalformedUpstream` (an upstream failure: retried where the route allows, never billed).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..canonical import (
    Choice,
    Finish,
    Frame,
    MalformedUpstream,
    MediaPart,
    Message,
    Request,
    Response,
    StreamEvent,
    TextDelta,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolResult,
    UpstreamFailure,
    Usage,
    UsageReport,
    token_count,
)
from ..errors import InvalidRequest

PATH = "/chat/completions"
CAP_FIELDS = ("max_completion_tokens", "max_tokens")


def build(req: Request, upstream_model: str) -> bytes:
    """The body to POST to {base_url}/chat/completions: a chat client's own body, or one translated from
    another dialect (what it cannot carry is noted: "dropped: thinking blocks")."""
    if req.raw is not None and req.dialect == "openai_chat":
        body = dict(req.raw)
    else:
        body = _encode(req)
        note_untranslatable(req)
    body["model"] = upstream_model
    if req.max_output_tokens is not None:  # exactly the cap the reservation covers
        name = next((f for f in CAP_FIELDS if f in body), "max_completion_tokens")
        for field in CAP_FIELDS:
            body.pop(field, None)
        body[name] = req.max_output_tokens
    if req.stream:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True  # settlement needs the upstream's own count
        body["stream_options"] = options
        body["stream"] = True
    return orjson.dumps(body)


def note_untranslatable(req: Request) -> None:
    """A translated request loses what the canonical request could not carry: say so in its notes."""
    for name in req.untranslatable:
        note = f"dropped: {name}"
        if note not in req.notes:
            req.notes.append(note)


def _encode(req: Request) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "messages": [m for msg in req.messages for m in _message(msg)]}
    if req.stream:
        body["stream"] = True
    if req.n != 1:
        body["n"] = req.n
    if req.tools:
        body["tools"] = [{"type": "function", "function": _drop_none({
            "name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict})}
            for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                               if choice.mode == "function" else choice.mode)
    optional = {"parallel_tool_calls": req.parallel_tool_calls, "temperature": req.temperature,
                "top_p": req.top_p, "metadata": req.metadata, "user": req.user,
                "response_format": req.response_format, "stop": list(req.stop) or None}
    body.update(_drop_none(optional))
    if req.reasoning and req.reasoning.get("effort"):
        body["reasoning_effort"] = req.reasoning["effort"]
    return body


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _message(msg: Message) -> list[dict[str, Any]]:
    """One canonical message as OpenAI chat messages (tool results are one message each)."""
    if msg.role == "tool":
        return [{"role": "tool", "tool_call_id": p.call_id, "content": p.content}
                for p in msg.parts if isinstance(p, ToolResult)]
    calls = [p for p in msg.parts if isinstance(p, ToolCall)]
    content: Any
    if any(isinstance(p, MediaPart) for p in msg.parts):
        content = [_content_part(p) for p in msg.parts if isinstance(p, (TextPart, MediaPart))]
    else:
        content = msg.text()
    out: dict[str, Any] = {"role": msg.role, "content": content if content or not calls else None}
    if calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in calls]
    results = [{"role": "tool", "tool_call_id": p.call_id, "content": p.content}
               for p in msg.parts if isinstance(p, ToolResult)]
    return [out, *results]


def _content_part(part: TextPart | MediaPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    url = part.url or f"data:{part.media_type or 'application/octet-stream'};base64,{part.data_b64 or ''}"
    if part.kind == "file":
        if not url.startswith("data:"):  # chat completions takes documents inline only
            raise InvalidRequest("this route's upstream takes documents inline only (base64), not by URL",
                                 param="messages")
        filename = "document.pdf" if url.startswith("data:application/pdf") else "document"
        return {"type": "file", "file": {"filename": filename, "file_data": url}}
    image: dict[str, Any] = {"url": url}
    if part.detail:
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


# ------------------------------------------------------------------ answers


def error_in(data: dict[str, Any]) -> str | None:
    """A 200 that carries `error` and no choices is a failure, whatever its status line said."""
    if "error" in data and not data.get("choices") and data.get("object") != "list":
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else error
        return str(message)[:500] if message else "the upstream answered with an error"
    return None


def usage_of(payload: Any) -> Usage | None:
    """An OpenAI chat `usage` object → canonical classes, or None if its totals are not sane counts.

    `prompt_tokens` is all input and `completion_tokens` all output: `prompt_tokens_details.cached_tokens`
    (cache reads) and `completion_tokens_details.reasoning_tokens` are parts of them, never added on top.
    Cache writes — `prompt_tokens_details.cache_write_tokens` (OpenAI's newer models, OpenRouter) or a
    top-level `cache_creation_input_tokens` (LiteLLM in front of Anthropic) — are parts of `prompt_tokens`
    too, as those APIs document (5-minute class: chat's shape has no TTL). Parts are clamped into the total,
    reads first, so no class goes negative and a relay that counted writes apart is at worst billed them
    at the input price — never twice."""
    if not isinstance(payload, dict):
        return None
    prompt = token_count(payload.get("prompt_tokens"))
    completion = token_count(payload.get("completion_tokens", 0))
    if prompt is None or completion is None:
        return None
    details = _details(payload, "prompt_tokens_details")
    cached = _part(details, "cached_tokens")
    if cached is None:
        cached = _part(payload, "cache_read_input_tokens")  # LiteLLM's Anthropic pass-through
    written = _part(details, "cache_write_tokens")
    if written is None:
        written = _part(payload, "cache_creation_input_tokens")
    return split_input(prompt, completion, cached or 0, written or 0,
                       _part(_details(payload, "completion_tokens_details"), "reasoning_tokens") or 0)


def split_input(prompt: int, output: int, cache_read: int, cache_write: int, reasoning: int,
                cache_write_long: int = 0) -> Usage:
    """Totals with their reported parts → canonical, each part clamped into what is left of its total (the
    shape OpenAI's chat and Responses usage share: cached tokens inside the input count). `cache_write_long`
    is the part of the writes made with the long retention (billed in the 1-hour class)."""
    cache_read = min(cache_read, prompt)
    cache_write = min(cache_write, prompt - cache_read)
    long = min(cache_write_long, cache_write)
    return Usage(prompt, output, cache_read_tokens=cache_read, cache_write_tokens=cache_write - long,
                 cache_write_1h_tokens=long, reasoning_tokens=min(reasoning, output))


def _details(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload.get(key)
    return value if isinstance(value, dict) else {}


def _part(payload: dict[str, Any], key: str) -> int | None:
    """An optional part count: None when absent, null or not a sane count (then it is not trusted)."""
    return token_count(payload.get(key))


def parse_response(data: dict[str, Any]) -> Response:
    """A chat.completion body → canonical (the raw body is kept for OpenAI-chat clients)."""
    problem = error_in(data)
    if problem is not None:
        raise MalformedUpstream(f"the upstream answered 200 with an error: {problem}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedUpstream("the upstream answer has no choices")
    parsed = [_choice(i, c) for i, c in enumerate(choices)]
    model = data.get("model")
    return Response(model if isinstance(model, str) else "", parsed, usage_of(data.get("usage")), raw=data)


def _choice(position: int, raw: Any) -> Choice:
    if not isinstance(raw, dict) or not isinstance(raw.get("message"), dict):
        raise MalformedUpstream("an upstream choice has no message object")
    message = raw["message"]
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedUpstream("an upstream message content is not a string")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise MalformedUpstream("upstream tool_calls is not a list")
    index = raw.get("index", position)
    finish = raw.get("finish_reason")
    refusal = message.get("refusal")
    return Choice(index if type(index) is int else position, content, tuple(_tool_call(c) for c in calls),
                  finish if isinstance(finish, str) else None, refusal if isinstance(refusal, str) else None)


def _tool_call(raw: Any) -> ToolCall:
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise MalformedUpstream("an upstream tool call has no function name")
    arguments = function.get("arguments")
    call_id = raw.get("id")
    return ToolCall(call_id if isinstance(call_id, str) else "", function["name"],
                    arguments if isinstance(arguments, str) else "")


class StreamDecoder:
    """chat.completion.chunk events → frames (the chunk itself rides along for OpenAI-chat clients)."""

    def feed(self, event: str | None, data: bytes) -> Frame | None:
        """None for `[DONE]`; raises MalformedUpstream on anything that is not a sane chunk."""
        if data == b"[DONE]":
            return None
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedUpstream("the upstream sent an event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise MalformedUpstream("the upstream sent an event that is not a JSON object")
        choices = chunk.get("choices")
        # the common chunk — one choice at index 0 with plain text or nothing, unfinished, no usage, no error —
        # checked field by field as _chunk_events would, without its lists; anything else takes that path
        if type(choices) is list and len(choices) == 1 and chunk.get("usage") is None and "error" not in chunk:
            choice = choices[0]
            if type(choice) is dict and choice.get("finish_reason") is None:
                index = choice.get("index", 0)
                delta = choice.get("delta") or {}
                if type(index) is int and index == 0 and type(delta) is dict and delta.get("tool_calls") is None:
                    content = delta.get("content")
                    if content is None or type(content) is str:
                        return Frame((TextDelta(content, 0),) if content else (), chunk)
        if "error" in chunk and not chunk.get("choices"):
            problem = error_in(chunk) or "the upstream reported an error mid-stream"
            return Frame((UpstreamFailure(problem),), chunk)
        events: list[StreamEvent] = []
        choices = chunk.get("choices")
        if choices is not None:
            if not isinstance(choices, list):
                raise MalformedUpstream("upstream chunk choices is not a list")
            for choice in choices:
                events.extend(_chunk_events(choice))
        if chunk.get("usage") is not None:
            usage = usage_of(chunk["usage"])
            if usage is not None:
                events.append(UsageReport(usage))
        return Frame(tuple(events), chunk)


def _chunk_events(choice: Any) -> list[StreamEvent]:
    if not isinstance(choice, dict):
        raise MalformedUpstream("an upstream chunk choice is not an object")
    index = choice.get("index", 0)
    if type(index) is not int or not 0 <= index < 128:
        raise MalformedUpstream("an upstream chunk choice has a bad index")
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise MalformedUpstream("an upstream chunk delta is not an object")
    events: list[StreamEvent] = []
    content = delta.get("content")
    if content is not None:
        if not isinstance(content, str):
            raise MalformedUpstream("an upstream chunk content is not a string")
        if content:
            events.append(TextDelta(content, index))
    calls = delta.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise MalformedUpstream("upstream chunk tool_calls is not a list")
        for call in calls:
            events.append(_call_delta(call, index))
    finish = choice.get("finish_reason")
    if finish is not None:
        if not isinstance(finish, str):
            raise MalformedUpstream("an upstream finish_reason is not a string")
        events.append(Finish(finish, index))
    return events


def _call_delta(call: Any, choice: int) -> ToolCallDelta:
    if not isinstance(call, dict):
        raise MalformedUpstream("an upstream tool call delta is not an object")
    function = call.get("function") or {}
    position = call.get("index", 0)
    if not isinstance(function, dict) or type(position) is not int or not 0 <= position < 1024:
        raise MalformedUpstream("an upstream tool call delta is malformed")
    name, arguments, call_id = function.get("name"), function.get("arguments") or "", call.get("id")
    if not isinstance(arguments, str) or (name is not None and not isinstance(name, str)) or (
            call_id is not None and not isinstance(call_id, str)):
        raise MalformedUpstream("an upstream tool call delta is malformed")
    return ToolCallDelta(position, arguments, call_id, name, choice)
