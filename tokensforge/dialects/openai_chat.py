"""Client codec for OpenAI chat completions (`POST /v1/chat/completions`), pure.

Decoding validates every field that can multiply what the upstream bills (SPEC §1): `n`,
both output caps, media parts, `stream_options`; fields whose cost the gateway cannot
price (audio output, predicted outputs, web search, premium service tiers, relay routing) are
refused with a 400 rather than forwarded unpriced. The client's body is kept (`Request.raw`) so an
OpenAI-kind channel receives unknown fields intact and sizing counts them; what the canonical
request cannot carry is named in `Request.untranslatable` (a note only when it is translated).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..canonical import (
    Finish,
    Frame,
    MediaPart,
    Message,
    Part,
    Request,
    Response,
    TextDelta,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolResult,
    Usage,
)
from ..errors import InvalidRequest
from ..forwarded import strip_unpriced

MAX_N = 8
REFUSED = {
    "audio": "audio output cannot be priced by this gateway",
    "prediction": "predicted outputs bill rejected tokens the reservation cannot bound",
    "web_search_options": "web search is billed per call, which this gateway cannot price",
}
#: top-level fields the canonical request carries (or that only steer the gateway)
CARRIED = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "tools",
    "tool_choice", "response_format", "functions", "temperature", "top_p", "stop", "user", "metadata",
    "parallel_tool_calls", "reasoning_effort", "service_tier", "modalities",
})
#: message fields the canonical message carries
MESSAGE_CARRIED = frozenset({"role", "content", "tool_calls", "tool_call_id", "name"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool", "function": "tool"}


def decode(body: dict[str, Any]) -> Request:
    """A chat.completions body → canonical Request (raises InvalidRequest naming the field)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be a non-empty array of message objects", param="messages")
    _refuse_unpriced(body)
    stripped = strip_unpriced(body, "chat")
    body = stripped.body
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    if options is not None and not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean", param="stream_options")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if type(n) is not int or not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be an integer from 1 to {MAX_N}", param="n")
    effort = body.get("reasoning_effort")
    return Request(
        model=str(body.get("model")),
        messages=[_message(m, i) for i, m in enumerate(messages)],
        dialect="openai_chat",
        stream=stream,
        max_output_tokens=output_cap(body),
        n=n,
        tools=_tools(body),
        tool_choice=_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=_opt(body, "parallel_tool_calls", bool),
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        stop=_stop(body.get("stop")),
        metadata=_opt(body, "metadata", dict),
        user=_opt(body, "user", str),
        reasoning={"effort": effort} if isinstance(effort, str) else None,
        response_format=body.get("response_format") if isinstance(body.get("response_format"), dict) else None,
        raw=body,
        notes=stripped.notes,
        untranslatable=untranslatable(body),
    )


def untranslatable(body: dict[str, Any]) -> list[str]:
    """What a chat body holds that the canonical request cannot carry: unknown top-level fields and
    message fields such as `reasoning_content`, `refusal` or a legacy `function_call`."""
    names = [key for key, value in body.items() if key not in CARRIED and value is not None]
    for message in body.get("messages") or ():
        for key, value in message.items():
            if key not in MESSAGE_CARRIED and value is not None and key not in names:
                names.append(key)
    return names


def _opt(body: dict[str, Any], key: str, kind: type) -> Any:
    """A field of the expected type, else None (an odd value is forwarded to a native upstream as sent)."""
    value = body.get(key)
    return value if isinstance(value, kind) else None


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def output_cap(body: dict[str, Any]) -> int | None:
    """The smaller of the two output caps the client gave (each a positive integer), or None."""
    caps = []
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if type(value) is not int or value <= 0:
            raise InvalidRequest(f"'{key}' must be a positive integer", param=key)
        caps.append(value)
    return min(caps) if caps else None


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be a boolean", param=key)
    return value


