"""Upstream codec for OpenAI-kind channels that speak the Responses API natively (`apis` has "responses"), pure.

Only Responses clients are sent there, as they sent it (native first, SPEC §1); this module reads the
answers: a `response` object, or its SSE events, into canonical types — the text and tool calls (for a
stored follow-up turn and for estimates), the usage by token class, how it finished. Whatever the
canonical model cannot carry (reasoning items, encrypted content, annotations) stays in the upstream's
own JSON, which the native relay hands to the client unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..canonical import (
    Choice,
    Finish,
    Frame,
    MalformedUpstream,
    ReasoningDelta,
    Response,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    UpstreamFailure,
    Usage,
    UsageReport,
    Wire,
    token_count,
)
from .openai import split_input

PATH = "/responses"

#: the events that end a Responses stream, with the whole response object
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def usage_of(payload: Any) -> Usage | None:
    """A Responses `usage` object (from a response or `response.completed`) → Usage; None when its totals
    are missing or not sane counts (settlement then estimates).

    The Responses API counts like chat: `input_tokens` is all input, `input_tokens_details.cached_tokens`
    (cache reads) a part of it; `output_tokens` is all output, `output_tokens_details.reasoning_tokens` a part
    of it. Cache writes (`input_tokens_details.cache_write_tokens`, newer OpenAI models and relays) are part of
    `input_tokens` too; `cache_write_tokens_details` splits them by retention: 30-minute writes are billed in
    the short write class (`cache_write`), 12-hour writes in the long one (`cache_write_1h`). Writes the split
    does not explain are short ones, so the long price is only charged for long writes the upstream reported."""
    if not isinstance(payload, dict):
        return None
    prompt = token_count(payload.get("input_tokens"))
    output = token_count(payload.get("output_tokens", 0))
    if prompt is None or output is None:
        return None
    details = payload.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    out_details = payload.get("output_tokens_details")
    out_details = out_details if isinstance(out_details, dict) else {}
    writes = token_count(details.get("cache_write_tokens")) or 0
    ttl = details.get("cache_write_tokens_details")
    long = (token_count(ttl.get("ttl_12h_tokens")) or 0) if isinstance(ttl, dict) else 0
    return split_input(prompt, output, token_count(details.get("cached_tokens")) or 0, writes,
                       token_count(out_details.get("reasoning_tokens")) or 0, cache_write_long=long)


def _failure(data: dict[str, Any]) -> str | None:
    """The message of a failed response, or None."""
    error = data.get("error")
    if data.get("status") == "failed" or isinstance(error, dict):
        message = error.get("message") if isinstance(error, dict) else None
        return str(message)[:500] if message else "the upstream response failed"
    return None


def _finish(data: dict[str, Any], calls: int) -> str:
    details = data.get("incomplete_details")
    if data.get("status") == "incomplete" and isinstance(details, dict):
        return "length" if details.get("reason") == "max_output_tokens" else "content_filter"
    return "tool_calls" if calls else "stop"


def parse_response(data: dict[str, Any]) -> Response:
    """A `response` object → canonical (the upstream's JSON is kept in `wire` for the native relay)."""
    if data.get("object") != "response":
        raise MalformedUpstream(f"expected a response object, got {str(data.get('object'))[:40]!r}")
    problem = _failure(data)
    if problem is not None:
        raise MalformedUpstream(f"the upstream answered 200 with a failed response: {problem}")
    output = data.get("output")
    if not isinstance(output, list):
        raise MalformedUpstream("response.output is not an array")
    texts: list[str] = []
    calls: list[ToolCall] = []
    for item in output:
        if not isinstance(item, dict):
            raise MalformedUpstream("response.output holds a non-object")
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        elif item.get("type") == "function_call":
            name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise MalformedUpstream("a function_call item has no name or arguments")
            calls.append(ToolCall(call_id if isinstance(call_id, str) else "", name, arguments))
        # reasoning, hosted-tool and other items have no canonical form: the relay keeps them
    choice = Choice(0, "".join(texts) if texts else None, tuple(calls), _finish(data, len(calls)))
    model = data.get("model")
    return Response(model if isinstance(model, str) else "", [choice], usage_of(data.get("usage")), wire=data)


class StreamDecoder:
    """Responses SSE events → frames, each carrying the event as it arrived (`Frame.wire`) for the relay.

    Function calls are numbered in the order their items are added, as chat numbers tool calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}  # item id → tool call index

    def feed(self, event: str | None, data: bytes) -> Frame:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedUpstream("the upstream sent an event that is not JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            raise MalformedUpstream("a Responses stream event without a type")
        return Frame(self._events(payload), wire=Wire(event, data, payload))

    def _events(self, data: dict[str, Any]) -> tuple[StreamEvent, ...]:
        kind = data["type"]
        if kind == "response.output_text.delta":
            return (TextDelta(_text(data, "delta")),)
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return (ReasoningDelta(_text(data, "delta")),)
        if kind == "response.output_item.added":
            item = data.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                index = self.calls[str(item.get("id"))] = len(self.calls)
                call_id, name = item.get("call_id"), item.get("name")
                if not isinstance(call_id, str) or not isinstance(name, str):
                    raise MalformedUpstream("a function_call item without call_id or name")
                return (ToolCallDelta(index, id=call_id, name=name),)
            return ()
        if kind == "response.function_call_arguments.delta":
            call = self.calls.get(str(data.get("item_id")))
            if call is None:
                raise MalformedUpstream("function call arguments for an item never added")
            return (ToolCallDelta(call, arguments=_text(data, "delta")),)
        if kind in FINAL_EVENTS:
            response = data.get("response")
            if not isinstance(response, dict):
                raise MalformedUpstream(f"{kind} without a response")
            problem = _failure(response) if kind == "response.failed" else None
            if problem is not None:
                return (UpstreamFailure(problem),)
            events: list[StreamEvent] = [Finish(_finish(response, len(self.calls)))]
            usage = usage_of(response.get("usage"))
            if usage is not None:
                events.append(UsageReport(usage))
            return tuple(events)
        if kind == "error":
            message = data.get("message")
            return (UpstreamFailure(str(message)[:500] if message else "the upstream reported an error"),)
        return ()


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise MalformedUpstream(f"{data.get('type')}.{key} is not a string")
    return value
