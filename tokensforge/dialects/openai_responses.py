"""The OpenAI Responses API (`POST /v1/responses`) as a pure codec to and from the canonical types.

`decode` turns a request body (plus the stored conversation of `previous_response_id`) into a
canonical `Request`; `encode_response` and `StreamEncoder` turn the canonical answer back into a
Response object / the Responses event stream the official SDK's accumulator accepts; `history` and
`load_history` are what the handler stores for a follow-up turn (Responses input items, JSON-able).

Decoding is lenient (SPEC §1: mainstream agents such as Codex work unchanged): a field the canonical
request cannot carry (`client_metadata`, `prompt_cache_key`, `text.verbosity`, reasoning items, custom
tools, fields added later) is accepted, kept in `Request.raw` for a native channel and named in
`Request.untranslatable` for a translated one; `namespace` tools are flattened to their functions;
hosted tools (`web_search`…) are dropped with a note (`forwarded.strip_unpriced`). Refused with a 400
naming the field: what the gateway cannot honour or bill (background mode, server-side conversations,
stored prompts, item references, relay routing, log probabilities).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokensforge.canonical import (
    Choice,
    Finish,
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
    UsageReport,
)
from tokensforge.errors import InvalidRequest
from tokensforge.forwarded import strip_unpriced

#: fields translated into the canonical request
_TRANSLATED = frozenset({
    "model", "input", "instructions", "max_output_tokens", "tools", "tool_choice", "parallel_tool_calls",
    "temperature", "top_p", "metadata", "user", "stream", "reasoning", "text",
})
#: fields the gateway itself acts on (storage, route pinning) or that change nothing here
_GATEWAY = frozenset({"store", "previous_response_id", "route", "truncation", "stream_options"})
#: fields the gateway cannot honour when set, with the reason the client is told
_REFUSED = {
    "background": "background mode is not supported: send the request without it and keep the connection open",
    "conversation": "server-side conversations are not supported: chain turns with previous_response_id",
    "prompt": "stored prompt templates live in an OpenAI project and cannot be served through a routed "
    "channel: send the prompt as instructions and input",
}
#: fields removed before forwarding, with the note the receipt carries
_DROPPED = {"context_management": "dropped: context_management (server-side compaction, not priced)"}
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
_SUMMARIES = frozenset({"auto", "concise", "detailed"})


@dataclass(frozen=True, slots=True)
class ResponsesOptions:
    """What the handler needs besides the model request: storage and chaining of turns."""

    store: bool = True
    previous_response_id: str | None = None
    include: list[str] = field(default_factory=list)
    route: str | None = None  # SPEC §1 route pinning by body field


@dataclass(slots=True)
class ResponsesRequest(Request):
    """A canonical `Request` that also remembers what a Response object echoes back to the client.

    `instructions` is kept apart because it is the leading system message of this turn only: it is
    shown in the answer and left out of the stored history (OpenAI does not carry it over)."""

    instructions: str | None = None
    text: dict[str, Any] | None = None
    truncation: str = "disabled"
    previous_response_id: str | None = None
    store: bool = True


# ================================================================== decode


def options(body: dict[str, Any]) -> ResponsesOptions:
    """The gateway-side options of a request body (validated; 400 naming the field otherwise)."""
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise InvalidRequest("'store' must be a boolean", param="store")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    include = body.get("include")
    if include is None:
        include = []
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise InvalidRequest("'include' must be a list of strings", param="include")
    return ResponsesOptions(
        store=True if store is None else store,
        previous_response_id=_opt_str(body, "previous_response_id"),
        include=list(include),
        route=_opt_str(body, "route"),
    )


def decode(body: dict[str, Any], history: Sequence[Message] = ()) -> Request:
    """A `POST /v1/responses` body → canonical request. `history` is the stored conversation of
    `previous_response_id` (see `load_history`); it goes after this turn's instructions and before
    its input. Raises `InvalidRequest` naming the field for anything the gateway cannot honour."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    stripped = strip_unpriced(body, "responses")
    body, notes = stripped.body, stripped.notes
    untranslatable = _check_fields(body)
    for name, note in _DROPPED.items():
        if body.get(name) is not None:
            body = {k: v for k, v in body.items() if k != name}
            notes.append(note)
    opts = options(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    instructions = _opt_str(body, "instructions")
    tools = _tools(body.get("tools"), untranslatable)
    messages = [Message("system", (TextPart(instructions),))] if instructions else []
    messages.extend(history)
    if "input" not in body or body["input"] is None:
        raise InvalidRequest("'input' is required", param="input")
    new = _input(body["input"], history, untranslatable)
    if not new and not history:
        raise InvalidRequest("'input' has no items", param="input")
    messages.extend(new)
    text, response_format = _text(body.get("text"), untranslatable)
    return ResponsesRequest(
        model=model,
        messages=messages,
        dialect="openai_responses",
        stream=_opt_bool(body, "stream") or False,
        max_output_tokens=_max_output_tokens(body.get("max_output_tokens")),
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools, untranslatable),
        parallel_tool_calls=_opt_bool(body, "parallel_tool_calls"),
        temperature=_number(body, "temperature", 2.0),
        top_p=_number(body, "top_p", 1.0),
        metadata=_metadata(body.get("metadata")),
        user=_opt_str(body, "user"),
        reasoning=_reasoning(body.get("reasoning"), untranslatable),
        response_format=response_format,
        raw=body,
        notes=notes,
        untranslatable=untranslatable,
        instructions=instructions,
        text=text,
        truncation=_truncation(body.get("truncation")),
        previous_response_id=opts.previous_response_id,
        store=opts.store,
    )