def _refuse_unpriced(body: dict[str, Any]) -> None:
    for key, why in REFUSED.items():
        if body.get(key) is not None:
            raise InvalidRequest(f"'{key}' is not supported: {why}", param=key)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise InvalidRequest("'modalities' other than [\"text\"] cannot be priced by this gateway",
                             param="modalities")
    tier = body.get("service_tier")
    if tier not in (None, "auto", "default"):
        raise InvalidRequest("'service_tier' other than 'auto' or 'default' is priced differently; not supported",
                             param="service_tier")


def _message(raw: dict[str, Any], index: int) -> Message:
    where = f"messages[{index}]"
    role = ROLES.get(raw.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise InvalidRequest(f"{where}.role must be one of {sorted(ROLES)}", param=f"{where}.role")
    if role == "tool":
        call_id = raw.get("tool_call_id") or raw.get("name") or ""
        return Message("tool", (ToolResult(str(call_id), _plain_text(raw.get("content"), where)),))
    parts: list[Part] = list(_content(raw.get("content"), where))
    calls = raw.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise InvalidRequest(f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
        parts.extend(_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls))
    return Message(role, tuple(parts))  # type: ignore[arg-type]


def _content(content: Any, where: str) -> list[TextPart | MediaPart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(content)]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or an array of parts", param=f"{where}.content")
    parts: list[TextPart | MediaPart] = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(TextPart(part["text"]))
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(
                part["image_url"].get("url"), str):
            detail = part["image_url"].get("detail")
            parts.append(MediaPart("image", url=part["image_url"]["url"],
                                   detail=detail if isinstance(detail, str) else None))
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(TextPart(part["refusal"]))
        elif kind == "file":
            parts.append(_file(part, at))
        elif kind == "input_audio":
            raise InvalidRequest(f"{at}: {kind} parts cannot be priced by this gateway", param=at)
        else:
            raise InvalidRequest(f"{at} must be a text or image_url part", param=at)
    return parts


def _file(part: dict[str, Any], at: str) -> MediaPart:
    """A file part sent inline (a data: URL, sized per page); a file id names the operator's own
    OpenAI files, which a client must not reach and the gateway cannot size."""
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{at}: a file part needs 'file.file_data' (file ids are not supported)", param=at)
    if data.startswith("data:"):
        return MediaPart("file", url=data)
    filename = file.get("filename") if isinstance(file, dict) else None
    pdf = isinstance(filename, str) and filename.lower().endswith(".pdf")
    return MediaPart("file", data_b64=data, media_type="application/pdf" if pdf else None)


def _plain_text(content: Any, where: str) -> str:
    return "".join(p.text for p in _content(content, where) if isinstance(p, TextPart))


def _call(raw: Any, where: str) -> ToolCall:
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{where} must be a function call with a name", param=where)
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON string", param=where)
    return ToolCall(str(raw.get("id") or ""), function["name"], arguments)


def _tools(body: dict[str, Any]) -> tuple[Tool, ...]:
    tools: list[Tool] = []
    raw_tools = body.get("tools")
    if raw_tools is not None and not isinstance(raw_tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    for i, tool in enumerate(raw_tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"tools[{i}] must be a function tool with a name", param=f"tools[{i}]")
        tools.append(_tool(function))
    functions = body.get("functions")  # the legacy spelling
    if isinstance(functions, list):
        tools.extend(_tool(f) for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str))
    return tuple(tools)


def _tool(function: dict[str, Any]) -> Tool:
    parameters = function.get("parameters")
    description = function.get("description")
    strict = function.get("strict")
    return Tool(function["name"], description if isinstance(description, str) else None,
                parameters if isinstance(parameters, dict) else None, strict if isinstance(strict, bool) else None)


def _tool_choice(raw: Any) -> ToolChoice | None:
    if raw in ("auto", "none", "required"):
        return ToolChoice(raw)
    if isinstance(raw, dict) and isinstance(raw.get("function"), dict) and isinstance(raw["function"].get("name"), str):
        return ToolChoice("function", raw["function"]["name"])
    return None


# ------------------------------------------------------------------ answers


def encode_response(resp: Response, *, completion_id: str, request: Request, usage: Usage,
                    receipt: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion: the upstream's own body when it spoke OpenAI chat (id replaced), else built."""
    if resp.raw is not None:
        data = resp.raw
        data["id"], data["model"] = completion_id, request.model  # relay names stay on the receipt
    else:
        data = {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": request.model,
            "choices": [{
                "index": c.index, "logprobs": None, "finish_reason": c.finish_reason or "stop",
                "message": _drop_none({"role": "assistant", "content": c.text, "refusal": c.refusal,
                                       "tool_calls": [_call_view(t) for t in c.tool_calls] or None}),
            } for c in resp.choices],
        }
    if not isinstance(data.get("usage"), dict) or "prompt_tokens" not in data["usage"]:
        data["usage"] = usage_json(usage)
    data["receipt"] = receipt
    return data


def usage_json(usage: Usage) -> dict[str, Any]:
    """Chat's shape: `prompt_tokens` is all input with cache reads a part of it
    (`prompt_tokens_details.cached_tokens`), `completion_tokens` all output with reasoning a part of it.
    Cache writes (both TTLs) are a part too: `prompt_tokens_details.cache_write_tokens`, as OpenAI names them."""
    details = {"cached_tokens": usage.cache_read_tokens,
               "cache_write_tokens": usage.cache_write_tokens + usage.cache_write_1h_tokens}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": details,
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}


def _call_view(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(error: dict[str, Any]) -> bytes:
    """The last event of a stream that failed after it started (the SDK raises APIError on it)."""
    return sse({"error": error})


class StreamEncoder:
    """Canonical frames → chat.completion.chunk events. Chunks from an OpenAI-kind upstream are passed on
    (with the gateway's id); the usage-only chunk is held back and sent at the end with the receipt,
    and only if the client asked for usage."""

    def __init__(self, *, completion_id: str, request: Request, include_usage: bool) -> None:
        self.completion_id = completion_id
        self.request = request
        self.include_usage = include_usage
        self.created = int(time.time())
        self._usage_chunk: dict[str, Any] | None = None
        self._started: set[int] = set()

    def start(self) -> bytes:
        return b""

    def feed(self, frame: Frame) -> bytes:
        chunk = frame.raw
        if chunk is not None:
            if not chunk.get("choices") and chunk.get("usage") is not None:
                self._usage_chunk = chunk
                return b""
            chunk["id"], chunk["model"] = self.completion_id, self.request.model  # relay names stay on the receipt
            return sse(chunk)
        out = b""
        for event in frame.events:
            delta: dict[str, Any] | None = None
            finish: str | None = None
            if isinstance(event, TextDelta):
                choice, delta = event.choice, {"content": event.text}
            elif isinstance(event, ToolCallDelta):
                call: dict[str, Any] = {"index": event.index, "function": {"arguments": event.arguments}}
                if event.id is not None:
                    call["id"], call["type"] = event.id, "function"
                if event.name is not None:
                    call["function"]["name"] = event.name
                choice, delta = event.choice, {"tool_calls": [call]}
            elif isinstance(event, Finish):
                choice, delta, finish = event.choice, {}, event.reason
            else:
                continue
            if choice not in self._started:
                self._started.add(choice)
                delta = {"role": "assistant", **delta}
            out += sse(self._chunk([{"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}]))
        return out

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.request.model, "choices": choices}

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        out = b""
        if self.include_usage:
            chunk = self._usage_chunk or self._chunk([])
            chunk["id"], chunk["model"] = self.completion_id, self.request.model
            chunk["usage"] = usage_json(usage)
            chunk["receipt"] = receipt
            out = sse(chunk)
        return out + b"data: [DONE]\n\n"

    def fail(self, error: dict[str, Any]) -> bytes:
        return error_event(error)
