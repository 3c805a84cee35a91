"""The OpenAI chat codecs (client side and upstream side) and the bounded SSE reader, table-driven; pure."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tokensforge.canonical import (
    Finish,
    MalformedUpstream,
    MediaPart,
    Message,
    Request,
    TextDelta,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolResult,
    UpstreamFailure,
    Usage,
    UsageReport,
)
from tokensforge.dialects import openai_chat
from tokensforge.errors import InvalidRequest
from tokensforge.upstream import openai as upstream
from tokensforge.upstream.streaming import SseReader

USER = {"role": "user", "content": "hi"}


# ------------------------------------------------------------------ client decode

DECODE_CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("text", {"messages": [USER]}, [Message("user", (TextPart("hi"),))]),
    ("developer is system", {"messages": [{"role": "developer", "content": "be brief"}, USER]},
     [Message("system", (TextPart("be brief"),)), Message("user", (TextPart("hi"),))]),
    ("image part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it"},
        {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}}]}]},
     [Message("user", (TextPart("what is it"), MediaPart("image", url="data:x", detail="low")))]),
    ("tool round trip", {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]},
     [Message("user", (TextPart("hi"),)), Message("assistant", (ToolCall("c1", "f", "{}"),)),
      Message("tool", (ToolResult("c1", "42"),))]),
]


@pytest.mark.parametrize("name,body,messages", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode(name: str, body: dict[str, Any], messages: list[Message]) -> None:
    req = openai_chat.decode({"model": "m", **body})
    assert req.messages == messages and req.raw is not None and req.dialect == "openai_chat"


CAP_CASES = [({}, None), ({"max_tokens": 7}, 7), ({"max_completion_tokens": 1, "max_tokens": 16000}, 1),
             ({"max_completion_tokens": 50, "max_tokens": 20}, 20)]


@pytest.mark.parametrize("fields,cap", CAP_CASES)
def test_the_smaller_cap_is_the_one(fields: dict[str, int], cap: int | None) -> None:
    assert openai_chat.decode({"model": "m", "messages": [USER], **fields}).max_output_tokens == cap


REFUSED = [
    ("messages", {"messages": []}), ("messages", {"messages": ["x"]}),
    ("messages[0].role", {"messages": [{"role": "robot", "content": "x"}]}),
    ("stream", {"messages": [USER], "stream": "yes"}),
    ("stream_options", {"messages": [USER], "stream_options": [["include_usage", True]]}),
    ("stream_options", {"messages": [USER], "stream_options": 5}),
    ("n", {"messages": [USER], "n": 0}), ("n", {"messages": [USER], "n": 9}), ("n", {"messages": [USER], "n": True}),
    ("max_tokens", {"messages": [USER], "max_tokens": -1}), ("max_tokens", {"messages": [USER], "max_tokens": 2.5}),
    ("audio", {"messages": [USER], "audio": {}}), ("prediction", {"messages": [USER], "prediction": {}}),
    ("web_search_options", {"messages": [USER], "web_search_options": {}}),
    ("modalities", {"messages": [USER], "modalities": ["audio"]}),
    ("service_tier", {"messages": [USER], "service_tier": "flex"}),
    ("messages[0].content[0]", {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}),
    ("messages[0].content[0]", {"messages": [{"role": "user", "content": [{"type": "video"}]}]}),
    ("tools[0]", {"messages": [USER], "tools": [{"type": "function"}]}),
]


@pytest.mark.parametrize("param,body", REFUSED)
def test_refused(param: str, body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        openai_chat.decode({"model": "m", **body})
    assert caught.value.param == param


# ------------------------------------------------------------------ upstream build


def test_build_forwards_the_raw_body_with_only_gateway_fields_rewritten() -> None:
    req = openai_chat.decode({"model": "public", "messages": [USER], "logit_bias": {"1": 2}, "max_tokens": 900,
                              "max_completion_tokens": 3, "stream": True, "stream_options": {"include_usage": False}})
    sent = orjson.loads(upstream.build(req, "upstream-name"))
    assert sent["model"] == "upstream-name" and sent["logit_bias"] == {"1": 2}
    assert sent["max_completion_tokens"] == 3 and "max_tokens" not in sent
    assert sent["stream_options"] == {"include_usage": True}


def test_build_encodes_other_dialects_from_canonical() -> None:
    req = Request("m", [Message("system", (TextPart("s"),)), Message("user", (TextPart("q"),)),
                        Message("assistant", (ToolCall("c", "f", '{"a":1}'),)),
                        Message("tool", (ToolResult("c", "r"),))],
                  dialect="anthropic_messages", max_output_tokens=5, stop=("END",))
    sent = orjson.loads(upstream.build(req, "u"))
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert sent["messages"][2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a":1}'}
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": "c", "content": "r"}
    assert sent["max_completion_tokens"] == 5 and sent["stop"] == ["END"]


# ------------------------------------------------------------------ upstream answers

MALFORMED_ANSWERS = [{"error": {"message": "overloaded"}}, {"choices": []}, {"choices": [1]},
                     {"choices": [{"message": "x"}]}, {"choices": [{"message": {"content": 5}}]},
                     {"choices": [{"message": {"content": "x", "tool_calls": [{"function": {}}]}}]}]


@pytest.mark.parametrize("data", MALFORMED_ANSWERS)
def test_malformed_answers(data: dict[str, Any]) -> None:
    with pytest.raises(MalformedUpstream):
        upstream.parse_response(data)


USAGE_CASES: list[tuple[Any, Usage | None]] = [
    ({"prompt_tokens": 3, "completion_tokens": 4}, Usage(3, 4)),
    ({"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 2}},
     Usage(3, 4, cache_read_tokens=2)),
    ({"prompt_tokens": -1, "completion_tokens": 4}, None), ({"prompt_tokens": 2**60, "completion_tokens": 1}, None),
    ({"prompt_tokens": 1.5, "completion_tokens": 1}, None), ({"prompt_tokens": True, "completion_tokens": 1}, None),
    ("many", None), (None, None),
]


@pytest.mark.parametrize("payload,usage", USAGE_CASES)
def test_usage_is_sane_or_missing(payload: Any, usage: Usage | None) -> None:
    assert upstream.usage_of(payload) == usage


CHUNKS: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
    ({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, (TextDelta("hi"),)),
    ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f",
                                                                                             "arguments": ""}}]}}]},
     (ToolCallDelta(0, "", "c", "f"),)),
    ({"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]}, (Finish("stop", 1),)),
    ({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}, (UsageReport(Usage(1, 2)),)),
    ({"error": {"message": "boom"}}, (UpstreamFailure("boom"),)),
    # the common chunk's short path must read exactly what the full one reads
    ({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
     ()),
    ({"choices": [{"delta": None}]}, ()),
    ({"choices": [{"index": 0, "delta": {"content": None, "refusal": None}, "logprobs": None}]}, ()),
    ({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "length"}]},
     (TextDelta("a"), Finish("length"))),
    ({"choices": [{"index": 3, "delta": {"content": "a"}}]}, (TextDelta("a", 3),)),
    ({"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
     (TextDelta("a"), UsageReport(Usage(1, 2)))),
    ({"choices": [{"index": 0, "delta": {"content": "a"}}], "error": "ignored beside choices"}, (TextDelta("a"),)),
]


@pytest.mark.parametrize("chunk,events", CHUNKS)
def test_stream_chunks(chunk: dict[str, Any], events: tuple[Any, ...]) -> None:
    frame = upstream.StreamDecoder().feed(None, orjson.dumps(chunk))
    assert frame is not None and frame.events == events and frame.raw == chunk


@pytest.mark.parametrize("data", [b"not json", b"[1]", b'{"choices": 1}', b'{"choices": [{"delta": "x"}]}',
                                  b'{"choices": [{"delta": {"content": 3}}]}', b'{"choices": [{"index": -1}]}',
                                  b'{"choices": [{"delta": {"tool_calls": {}}}]}',
                                  b'{"choices": [{"index": true, "delta": {"content": "a"}}]}',
                                  b'{"choices": [{"index": 0, "delta": {"content": ["a"]}}]}',
                                  b'{"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": 1}]}',
                                  b'{"choices": [7]}', b'{"choices": [{"delta": [1]}]}'])
def test_malformed_chunks(data: bytes) -> None:
    with pytest.raises(MalformedUpstream):
        upstream.StreamDecoder().feed(None, data)


def test_done_ends_the_stream() -> None:
    assert upstream.StreamDecoder().feed(None, b"[DONE]") is None


# ------------------------------------------------------------------ SSE reader


class _Source:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def readany(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def _read(chunks: list[bytes], **caps: int) -> list[tuple[str | None, bytes]]:
    async def collect() -> list[tuple[str | None, bytes]]:
        reader = SseReader(_Source(chunks), max_line_bytes=caps.get("line", 100),
                           max_total_bytes=caps.get("total", 1000))
        return [event async for event in reader]
    return asyncio.run(collect())


def test_sse_events_split_across_reads_and_named_events() -> None:
    assert _read([b"data: {\"a\"", b": 1}\n\nevent: ping\r\ndata: {}\r\n\r\n: comment\n", b"data: [DONE]\n\n"]) == [
        (None, b'{"a": 1}'), ("ping", b"{}"), (None, b"[DONE]")]


def test_sse_line_over_the_cap_is_malformed() -> None:
    with pytest.raises(MalformedUpstream):
        _read([b"data: " + b"x" * 200 + b"\n\n"], line=100)
    with pytest.raises(MalformedUpstream):
        _read([b"data: " + b"x" * 60, b"x" * 60], line=100)  # no newline yet, but already too long


def test_sse_stream_over_the_total_cap_is_malformed() -> None:
    with pytest.raises(MalformedUpstream):
        _read([b"data: 1\n\n"] * 200, total=1000)


def test_sse_event_ready_says_whether_the_next_event_is_already_buffered() -> None:
    async def run() -> list[bool]:
        reader = SseReader(_Source([b"data: 1\n\ndata: 2\r\n\r\ndata: 3\n\ndata: 4", b"\n\n"]),
                           max_line_bytes=100, max_total_bytes=1000)
        seen = [reader.event_ready()]  # nothing read yet
        while await reader.next() is not None:
            seen.append(reader.event_ready())
        return seen

    # after 1: 2 is whole (CRLF framing); after 2: 3 is; after 3: 4 has no blank line yet; after 4: the end
    assert asyncio.run(run()) == [False, True, True, False, False]
