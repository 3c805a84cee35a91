"""Anthropic Messages as an upstream kind: canonical ⇄ `POST {base_url}/messages` (pure; the lead does
the HTTP). `build` writes the body, `parse_response` and `StreamDecoder` read the answer back into
canonical types and raise `MalformedUpstream` on shapes the API never sends."""

from __future__ import annotations

from typing import Any

import orjson

from tokensforge.canonical import (
    Finish,
    Frame,
    MalformedUpstream,
    MediaPart,
    Message,
    Request,
    Response,
    Choice,
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
from tokensforge.errors import InvalidRequest

DEFAULT_VERSION = "2023-06-01"

#: Anthropic stop_reason → OpenAI finish reason
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none", "function": "tool"}


def headers(secret: str | None, version: str, beta: str | None) -> dict[str, str]:
    """Request headers; `beta` is the client's own anthropic-beta header, forwarded as is."""
    out = {"content-type": "application/json", "anthropic-version": version or DEFAULT_VERSION}
    if secret:
        out["x-api-key"] = secret
    if beta:
        out["anthropic-beta"] = beta
    return out


# ------------------------------------------------------------------ request


def build(req: Request, upstream_model: str) -> bytes:
    """The JSON body for `POST {base_url}/messages`; what Messages cannot express is noted in req.notes."""
    if req.n != 1:
        raise InvalidRequest("n: this route's upstream returns one choice; use n = 1", param="n")
    if req.max_output_tokens is None:
        raise InvalidRequest("max_tokens: an output cap is required", param="max_tokens")
    body: dict[str, Any] = {"model": upstream_model, "max_tokens": req.max_output_tokens}
    system = "\n\n".join(m.text() for m in req.messages if m.role == "system")
    if system:
        body["system"] = system
    body["messages"] = _messages(req.messages)
    if req.tools:
        body["tools"] = [_tool_json(t.name, t.description, t.parameters) for t in req.tools]
    choice = _tool_choice_json(req)
    if choice is not None:
        body["tool_choice"] = choice
    if req.stop:
        body["stop_sequences"] = list(req.stop)
    if req.temperature is not None:
        body["temperature"] = min(max(req.temperature, 0.0), 1.0)  # OpenAI allows up to 2
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.user:
        body["metadata"] = {"user_id": req.user}
    if req.stream:
        body["stream"] = True
    for name in ("response_format", "reasoning", "metadata"):
        if getattr(req, name) is not None:
            _note(req, f"dropped: {name}")
    cached = wants_prompt_cache(req)
    if cached:
        mark_cache_breakpoints(body)
    for name in req.untranslatable:  # what the canonical request could not carry from the client's dialect
        if not (cached and name == "prompt_cache_key"):
            _note(req, f"dropped: {name}")
    return orjson.dumps(body)


def wants_prompt_cache(req: Request) -> bool:
    """An OpenAI-dialect client that names a `prompt_cache_key` asks for its prompt's prefix to be cached
    (Codex sends one per thread); Anthropic caches only at explicit markers, so the translation sets them."""
    return req.dialect != "anthropic_messages" and req.raw is not None and bool(req.raw.get("prompt_cache_key"))


def mark_cache_breakpoints(body: dict[str, Any]) -> None:
    """`cache_control` at the end of the system prompt and of the last turn (2 of Anthropic's 4 markers):
    the next turn of the conversation reads everything before its new messages from the cache."""
    marker = {"type": "ephemeral"}
    system = body.get("system")
    if isinstance(system, str) and system:
        body["system"] = [{"type": "text", "text": system, "cache_control": marker}]
    messages = body.get("messages") or []
    if messages and isinstance(messages[-1].get("content"), list) and messages[-1]["content"]:
        messages[-1]["content"][-1] = {**messages[-1]["content"][-1], "cache_control": marker}


def _note(req: Request, note: str) -> None:
    if note not in req.notes:
        req.notes.append(note)


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Non-system messages as Anthropic turns: tool results go into user turns, and consecutive
    turns of one role are merged (the API wants user and assistant to alternate)."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if msg.role == "system":
            continue
        role = "assistant" if msg.role == "assistant" else "user"
        blocks = [b for p in msg.parts if (b := _block(p, f"messages.{i}")) is not None]
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out


def _block(part: Any, param: str) -> dict[str, Any] | None:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text} if part.text else None
    if isinstance(part, ToolCall):
        try:
            arguments = orjson.loads(part.arguments or "{}")
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            message = f"{param}: the arguments of tool call {part.id!r} are not a JSON object"
            raise InvalidRequest(message, param=param)
        return {"type": "tool_use", "id": part.id, "name": part.name, "input": arguments}
    if isinstance(part, ToolResult):
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": part.call_id, "content": part.content}
        if part.is_error:
            block["is_error"] = True
        return block
    if isinstance(part, MediaPart):
        return _media(part, param)
    raise InvalidRequest(f"{param}: unsupported content part", param=param)