def _check_fields(body: dict[str, Any]) -> list[str]:
    """Refused fields are 400s; the names of those the canonical request does not carry are returned."""
    untranslatable: list[str] = []
    for name, value in body.items():
        if name in _TRANSLATED or name in _GATEWAY or value is None:
            continue
        if name in _REFUSED:
            if value not in (False, []):
                raise InvalidRequest(_REFUSED[name], param=name)
        elif name not in _DROPPED and not (name == "include" and not value):
            untranslatable.append(name)
    top_logprobs = body.get("top_logprobs")
    if top_logprobs not in (None, 0):
        raise InvalidRequest("log probabilities are not supported", param="top_logprobs")
    if body.get("n") not in (None, 1):  # not a Responses field; a relay that honours it bills n answers
        raise InvalidRequest("'n' is not supported: a response has one answer", param="n")
    return untranslatable


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", param=name)
    return value


def _opt_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean", param=name)
    return value


def _number(body: dict[str, Any], name: str, maximum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= maximum:
        raise InvalidRequest(f"'{name}' must be a number between 0 and {maximum:g}", param=name)
    return float(value)


def _max_output_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise InvalidRequest("'max_output_tokens' must be a positive integer", param="max_output_tokens")
    return value


def _metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise InvalidRequest("'metadata' must be an object of at most 16 string pairs", param="metadata")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise InvalidRequest(
                "'metadata' keys are strings of at most 64 characters, values strings of at most 512",
                param=f"metadata.{key}",
            )
    return dict(value)


def _truncation(value: Any) -> str:
    if value is None:
        return "disabled"
    if value not in ("disabled", "auto"):
        raise InvalidRequest("'truncation' must be 'disabled' or 'auto'", param="truncation")
    return str(value)


def _reasoning(value: Any, untranslatable: list[str]) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("'reasoning' must be an object", param="reasoning")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        allowed = _EFFORTS if key == "effort" else _SUMMARIES if key in ("summary", "generate_summary") else None
        if allowed is None:
            untranslatable.append(f"reasoning.{key}")
            continue
        if not isinstance(item, str) or item not in allowed:
            raise InvalidRequest(f"'reasoning.{key}' must be one of {sorted(allowed)}", param=f"reasoning.{key}")
        out["summary" if key == "generate_summary" else key] = item
    return out or None


def _text(value: Any, untranslatable: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`text` → (the config echoed back, Request.response_format in OpenAI chat shape)."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise InvalidRequest("'text' must be an object", param="text")
    untranslatable.extend(f"text.{key}" for key, item in value.items() if key != "format" and item is not None)
    fmt = value.get("format")
    if fmt is None:
        return dict(value), None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return dict(value), None
    if kind == "json_object":
        return dict(value), {"type": "json_object"}
    if kind != "json_schema":
        raise InvalidRequest("'text.format.type' must be 'text', 'json_object' or 'json_schema'",
                             param="text.format.type")
    name, schema = fmt.get("name"), fmt.get("schema")
    if not isinstance(name, str) or not isinstance(schema, dict):
        raise InvalidRequest("a json_schema format needs a 'name' string and a 'schema' object",
                             param="text.format")
    spec: dict[str, Any] = {"name": name, "schema": schema}
    for key in ("description", "strict"):
        if fmt.get(key) is not None:
            spec[key] = fmt[key]
    return dict(value), {"type": "json_schema", "json_schema": spec}


def _tools(value: Any, untranslatable: list[str]) -> tuple[Tool, ...]:
    """Function tools → canonical tools; a `namespace` (a group of function tools, as Codex sends) is
    flattened to its functions; other client-run tool types (custom, local_shell…) are untranslatable.
    Hosted tools were stripped as unpriced before this."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("'tools' must be a list", param="tools")
    tools: list[Tool] = []
    for i, spec in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(spec, dict):
            raise InvalidRequest(f"'{where}' must be an object", param=where)
        kind = spec.get("type")
        if kind == "function":
            tools.append(_function_tool(spec, where, tools))
        elif kind == "namespace" and isinstance(spec.get("tools"), list):
            for j, inner in enumerate(spec["tools"]):
                at = f"{where}.tools[{j}]"
                if isinstance(inner, dict) and inner.get("type") == "function":
                    tools.append(_function_tool(inner, at, tools))
                else:
                    untranslatable.append(f"tool {inner.get('name') if isinstance(inner, dict) else j} "
                                          f"({inner.get('type') if isinstance(inner, dict) else '?'})")
        else:
            untranslatable.append(f"tool {spec.get('name') or kind} ({kind})")
    return tuple(tools)


def _function_tool(spec: dict[str, Any], where: str, tools: list[Tool]) -> Tool:
    name = spec.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise InvalidRequest("a function name is 1-64 letters, digits, '_' or '-'", param=f"{where}.name")
    params, desc, strict = spec.get("parameters"), spec.get("description"), spec.get("strict")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest("'parameters' must be a JSON Schema object", param=f"{where}.parameters")
    if desc is not None and not isinstance(desc, str):
        raise InvalidRequest("'description' must be a string", param=f"{where}.description")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequest("'strict' must be a boolean", param=f"{where}.strict")
    if any(t.name == name for t in tools):
        raise InvalidRequest(f"two tools are named {name!r}", param=f"{where}.name")
    return Tool(name=name, description=desc, parameters=params, strict=strict)


def _tool_choice(value: Any, tools: tuple[Tool, ...], untranslatable: list[str]) -> ToolChoice | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("type") != "function":  # allowed_tools, custom, a hosted tool
        untranslatable.append("tool_choice")
        return None
    if value in ("auto", "none", "required"):
        choice = ToolChoice(mode=value)
    elif isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        if value["name"] not in {t.name for t in tools}:
            raise InvalidRequest(f"tool_choice names {value['name']!r}, which is not in 'tools'",
                                 param="tool_choice.name")
        choice = ToolChoice(mode="function", name=value["name"])
    else:
        raise InvalidRequest(
            "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": …}",
            param="tool_choice")
    if choice.mode == "required" and not tools:
        raise InvalidRequest("tool_choice 'required' needs 'tools'", param="tool_choice")
    return choice


# ------------------------------------------------------------------ input items


def _input(value: Any, history: Sequence[Message], untranslatable: list[str]) -> list[Message]:
    if isinstance(value, str):
        return [Message("user", (TextPart(value),))]
    if not isinstance(value, list):
        raise InvalidRequest("'input' must be a string or a list of items", param="input")
    call_ids = {p.id for m in history for p in m.parts if isinstance(p, ToolCall)}
    return _items(value, call_ids, untranslatable, "input")


def _items(items: list[Any], call_ids: set[str], untranslatable: list[str], where: str) -> list[Message]:
    """Input items → messages. Function calls join the assistant message before them (one chat turn
    with text and tool calls); each function_call_output is one "tool" message (media in its output
    follows as a user message). Reasoning, custom-tool and hosted-tool items have no canonical form:
    named in `untranslatable` (a native channel gets them as sent)."""
    messages: list[Message] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{at}' must be an object", param=at)
        kind = item.get("type")
        if kind is None and "role" in item or kind == "message":
            messages.append(_message(item, at))
        elif kind == "function_call":
            call = ToolCall(id=_item_str(item, "call_id", at), name=_item_str(item, "name", at),
                            arguments=_item_str(item, "arguments", at))
            call_ids.add(call.id)
            if messages and messages[-1].role == "assistant":
                messages[-1] = Message("assistant", messages[-1].parts + (call,))
            else:
                messages.append(Message("assistant", (call,)))
        elif kind == "function_call_output":
            call_id = _item_str(item, "call_id", at)
            if call_id not in call_ids:
                raise InvalidRequest(f"no function_call with call_id {call_id!r} precedes this output",
                                     param=f"{at}.call_id")
            text, media = _tool_output(item.get("output"), at)
            messages.append(Message("tool", (ToolResult(call_id, text),)))
            if media:
                messages.append(Message("user", tuple(media)))
        elif kind == "item_reference":  # an item stored upstream: unknown content, unsizable
            raise InvalidRequest("item references are not supported: send the item itself, or chain turns with "
                                 "previous_response_id", param=f"{at}.type")
        elif isinstance(kind, str) and kind:
            name = f"{kind} items"
            if name not in untranslatable:
                untranslatable.append(name)
        else:
            raise InvalidRequest(f"unknown input item type {kind!r}", param=f"{at}.type")
    return messages


def _item_str(item: dict[str, Any], name: str, at: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"'{at}.{name}' is required and must be a string", param=f"{at}.{name}")
    return value


def _message(item: dict[str, Any], at: str) -> Message:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequest("a message role is 'user', 'assistant', 'system' or 'developer'", param=f"{at}.role")
    content = item.get("content")
    if isinstance(content, str):
        parts: tuple[Part, ...] = (TextPart(content),)
    elif isinstance(content, list):
        parts = tuple(_content_part(p, role, f"{at}.content[{j}]") for j, p in enumerate(content))
    else:
        raise InvalidRequest("message content must be a string or a list of parts", param=f"{at}.content")
    return Message("system" if role == "developer" else role, parts)


def _content_part(part: Any, role: str, at: str) -> Part:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        return TextPart(_item_str(part, "text", at))
    if kind == "refusal":
        return TextPart(_item_str(part, "refusal", at))
    if kind in ("input_image", "input_file"):
        if role != "user":
            raise InvalidRequest(f"{kind} parts are only accepted in user messages", param=f"{at}.type")
        return _media(part, kind, at)
    raise InvalidRequest(f"unknown content part type {kind!r}", param=f"{at}.type")


def _media(part: dict[str, Any], kind: str, at: str) -> MediaPart:
    if part.get("file_id") is not None:
        raise InvalidRequest("file_id refers to the OpenAI Files API, which the gateway does not serve: send the "
                             "content inline (a data: URL) or by URL", param=f"{at}.file_id")
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://", "data:")):
            raise InvalidRequest("'image_url' must be an http(s) or data: URL", param=f"{at}.image_url")
        detail = part.get("detail")
        if detail not in (None, "low", "high", "auto"):
            raise InvalidRequest("'detail' must be 'low', 'high' or 'auto'", param=f"{at}.detail")
        return MediaPart(kind="image", url=url, detail=detail)
    data, url = part.get("file_data"), part.get("file_url")
    if isinstance(data, str) and data:
        if data.startswith("data:"):
            return MediaPart(kind="file", url=data)
        return MediaPart(kind="file", data_b64=data, media_type=_media_type(part.get("filename")))
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return MediaPart(kind="file", url=url)
    raise InvalidRequest("an input_file needs 'file_data' or an http(s) 'file_url'", param=at)


def _media_type(filename: Any) -> str | None:
    if isinstance(filename, str) and filename.lower().endswith(".pdf"):
        return "application/pdf"
    return None


def _tool_output(output: Any, at: str) -> tuple[str, list[Part]]:
    """A function_call_output → its text, and the images and files it holds."""
    if isinstance(output, str):
        return output, []
    if isinstance(output, list):
        texts: list[str] = []
        media: list[Part] = []
        for j, part in enumerate(output):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("input_image", "input_file"):
                media.append(_media(part, kind, f"{at}.output[{j}]"))
            else:
                raise InvalidRequest("a function_call_output holds a string or input_text, input_image and "
                                     "input_file parts only", param=f"{at}.output[{j}]")
        return "".join(texts), media
    raise InvalidRequest("'output' must be a string or a list of input_text parts", param=f"{at}.output")


# ================================================================== history


def history(request: Request, output: Response) -> list[dict[str, Any]]:
    """What a follow-up turn (`previous_response_id`) needs, as Responses input items (JSON-able):
    this turn's conversation without its instructions, then the answer."""
    messages = request.messages
    if isinstance(request, ResponsesRequest) and request.instructions:
        messages = messages[1:]
    items: list[dict[str, Any]] = []
    for message in messages:
        items.extend(_message_items(message))
    choice = output.choices[0] if output.choices else None
    if choice is not None:
        parts: list[Part] = [TextPart(choice.text)] if choice.text else []
        parts.extend(choice.tool_calls)
        items.extend(_message_items(Message("assistant", tuple(parts))))
    return items


def load_history(stored: list[dict[str, Any]]) -> list[Message]:
    """The inverse of `history`."""
    return _items(stored, set(), [], "history")


def _message_items(message: Message) -> Iterable[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            kind = "output_text" if message.role == "assistant" else "input_text"
            content.append({"type": kind, "text": part.text})
        elif isinstance(part, MediaPart):
            content.append(_media_item(part))
        elif isinstance(part, ToolCall):
            calls.append({"type": "function_call", "call_id": part.id, "name": part.name,
                          "arguments": part.arguments})
        else:
            calls.append({"type": "function_call_output", "call_id": part.call_id, "output": part.content})
    if content or not calls:
        yield {"type": "message", "role": message.role, "content": content}
    yield from calls


def _media_item(part: MediaPart) -> dict[str, Any]:
    url = part.url or f"data:{part.media_type or 'application/octet-stream'};base64,{part.data_b64 or ''}"
    if part.kind == "image":
        item: dict[str, Any] = {"type": "input_image", "image_url": url}
        if part.detail:
            item["detail"] = part.detail
        return item
    if url.startswith("data:"):
        return {"type": "input_file", "file_data": url}
    return {"type": "input_file", "file_url": url}


# ================================================================== answer


def _ids(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def _shell(request: Request, response_id: str, created_at: int, status: str) -> dict[str, Any]:
    """The Response object's fields that echo the request (every lifecycle event carries them)."""
    extra = request if isinstance(request, ResponsesRequest) else None
    choice = request.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": extra.instructions if extra else None,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": None,
        "model": request.model,
        "output": [],
        "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
        "previous_response_id": extra.previous_response_id if extra else None,
        "reasoning": {"effort": None, "summary": None, **(request.reasoning or {})},
        "store": extra.store if extra else True,
        "temperature": request.temperature,
        "text": (extra.text if extra and extra.text else None) or {"format": {"type": "text"}},
        "tool_choice": ("auto" if choice is None else {"type": "function", "name": choice.name}
                        if choice.mode == "function" else choice.mode),
        "tools": [_tool_json(t) for t in request.tools],
        "top_p": request.top_p,
        "truncation": extra.truncation if extra else "disabled",
        "usage": None,
        "user": request.user,
        "metadata": request.metadata or {},
    }


def _tool_json(tool: Tool) -> dict[str, Any]:
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": tool.parameters, "strict": tool.strict}


def _usage_json(usage: Usage) -> dict[str, Any]:
    """Responses' shape: `input_tokens` is all input, cache reads (`cached_tokens`) and cache writes
    (`cache_write_tokens`, both TTLs) parts of it; `output_tokens` all output, reasoning a part of it."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cache_read_tokens,
                                 "cache_write_tokens": usage.cache_write_tokens + usage.cache_write_1h_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _finish_status(status: str, finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    if status == "completed" and finish_reason in _INCOMPLETE:
        return "incomplete", {"reason": _INCOMPLETE[finish_reason]}
    return status, None


def _text_item(item_id: str, text: str, status: str, refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal is not None:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def encode_response(resp: Response, *, response_id: str, request: Request, created_at: int,
                    usage: Usage, receipt: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A canonical answer → the Response object of a non-streamed `POST /v1/responses`, with the
    gateway's `receipt` on top (SPEC §2). A length finish is status "incomplete", as OpenAI does."""
    choice = resp.choices[0] if resp.choices else Choice(index=0, text=None, finish_reason=None)
    status, incomplete = _finish_status(status, choice.finish_reason)
    item_status = "incomplete" if status == "incomplete" else "completed"
    base = _ids(response_id)
    output: list[dict[str, Any]] = []
    if choice.text or choice.refusal is not None or not choice.tool_calls:
        output.append(_text_item(f"msg_{base}_0", choice.text or "", item_status, choice.refusal))
    for call in choice.tool_calls:
        output.append(_call_item(f"fc_{base}_{len(output)}", call, item_status))
    body = _shell(request, response_id, created_at, status)
    body.update(output=output, incomplete_details=incomplete, usage=_usage_json(usage), receipt=receipt)
    return body


# ================================================================== stream


def _sse(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


@dataclass(slots=True)
class _Item:
    """One output item being streamed: a message with one output_text part, or a function call."""

    index: int
    item_id: str
    call: ToolCall | None = None  # None: a text message
    text: str = ""
    done: bool = False


class StreamEncoder:
    """Canonical stream events → the Responses event stream, in the order the SDK's accumulator
    requires (`openai.lib.streaming.responses`): created, in_progress, then per output item
    added → (content_part.added → deltas → text.done → content_part.done | arguments deltas →
    arguments.done) → item.done, then one terminal event carrying the full response."""

    def __init__(self, *, response_id: str, request: Request, created_at: int) -> None:
        self._response_id = response_id
        self._request = request
        self._created_at = created_at
        self._base = _ids(response_id)
        self._seq = 0
        self._items: list[_Item] = []
        self._text: _Item | None = None  # the open message item
        self._calls: dict[int, _Item] = {}  # open function calls by canonical tool-call index
        self._finish: str | None = None
        self._failed = False
        self._usage: Usage | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return _sse(event)

    def _lifecycle(self, kind: str, status: str, **extra: Any) -> bytes:
        response = _shell(self._request, self._response_id, self._created_at, status)
        response.update(extra)
        return self._event(kind, response=response)

    def start(self) -> bytes:
        return self._lifecycle("response.created", "in_progress") + self._lifecycle("response.in_progress",
                                                                                    "in_progress")

    def feed(self, event: StreamEvent) -> bytes:
        if isinstance(event, TextDelta):
            return self._text_delta(event) if event.choice == 0 and event.text else b""
        if isinstance(event, ToolCallDelta):
            return self._call_delta(event) if event.choice == 0 else b""
        if isinstance(event, Finish):
            if event.choice != 0:
                return b""
            self._finish = event.reason
            return self._close_all()
        if isinstance(event, UsageReport):
            self._usage = event.usage
        return b""  # an UpstreamFailure is the handler's to report, with fail()

    def _text_delta(self, event: TextDelta) -> bytes:
        out = b""
        if self._text is None:
            item = self._text = _Item(len(self._items), f"msg_{self._base}_{len(self._items)}")
            self._items.append(item)
            out += self._event("response.output_item.added", output_index=item.index,
                               item=_text_item(item.item_id, "", "in_progress"))
            out += self._event("response.content_part.added", item_id=item.item_id, output_index=item.index,
                               content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                      "logprobs": []})
        item = self._text
        item.text += event.text
        return out + self._event("response.output_text.delta", item_id=item.item_id, output_index=item.index,
                                 content_index=0, delta=event.text, logprobs=[])

    def _call_delta(self, event: ToolCallDelta) -> bytes:
        out = b""
        item = self._calls.get(event.index)
        if item is None:
            out += self._close_text()  # the message comes before its tool calls
            index = len(self._items)
            call = ToolCall(id=event.id or f"call_{self._base}_{index}", name=event.name or "", arguments="")
            item = self._calls[event.index] = _Item(index, f"fc_{self._base}_{index}", call=call)
            self._items.append(item)
            out += self._event("response.output_item.added", output_index=index,
                               item=_call_item(item.item_id, call, "in_progress"))
        elif item.done:
            return b""
        if not event.arguments or item.call is None:
            return out
        item.call = ToolCall(item.call.id, item.call.name, item.call.arguments + event.arguments)
        return out + self._event("response.function_call_arguments.delta", item_id=item.item_id,
                                 output_index=item.index, delta=event.arguments)

    def _item_status(self) -> str:
        return "incomplete" if self._failed or self._finish in _INCOMPLETE else "completed"

    def _close_text(self) -> bytes:
        item, self._text = self._text, None
        if item is None:
            return b""
        item.done = True
        part = {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
        common = {"item_id": item.item_id, "output_index": item.index, "content_index": 0}
        return (self._event("response.output_text.done", **common, text=item.text, logprobs=[])
                + self._event("response.content_part.done", **common, part=part)
                + self._event("response.output_item.done", output_index=item.index,
                              item=_text_item(item.item_id, item.text, self._item_status())))

    def _close_all(self) -> bytes:
        out = self._close_text()
        for item in sorted(self._calls.values(), key=lambda i: i.index):
            if item.done or item.call is None:
                continue
            item.done = True
            out += self._event("response.function_call_arguments.done", item_id=item.item_id,
                               output_index=item.index, arguments=item.call.arguments, name=item.call.name)
            out += self._event("response.output_item.done", output_index=item.index,
                               item=_call_item(item.item_id, item.call, self._item_status()))
        return out

    def _output_json(self) -> list[dict[str, Any]]:
        status = self._item_status()
        return [_call_item(i.item_id, i.call, status) if i.call else _text_item(i.item_id, i.text, status)
                for i in self._items]

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        """Close what is open, then the terminal event with the full response, usage and receipt:
        `response.completed`, or `response.incomplete` after a length finish (as OpenAI does)."""
        self._usage = usage
        out = self._close_all()
        status, incomplete = _finish_status("completed", self._finish)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._lifecycle(kind, status, output=self._output_json(), incomplete_details=incomplete,
                                     usage=_usage_json(usage), receipt=receipt)

    def fail(self, error: dict[str, Any], receipt: dict[str, Any] | None) -> bytes:
        """`response.failed` (what was streamed so far, the error, the receipt), then one `error` event whose
        data also has the top-level `error` object of SPEC §2, so the SDK raises `APIError` on it."""
        error = error.get("error", error) if isinstance(error.get("error"), dict) else error
        message = str(error.get("message") or "the upstream failed")
        code = "rate_limit_exceeded" if error.get("code") == "rate_limited" else "server_error"
        self._failed = True  # whatever was streamed before the failure is an incomplete item
        out = self._lifecycle("response.failed", "failed", output=self._output_json(),
                              error={"code": code, "message": message}, receipt=receipt,
                              usage=_usage_json(self._usage) if self._usage else None)
        return out + self._event("error", code=error.get("code"), message=message, param=error.get("param"),
                                 error={"message": message, "type": error.get("type"),
                                        "param": error.get("param"), "code": error.get("code")})

    def output(self) -> Response:
        """What was streamed, as a canonical answer (for the stored history)."""
        text = "".join(i.text for i in self._items if i.call is None)
        calls = tuple(i.call for i in self._items if i.call is not None)
        return Response(
            model=self._request.model,
            choices=[Choice(index=0, text=text or None, tool_calls=calls, finish_reason=self._finish)],
            usage=self._usage,
        )
