"""Anthropic Messages as a client dialect: `POST /v1/messages` ⇄ canonical (pure).

`decode` turns a client's body into a canonical `Request` (validation errors name the field);
`encode_response`, `StreamEncoder` and `error_body` render canonical answers, stream events and
errors in the shapes the official `anthropic` SDK parses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson

from tokensforge.canonical import (
    Finish,
    MalformedUpstream,
    MediaPart,
    Message,
    Part,
    Request,
    Response,
    StreamEvent,
    TextDelta,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolResult,
    Usage,
)
from tokensforge.errors import InvalidRequest
from tokensforge.forwarded import strip_unpriced

#: top-level fields the canonical request carries; anything else (thinking, context_management,
#: output_config, cache_control, top_k, service_tier, container, fields added later) is accepted, kept in
#: Request.raw for a native channel, and named in Request.untranslatable for a translated one
_CARRIED = frozenset({
    "model", "messages", "system", "tools", "tool_choice", "max_tokens", "stop_sequences", "temperature",
    "top_p", "metadata", "stream",
})
#: content blocks with no canonical form: kept for a native channel, dropped (and named) when translated
_UNTRANSLATED_BLOCKS = {
    "thinking": "thinking blocks", "redacted_thinking": "thinking blocks",
    "server_tool_use": "server tool blocks", "web_search_tool_result": "server tool blocks",
    "web_fetch_tool_result": "server tool blocks", "code_execution_tool_result": "server tool blocks",
    "bash_code_execution_tool_result": "server tool blocks",
    "text_editor_code_execution_tool_result": "server tool blocks", "mcp_tool_use": "server tool blocks",
    "mcp_tool_result": "server tool blocks", "container_upload": "container uploads",
}

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# ------------------------------------------------------------------ decode


def decode(body: dict[str, Any], headers: Mapping[str, str] | None = None) -> Request:
    """A `POST /v1/messages` body → canonical Request; InvalidRequest names the bad field. Lenient (SPEC §1):
    a field the canonical request cannot carry is accepted and named in `Request.untranslatable`;
    only what would break billing is refused (`forwarded.strip_unpriced`)."""
    req = _decode(body, headers)
    max_tokens = req.raw.get("max_tokens") if req.raw is not None else None
    if type(max_tokens) is not int or max_tokens < 1:
        raise InvalidRequest("max_tokens: a positive integer is required", param="max_tokens")
    req.max_output_tokens = max_tokens
    return req


def decode_count_tokens(body: dict[str, Any]) -> Request:
    """A `POST /v1/messages/count_tokens` body → canonical Request (no output cap)."""
    return _decode(body, None)


def _decode(body: dict[str, Any], headers: Mapping[str, str] | None) -> Request:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    stripped = strip_unpriced(body, "messages", headers)
    body = stripped.body
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: a model name is required", param="model")
    req = Request(model=model, messages=[], dialect="anthropic_messages", raw=body, notes=stripped.notes)
    req.untranslatable.extend(k for k, v in body.items() if k not in _CARRIED and v is not None)
    if body.get("n") not in (None, 1):  # Messages has no n; a relay that honours it bills n answers
        raise InvalidRequest("n: Messages returns one answer; n is not supported", param="n")
    req.messages.extend(_system(body.get("system")))
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidRequest("messages: a non-empty array is required", param="messages")
    for i, raw in enumerate(raw_messages):
        req.messages.extend(_message(raw, f"messages.{i}", req))
    req.tools = _tools(body.get("tools"), req)
    req.tool_choice, req.parallel_tool_calls = _tool_choice(body.get("tool_choice"))
    req.stop = _stop_sequences(body.get("stop_sequences"))
    req.temperature = _number(body, "temperature", 0.0, 1.0)
    req.top_p = _number(body, "top_p", 0.0, 1.0)
    req.user = _user_id(body.get("metadata"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream: a boolean is required", param="stream")
    req.stream = stream
    return req


def _untranslatable(req: Request, name: str) -> None:
    if name not in req.untranslatable:
        req.untranslatable.append(name)


def _text_blocks(value: Any, param: str) -> list[str]:
    """`str | [{"type": "text", "text": str}, …]` → the texts (cache_control and citations are ignored)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest(f"{param}: a string or an array of text blocks is required", param=param)
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"{param}.{i}: only text blocks are allowed here", param=param)
        texts.append(_str(block, "text", f"{param}.{i}"))
    return texts