def _media(part: MediaPart, param: str) -> dict[str, Any]:
    if part.kind == "audio":
        raise InvalidRequest(f"{param}: this route's upstream does not accept audio", param=param)
    block_type = "image" if part.kind == "image" else "document"
    data, media_type = part.data_b64, part.media_type
    if data is None and part.url and part.url.startswith("data:"):
        header, _, data = part.url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64":
            raise InvalidRequest(f"{param}: only base64 data: URLs are supported", param=param)
    if data is not None:
        if not media_type:
            raise InvalidRequest(f"{param}: inline media needs a media type", param=param)
        source = {"type": "base64", "media_type": media_type, "data": data}
    elif part.url:
        source = {"type": "url", "url": part.url}
    else:
        raise InvalidRequest(f"{param}: media needs a url or data", param=param)
    return {"type": block_type, "source": source}


def _tool_json(name: str, description: str | None, parameters: dict[str, Any] | None) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": name}
    if description:
        tool["description"] = description
    tool["input_schema"] = parameters or {"type": "object", "properties": {}}
    return tool


def _tool_choice_json(req: Request) -> dict[str, Any] | None:
    choice: dict[str, Any] | None = None
    if req.tool_choice is not None:
        choice = {"type": _TOOL_CHOICE[req.tool_choice.mode]}
        if req.tool_choice.mode == "function":
            choice["name"] = req.tool_choice.name
    if req.parallel_tool_calls is False and req.tools:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return choice


# ------------------------------------------------------------------ answer


def usage_of(raw: Any) -> Usage | None:
    """An Anthropic `usage` object → canonical classes; None if a count is not sane.

    Anthropic reports the classes apart: `input_tokens` is fresh input only, `cache_read_input_tokens` and
    `cache_creation_input_tokens` come on top (each counted once, into prompt_tokens). `cache_creation`
    `{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}` splits the writes by TTL; see `split_writes`."""
    if not isinstance(raw, dict):
        return None
    fresh, output = token_count(raw.get("input_tokens")), token_count(raw.get("output_tokens"))
    cache_read, cache_write = _count(raw, "cache_read_input_tokens"), _count(raw, "cache_creation_input_tokens")
    if fresh is None or output is None or cache_read is None or cache_write is None:
        return None
    writes_5m, writes_1h = split_writes(cache_write, raw.get("cache_creation"))
    usage = Usage.of(fresh_input=fresh, output=output, cache_read=cache_read, cache_write=writes_5m,
                     cache_write_1h=writes_1h)
    return usage if token_count(usage.prompt_tokens) is not None else None