def _system(value: Any) -> list[Message]:
    if value is None:
        return []
    texts = _text_blocks(value, "system")
    return [Message("system", tuple(TextPart(t) for t in texts))] if texts else []


def _message(raw: Any, param: str, req: Request) -> list[Message]:
    """One Anthropic turn → canonical messages: tool_result blocks become "tool" messages, in order (media
    inside a tool result follows it as a user message); a `role: "system"` turn is system text."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{param}: a message object is required", param=param)
    role = raw.get("role")
    if role == "system":
        return [Message("system", tuple(TextPart(t) for t in _text_blocks(raw.get("content"), f"{param}.content")))]
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{param}.role: must be 'user', 'assistant' or 'system'", param=f"{param}.role")
    content = raw.get("content")
    if isinstance(content, str):
        return [Message(role, (TextPart(content),))]
    if not isinstance(content, list):
        message = f"{param}.content: a string or an array of content blocks is required"
        raise InvalidRequest(message, param=f"{param}.content")
    out: list[Message] = []
    pending: list[Part] = []
    for i, block in enumerate(content):
        at = f"{param}.content.{i}"
        if isinstance(block, dict) and block.get("type") == "tool_result":
            if role != "user":
                raise InvalidRequest(f"{at}: tool_result blocks belong to user turns", param=at)
            if pending:
                out.append(Message(role, tuple(pending)))
                pending = []
            result, media = _tool_result(block, at)
            out.append(Message("tool", (result,)))
            if media:
                out.append(Message("user", tuple(media)))
            continue
        pending.extend(_block(block, role, at, req))
    if pending or not out:
        out.append(Message(role, tuple(pending)))
    return out


def _block(block: Any, role: str, param: str, req: Request) -> list[Part]:
    if not isinstance(block, dict):
        raise InvalidRequest(f"{param}: a content block object is required", param=param)
    kind = block.get("type")
    if kind == "text":
        return [TextPart(_str(block, "text", param))]
    if kind in ("image", "document"):
        return _media(block, param)
    if kind == "search_result":
        return [TextPart(t) for t in _search_result(block, param)]
    if kind == "tool_use":
        if role != "assistant":
            raise InvalidRequest(f"{param}: tool_use blocks belong to assistant turns", param=param)
        arguments = block.get("input")
        if not isinstance(arguments, dict):
            raise InvalidRequest(f"{param}.input: an object is required", param=f"{param}.input")
        call_id, name = _str(block, "id", param), _str(block, "name", param)
        return [ToolCall(call_id, name, orjson.dumps(arguments).decode())]
    if isinstance(kind, str) and kind in _UNTRANSLATED_BLOCKS:
        _untranslatable(req, _UNTRANSLATED_BLOCKS[kind])
        return []
    raise InvalidRequest(f"{param}.type: unsupported content block type {kind!r}", param=f"{param}.type")


def _tool_result(block: dict[str, Any], param: str) -> tuple[ToolResult, list[Part]]:
    """A tool_result → its text, and the images and documents it holds (a translated request sends those
    as a user message after the result: OpenAI tool messages carry text only)."""
    content = block.get("content", "")
    texts: list[str] = []
    media: list[Part] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, item in enumerate(content):
            at = f"{param}.content.{j}"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                texts.append(_str(item, "text", at))
            elif kind in ("image", "document"):
                for part in _media(item, at):
                    if isinstance(part, TextPart):
                        texts.append(part.text)
                    else:
                        media.append(part)
            elif kind == "search_result":
                texts.extend(_search_result(item, at))
            else:
                raise InvalidRequest(f"{at}: text, image, document or search_result blocks only",
                                     param=f"{param}.content")
    elif content is not None:
        raise InvalidRequest(f"{param}.content: a string or an array of blocks is required", param=f"{param}.content")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, (bool, type(None))):
        raise InvalidRequest(f"{param}.is_error: a boolean is required", param=f"{param}.is_error")
    return ToolResult(_str(block, "tool_use_id", param), "".join(texts), bool(is_error)), media


def _search_result(block: dict[str, Any], param: str) -> list[str]:
    title = block.get("title")
    return ([title] if isinstance(title, str) else []) + _text_blocks(block.get("content", []), f"{param}.content")


def _media(block: dict[str, Any], param: str) -> list[Part]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest(f"{param}.source: an object is required", param=f"{param}.source")
    kind: Literal["image", "file"] = "image" if block["type"] == "image" else "file"
    source_type = source.get("type")
    if source_type == "base64":
        data = _str(source, "data", f"{param}.source")
        media_type = _str(source, "media_type", f"{param}.source")
        return [MediaPart(kind, data_b64=data, media_type=media_type)]
    if source_type == "url":
        return [MediaPart(kind, url=_str(source, "url", f"{param}.source"))]
    if source_type == "text" and kind == "file":  # a plain-text document is just text
        return [TextPart(_str(source, "data", f"{param}.source"))]
    if source_type == "content" and kind == "file":  # a document of content blocks: its texts and images
        parts: list[Part] = []
        for j, item in enumerate(source.get("content") or []):
            at = f"{param}.source.content.{j}"
            if isinstance(item, dict) and item.get("type") == "image":
                parts.extend(_media(item, at))
            else:
                parts.extend(TextPart(t) for t in _text_blocks([item], at))
        return parts
    message = f"{param}.source.type: unsupported source type {source_type!r}"
    if source_type == "file":
        message += " (file ids name files in the operator's account: send the content inline or by URL)"
    raise InvalidRequest(message, param=f"{param}.source.type")


def _tools(value: Any, req: Request) -> tuple[Tool, ...]:
    """Custom tools → canonical tools; Anthropic-defined client tools (bash, text editor, computer, memory)
    have no canonical form (untranslatable); server tools were stripped as unpriced before this."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("tools: an array is required", param="tools")
    tools = []
    for i, raw in enumerate(value):
        param = f"tools.{i}"
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{param}: a tool object is required", param=param)
        kind = raw.get("type", "custom")
        if kind not in ("custom", None):
            _untranslatable(req, f"tool {raw.get('name')} ({kind})")
            continue
        if raw.get("defer_loading") is True:  # loaded only through Anthropic's tool search: not callable as is
            _untranslatable(req, f"tool {raw.get('name')} (defer_loading)")
            continue
        schema = raw.get("input_schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{param}.input_schema: an object is required", param=f"{param}.input_schema")
        description = raw.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"{param}.description: a string is required", param=f"{param}.description")
        tools.append(Tool(_str(raw, "name", param), description, schema))
    return tuple(tools)


def _tool_choice(value: Any) -> tuple[ToolChoice | None, bool | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise InvalidRequest("tool_choice: an object is required", param="tool_choice")
    disable = value.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        message = "tool_choice.disable_parallel_tool_use: a boolean is required"
        raise InvalidRequest(message, param="tool_choice.disable_parallel_tool_use")
    parallel = None if disable is None else not disable
    kind = value.get("type")
    if kind == "auto":
        return ToolChoice("auto"), parallel
    if kind == "any":
        return ToolChoice("required"), parallel
    if kind == "none":
        return ToolChoice("none"), parallel
    if kind == "tool":
        return ToolChoice("function", _str(value, "name", "tool_choice")), parallel
    raise InvalidRequest("tool_choice.type: must be auto, any, tool or none", param="tool_choice.type")


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("stop_sequences: an array of strings is required", param="stop_sequences")
    return tuple(value)


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not low <= value <= high:
        raise InvalidRequest(f"{key}: a number from {low} to {high} is required", param=key)
    return float(value)


def _user_id(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata: an object is required", param="metadata")
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("metadata.user_id: a string is required", param="metadata.user_id")
    return user


def _str(obj: dict[str, Any], key: str, param: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{param}.{key}: a string is required", param=f"{param}.{key}")
    return value


# ------------------------------------------------------------------ encode


def encode_response(
    resp: Response, *, message_id: str, request: Request, usage: Usage, receipt: dict[str, Any]
) -> dict[str, Any]:
    """A canonical answer → an Anthropic `message` object with the gateway's `receipt`."""
    choice = resp.choices[0] if resp.choices else None
    content: list[dict[str, Any]] = []
    stop_reason = "end_turn"
    if choice is not None:
        text = choice.text or choice.refusal
        if text:
            content.append({"type": "text", "text": text})  # never "citations": null (the AI SDK refuses it)
        content.extend(
            {"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c.arguments)}
            for c in choice.tool_calls
        )
        stop_reason = stop_reason_of(choice.finish_reason)
        if choice.refusal and not choice.text:
            stop_reason = "refusal"
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage_json(usage),
        "receipt": receipt,
    }


def stop_reason_of(finish_reason: str | None) -> str:
    """OpenAI finish reason → Anthropic stop_reason (unknown or missing: a normal end)."""
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def tool_input(arguments: str) -> dict[str, Any]:
    """Tool-call JSON text → the object Anthropic's `input` must be."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError as exc:
        raise MalformedUpstream(f"tool call arguments are not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedUpstream("tool call arguments are not a JSON object")
    return value


def usage_json(usage: Usage) -> dict[str, Any]:
    """Anthropic's shape: `input_tokens` is fresh input only, cache reads and writes apart (canonical
    prompt_tokens include them), the writes split by TTL in `cache_creation`."""
    writes = usage.cache_write_tokens + usage.cache_write_1h_tokens
    return {
        "input_tokens": max(usage.fresh_input_tokens, 0),
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "cache_creation_input_tokens": writes,
        "cache_creation": {"ephemeral_5m_input_tokens": usage.cache_write_tokens,
                           "ephemeral_1h_input_tokens": usage.cache_write_1h_tokens},
    }


def count_tokens_response(input_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error shape; the type follows the status as Anthropic's own API assigns it."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, default), "message": message}}


def sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class StreamEncoder:
    """Canonical stream events → Anthropic SSE events, opening and closing content blocks as the
    content switches between text and tool calls (choice 0 only: Messages has no `n`)."""

    def __init__(self, *, message_id: str, request: Request) -> None:
        self.message_id = message_id
        self.model = request.model
        self.index = -1  # the current content block, -1 before the first
        self.open: str | None = None  # "text" | "tool_use" while a block is open
        self.tool_index: int | None = None  # canonical index of the open tool_use block
        self.stop_reason: str | None = None
        self.saw_tool = False

    def start(self, input_tokens: int) -> bytes:
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        }
        return sse("message_start", {"type": "message_start", "message": message})

    def feed(self, event: StreamEvent) -> bytes:
        if getattr(event, "choice", 0) != 0:
            return b""
        if isinstance(event, TextDelta):
            if not event.text:
                return b""
            out = b"" if self.open == "text" else self._open({"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": event.text}
            return out + self._delta(delta)
        if isinstance(event, ToolCallDelta):
            return self._tool(event)
        if isinstance(event, Finish):
            self.stop_reason = stop_reason_of(event.reason)
        return b""

    def _tool(self, event: ToolCallDelta) -> bytes:
        out = b""
        if self.open != "tool_use" or self.tool_index != event.index:
            call_id = event.id or f"toolu_{self.message_id}_{event.index}"
            block = {"type": "tool_use", "id": call_id, "name": event.name or "", "input": {}}
            out = self._open(block)
            self.tool_index = event.index
            self.saw_tool = True
        if event.arguments:
            out += self._delta({"type": "input_json_delta", "partial_json": event.arguments})
        return out

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.open = block["type"]
        payload = {"type": "content_block_start", "index": self.index, "content_block": block}
        return out + sse("content_block_start", payload)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        payload = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return sse("content_block_delta", payload)

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        self.tool_index = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        stop_reason = self.stop_reason or ("tool_use" if self.saw_tool else "end_turn")
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": usage_json(usage),
            "receipt": receipt,
        }
        return self._close() + sse("message_delta", delta) + sse("message_stop", {"type": "message_stop"})

    def fail(self, error_type: str, message: str) -> bytes:
        return sse("error", {"type": "error", "error": {"type": error_type, "message": message}})

    def ping(self) -> bytes:
        return sse("ping", {"type": "ping"})