def split_writes(total: int, split: Any) -> tuple[int, int]:
    """(5-minute, 1-hour) cache writes from `cache_creation_input_tokens` and the `cache_creation` split.

    Without a usable split every write is a 5-minute one (Anthropic's default TTL). With one, the split
    wins; when it does not add up to the total, the larger figure is billed (the upstream billed at least
    that many writes; none is lost) and what the split leaves unexplained is a 5-minute write — the TTL a
    write has unless it asked for 1 hour — so a 1-hour price is only ever charged for 1-hour writes the
    upstream itself reported."""
    if not isinstance(split, dict):
        return total, 0
    five = token_count(split.get("ephemeral_5m_input_tokens"))
    hour = token_count(split.get("ephemeral_1h_input_tokens"))
    if five is None and hour is None:
        return total, 0
    five, hour = five or 0, hour or 0
    return max(total, five + hour) - hour, hour


def merge_stream_usage(start: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The usage a stream ends with: message_start's is the baseline, and message_delta overrides only the
    fields it reports (its counts are cumulative; a null or absent field keeps the baseline's). The
    `cache_creation` split merges per field too.

    Some relays put a cache-inclusive `input_tokens` on message_start and report the cache counts only on
    message_delta. Anthropic itself always reports both cache counts on message_start, so when message_start
    reported neither, message_delta reports some and leaves `input_tokens` alone, the baseline input is
    taken as cache-inclusive and the delta's cache counts are taken out of it (never below 0): the cache
    tokens are billed once, at their own price, not twice."""
    reported = {k: v for k, v in delta.items() if v is not None}
    merged = {**start, **reported}
    if isinstance(start.get("cache_creation"), dict) and isinstance(reported.get("cache_creation"), dict):
        merged["cache_creation"] = {**start["cache_creation"],
                                    **{k: v for k, v in reported["cache_creation"].items() if v is not None}}
    cache_keys = ("cache_read_input_tokens", "cache_creation_input_tokens")
    inclusive_start = (all(start.get(k) is None for k in cache_keys) and "input_tokens" not in reported
                       and any(k in reported for k in cache_keys))
    baseline = token_count(start.get("input_tokens"))
    if inclusive_start and baseline is not None:
        cached = sum(token_count(reported.get(k)) or 0 for k in cache_keys)
        merged["input_tokens"] = max(baseline - cached, 0)
    return merged


def _count(raw: dict[str, Any], key: str) -> int | None:
    """A token count; an absent or null optional counter is 0."""
    value = raw.get(key)
    return 0 if value is None else token_count(value)


def parse_response(data: dict[str, Any]) -> Response:
    """An Anthropic `message` JSON → canonical Response."""
    if not isinstance(data, dict) or data.get("type") != "message":
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise MalformedUpstream(f"expected a message object, got {kind!r}")
    content = data.get("content")
    if not isinstance(content, list):
        raise MalformedUpstream("message.content is not an array")
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in content:
        if not isinstance(block, dict):
            raise MalformedUpstream("message.content holds a non-object")
        if block.get("type") == "text":
            texts.append(_str(block, "text"))
        elif block.get("type") == "tool_use":
            if not isinstance(block.get("input"), dict):
                raise MalformedUpstream("tool_use.input is not an object")
            arguments = orjson.dumps(block["input"]).decode()
            calls.append(ToolCall(_str(block, "id"), _str(block, "name"), arguments))
        # thinking and server-tool blocks have no canonical form: skipped
    stop_reason = data.get("stop_reason")
    if stop_reason is not None and not isinstance(stop_reason, str):
        raise MalformedUpstream("message.stop_reason is not a string")
    finish = FINISH_REASONS.get(stop_reason or "end_turn", "stop")
    choice = Choice(0, "".join(texts) if texts else None, tuple(calls), finish)
    model = data.get("model")
    return Response(model=model if isinstance(model, str) else "", choices=[choice],
                    usage=usage_of(data.get("usage")))  # fmt: skip


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise MalformedUpstream(f"{obj.get('type')}.{key} is not a string")
    return value


def error_message(raw: bytes) -> str:
    """The message of an Anthropic error body (`{"type": "error", "error": {...}}`), "" if not one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return ""
    message = data["error"].get("message")
    return message if isinstance(message, str) else ""


# ------------------------------------------------------------------ stream


class StreamDecoder:
    """Anthropic SSE events → canonical frames. Tool calls are numbered among tool blocks only,
    as OpenAI numbers them; the input count is reported at message_start (not final), the whole usage at
    message_delta, when both counts are known."""

    def __init__(self) -> None:
        self.start_usage: dict[str, Any] = {}
        self.blocks: dict[int, int | None] = {}  # content block index → tool index (None: text etc.)
        self.tools = 0

    def feed(self, event: str | None, data: dict[str, Any]) -> Frame:
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise MalformedUpstream("stream event without a type")
        kind = data["type"]
        if event is not None and event != kind:
            raise MalformedUpstream(f"event {event!r} carries data of type {kind!r}")
        if kind == "message_start":
            message = data.get("message")
            if not isinstance(message, dict):
                raise MalformedUpstream("message_start without a message")
            usage = message.get("usage")
            self.start_usage = usage if isinstance(usage, dict) else {}
            known = usage_of({**self.start_usage, "output_tokens": 0})
            return Frame((UsageReport(known, final=False),) if known is not None else ())
        if kind == "content_block_start":
            return Frame(self._block_start(data))
        if kind == "content_block_delta":
            return Frame(self._block_delta(data))
        if kind == "message_delta":
            return Frame(self._message_delta(data))
        if kind == "error":
            error = data.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            return Frame((UpstreamFailure(message if isinstance(message, str) else "upstream error"),))
        # content_block_stop, message_stop, ping, and event types added later carry nothing for us
        return Frame(())

    def _index(self, data: dict[str, Any]) -> int:
        index = data.get("index")
        if type(index) is not int:
            raise MalformedUpstream(f"{data['type']} without an index")
        return index

    def _block_start(self, data: dict[str, Any]) -> tuple[StreamEvent, ...]:
        index = self._index(data)
        block = data.get("content_block")
        if not isinstance(block, dict):
            raise MalformedUpstream("content_block_start without a content_block")
        if block.get("type") == "tool_use":
            self.blocks[index] = self.tools
            self.tools += 1
            return (ToolCallDelta(self.tools - 1, id=_str(block, "id"), name=_str(block, "name")),)
        self.blocks[index] = None
        text = block.get("text") if block.get("type") == "text" else None
        return (TextDelta(text),) if isinstance(text, str) and text else ()

    def _block_delta(self, data: dict[str, Any]) -> tuple[StreamEvent, ...]:
        index = self._index(data)
        if index not in self.blocks:
            raise MalformedUpstream(f"content_block_delta for unopened block {index}")
        delta = data.get("delta")
        if not isinstance(delta, dict):
            raise MalformedUpstream("content_block_delta without a delta")
        if delta.get("type") == "text_delta":
            return (TextDelta(_str(delta, "text")),)
        if delta.get("type") == "input_json_delta":
            tool = self.blocks[index]
            if tool is None:
                raise MalformedUpstream(f"input_json_delta for non-tool block {index}")
            return (ToolCallDelta(tool, arguments=_str(delta, "partial_json")),)
        return ()  # thinking, signature and citation deltas

    def _message_delta(self, data: dict[str, Any]) -> tuple[StreamEvent, ...]:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            raise MalformedUpstream("message_delta without a delta")
        events: list[StreamEvent] = []
        stop_reason = delta.get("stop_reason")
        if isinstance(stop_reason, str):
            events.append(Finish(FINISH_REASONS.get(stop_reason, "stop")))
        raw = data.get("usage")
        if isinstance(raw, dict):
            usage = usage_of(merge_stream_usage(self.start_usage, raw))
            if usage is not None:
                events.append(UsageReport(usage))
        return tuple(events)
