"""The Anthropic Messages client codec: request tables, response/stream shapes the `anthropic` SDK accepts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web
from anthropic.types import Message as SdkMessage

from tokensforge.canonical import (
    Choice,
    Finish,
    MalformedUpstream,
    MediaPart,
    Message,
    Request,
    Response,
    TextDelta,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolResult,
    UpstreamFailure,
    Usage,
    UsageReport,
)
from tokensforge.dialects import anthropic_messages as am
from tokensforge.errors import InvalidRequest

USER = {"role": "user", "content": "hi"}
RECEIPT = {"request_id": "req_1", "charge_nanos": 1234}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 100, "messages": [USER], **fields}


# ------------------------------------------------------------------ decode

DECODE_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "minimal",
        body(),
        {"model": "claude-x", "max_output_tokens": 100, "messages": [Message("user", (TextPart("hi"),))],
         "dialect": "anthropic_messages", "stream": False, "notes": []},
    ),
    (
        "system string and text blocks",
        body(system="be brief", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}]),
        {"messages": [Message("system", (TextPart("be brief"),)),
                      Message("user", (TextPart("a"), TextPart("b")))]},
    ),
    (
        "system blocks with cache_control",
        body(system=[{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
                     {"type": "text", "text": "two"}]),
        {"messages": [Message("system", (TextPart("one"), TextPart("two"))), Message("user", (TextPart("hi"),))]},
    ),
    (
        "images and documents",
        body(messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"}},
        ]}]),
        {"messages": [Message("user", (
            MediaPart("image", data_b64="iVBO", media_type="image/png"),
            MediaPart("image", url="https://x.test/a.jpg"),
            MediaPart("file", data_b64="JVBE", media_type="application/pdf"),
            TextPart("plain"),
        ))]},
    ),
    (
        "tool round trip: tool_use, tool_results split into tool messages in order",
        body(
            tools=[{"name": "weather", "description": "Weather now", "input_schema": WEATHER}],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            messages=[
                USER,
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                     "content": [{"type": "text", "text": "no "}, {"type": "text", "text": "city"}]},
                    {"type": "text", "text": "and?"},
                ]},
            ],
        ),
        {
            "tools": (Tool("weather", "Weather now", WEATHER),),
            "tool_choice": ToolChoice("required"),
            "parallel_tool_calls": False,
            "notes": [],
            "untranslatable": ["thinking blocks"],
            "messages": [
                Message("user", (TextPart("hi"),)),
                Message("assistant", (TextPart("checking"), ToolCall("toolu_1", "weather", '{"city":"Oslo"}'),
                                      ToolCall("toolu_2", "weather", "{}"))),
                Message("tool", (ToolResult("toolu_1", "rain"),)),
                Message("tool", (ToolResult("toolu_2", "no city", is_error=True),)),
                Message("user", (TextPart("and?"),)),
            ],
        },
    ),
    ("tool_choice auto", body(tool_choice={"type": "auto"}), {"tool_choice": ToolChoice("auto"),
                                                               "parallel_tool_calls": None}),
    ("tool_choice none", body(tool_choice={"type": "none"}), {"tool_choice": ToolChoice("none")}),
    ("tool_choice tool", body(tool_choice={"type": "tool", "name": "w", "disable_parallel_tool_use": False}),
     {"tool_choice": ToolChoice("function", "w"), "parallel_tool_calls": True}),
    (
        "sampling, stop, metadata, stream, dropped fields",
        body(stop_sequences=["\n\nHuman:"], temperature=0.5, top_p=1, top_k=5, metadata={"user_id": "u-1"},
             stream=True, thinking={"type": "enabled", "budget_tokens": 1024}, service_tier="auto"),
        {"stop": ("\n\nHuman:",), "temperature": 0.5, "top_p": 1.0, "user": "u-1", "stream": True,
         "notes": [], "untranslatable": ["top_k", "thinking", "service_tier"]},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "expected"), DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode(name: str, raw: dict[str, Any], expected: dict[str, Any]) -> None:
    req = am.decode(raw)
    for key, value in expected.items():
        assert getattr(req, key) == value, key


ERROR_CASES: list[tuple[dict[str, Any], str]] = [
    ({"model": "m", "messages": [USER]}, "max_tokens"),
    (body(max_tokens=0), "max_tokens"),
    (body(max_tokens=True), "max_tokens"),
    (body(max_tokens="10"), "max_tokens"),
    (body(model=""), "model"),
    (body(messages=[]), "messages"),
    (body(messages="hi"), "messages"),
    (body(n=2), "n"),
    (body(messages=[{"role": "user", "content": 3}]), "messages.0.content"),
    (body(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages.0.content.0.type"),
    (body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text"),
    (body(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]),
     "messages.0.content.0"),
    (body(messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": "{}"}]}]),
     "messages.0.content.0.input"),
    (body(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}]),
     "messages.0.content.0"),
    (body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "video"}]}]}]),
     "messages.0.content.0.content"),
    (body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "image"}]}]}]),
     "messages.0.content.0.content.0.source"),
    (body(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (body(metadata="u"), "metadata"),
    (body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]),
     "messages.0.content.0.source.type"),
    (body(tools=[{"name": "t"}]), "tools.0.input_schema"),
    (body(tools={"name": "t"}), "tools"),
    (body(tool_choice={"type": "tool"}), "tool_choice.name"),
    (body(tool_choice={"type": "maybe"}), "tool_choice.type"),
    (body(tool_choice="auto"), "tool_choice"),
    (body(stop_sequences="x"), "stop_sequences"),
    (body(temperature=1.5), "temperature"),
    (body(temperature="hot"), "temperature"),
    (body(metadata={"user_id": 3}), "metadata.user_id"),
    (body(stream="yes"), "stream"),
    (body(system=3), "system"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "param"), ERROR_CASES)
def test_decode_errors_name_the_field(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        am.decode(raw)
    assert excinfo.value.param == param
    assert excinfo.value.status == 400


def test_decode_count_tokens_needs_no_max_tokens_and_accepts_what_create_accepts() -> None:
    req = am.decode_count_tokens({"model": "m", "system": "s", "messages": [USER], "tools": []})
    assert req.max_output_tokens is None and req.dialect == "anthropic_messages"
    assert [m.role for m in req.messages] == ["system", "user"]
    req = am.decode_count_tokens({"model": "m", "messages": [USER], "thinking": {"type": "enabled"}})
    assert req.untranslatable == ["thinking"]
    assert am.count_tokens_response(42) == {"input_tokens": 42}


# ------------------------------------------------------------------ unary encode

ENCODE_CASES: list[tuple[str, Choice, list[dict[str, Any]], str]] = [
    ("text", Choice(0, "hello"), [{"type": "text", "text": "hello"}], "end_turn"),
    ("length", Choice(0, "hel", finish_reason="length"),
     [{"type": "text", "text": "hel"}], "max_tokens"),
    ("tool calls", Choice(0, None, (ToolCall("call_1", "weather", '{"city": "Oslo"}'),
                                    ToolCall("call_2", "clock", "")), "tool_calls"),
     [{"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}},
      {"type": "tool_use", "id": "call_2", "name": "clock", "input": {}}], "tool_use"),
    ("refusal", Choice(0, None, refusal="no", finish_reason="stop"),
     [{"type": "text", "text": "no"}], "refusal"),
    ("content filter", Choice(0, "", finish_reason="content_filter"), [], "refusal"),
    ("no finish reason", Choice(0, "x", finish_reason=None), [{"type": "text", "text": "x"}],
     "end_turn"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "choice", "content", "stop_reason"), ENCODE_CASES,
                         ids=[c[0] for c in ENCODE_CASES])  # fmt: skip
def test_encode_response(name: str, choice: Choice, content: list[dict[str, Any]], stop_reason: str) -> None:
    request = am.decode(body(model="claude-client"))
    resp = Response(model="upstream-name", choices=[choice], usage=Usage(10, 5))
    usage = Usage(prompt_tokens=10, completion_tokens=5, cache_read_tokens=4)
    out = am.encode_response(resp, message_id="msg_abc", request=request, usage=usage, receipt=RECEIPT)
    assert out["content"] == content
    assert out["stop_reason"] == stop_reason
    assert out["model"] == "claude-client" and out["id"] == "msg_abc" and out["receipt"] == RECEIPT
    assert out["usage"] == {"input_tokens": 6, "output_tokens": 5, "cache_read_input_tokens": 4,
                            "cache_creation_input_tokens": 0,
                            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}
    message = SdkMessage.model_validate(orjson.loads(orjson.dumps(out)), strict=True)
    assert message.stop_reason == stop_reason
    assert message.usage.input_tokens == 6
    assert message.model_extra == {"receipt": RECEIPT}


def test_encode_response_rejects_tool_arguments_that_are_not_an_object() -> None:
    request = am.decode(body())
    bad = Response(model="m", choices=[Choice(0, None, (ToolCall("c", "f", "[1]"),), "tool_calls")], usage=None)
    with pytest.raises(MalformedUpstream):
        am.encode_response(bad, message_id="msg", request=request, usage=Usage(1, 1), receipt={})


@pytest.mark.parametrize(("status", "error_type"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (413, "request_too_large"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
    (504, "timeout_error"), (418, "invalid_request_error"), (599, "api_error"),
])  # fmt: skip
def test_error_body(status: int, error_type: str) -> None:
    assert am.error_body(status, "nope") == {"type": "error", "error": {"type": error_type, "message": "nope"}}


# ------------------------------------------------------------------ stream encode


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.decode().split("\n\n"):
        if not chunk:
            continue
        event_line, data_line = chunk.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        payload = orjson.loads(data_line.removeprefix("data: "))
        assert payload["type"] == event_line.removeprefix("event: ")
        events.append((event_line.removeprefix("event: "), payload))
    return events


USAGE = Usage(7, 9)


def encoded_stream(events: list[Any], usage: Usage = USAGE) -> bytes:
    encoder = am.StreamEncoder(message_id="msg_s1", request=am.decode(body(model="claude-client", stream=True)))
    raw = encoder.start(input_tokens=usage.prompt_tokens) + encoder.ping()
    for event in events:
        raw += encoder.feed(event)
    return raw + encoder.finish(usage, RECEIPT)


TEXT_THEN_TOOLS = [
    TextDelta("Let me "),
    TextDelta(""),
    TextDelta("check."),
    ToolCallDelta(0, id="call_a", name="weather"),
    ToolCallDelta(0, arguments='{"city": '),
    ToolCallDelta(0, arguments='"Oslo"}'),
    ToolCallDelta(1, id="call_b", name="clock", arguments="{}"),
    TextDelta("other choice", choice=1),
    Finish("tool_calls"),
    UsageReport(Usage(7, 9)),
]


def test_stream_encoder_event_order() -> None:
    events = parse_sse(encoded_stream(TEXT_THEN_TOOLS))
    summary = [(name, p.get("index"), (p.get("delta") or p.get("content_block") or {}).get("type"))
               for name, p in events]  # fmt: skip
    assert summary == [
        ("message_start", None, None),
        ("ping", None, None),
        ("content_block_start", 0, "text"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}}
    delta = events[-2][1]
    assert delta["receipt"] == RECEIPT
    assert delta["usage"]["output_tokens"] == 9 and delta["delta"]["stop_reason"] == "tool_use"


def test_stream_encoder_defaults_and_failure() -> None:
    events = parse_sse(encoded_stream([TextDelta("x"), UpstreamFailure("ignored here")]))
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    events = parse_sse(encoded_stream([ToolCallDelta(0, id="c", name="f")]))
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    events = parse_sse(encoded_stream([]))
    assert [e for e, _ in events] == ["message_start", "ping", "message_delta", "message_stop"]
    encoder = am.StreamEncoder(message_id="m", request=am.decode(body()))
    failed = parse_sse(encoder.fail("overloaded_error", "upstream gave up"))
    error = {"type": "overloaded_error", "message": "upstream gave up"}
    assert failed == [("error", {"type": "error", "error": error})]


@asynccontextmanager
async def serve_bytes(raw: bytes) -> AsyncIterator[str]:
    """A one-route server on 127.0.0.1 answering every POST /v1/messages with `raw` as SSE."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(raw)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_anthropic_sdk_accepts_the_stream() -> None:
    raw = encoded_stream(TEXT_THEN_TOOLS)
    async with serve_bytes(raw) as url, anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as sdk:
        async with sdk.messages.stream(model="claude-client", max_tokens=100, messages=[USER]) as stream:
            texts = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        raw_events = [e.type async for e in await sdk.messages.create(
            model="claude-client", max_tokens=100, messages=[USER], stream=True)]  # fmt: skip
    assert "".join(texts) == "Let me check."
    assert final.id == "msg_s1" and final.model == "claude-client"
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[1].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert final.content[2].input == {}  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 9)
    assert raw_events[0] == "message_start" and raw_events[-2:] == ["message_delta", "message_stop"]
    assert raw_events.count("content_block_start") == 3


async def test_anthropic_sdk_raises_on_error_event() -> None:
    encoder = am.StreamEncoder(message_id="msg_e", request=am.decode(body()))
    raw = encoder.start(3) + encoder.feed(TextDelta("par")) + encoder.fail("api_error", "upstream broke")
    async with serve_bytes(raw) as url, anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as sdk:
        with pytest.raises(anthropic.APIStatusError) as excinfo:
            async with sdk.messages.stream(model="m", max_tokens=10, messages=[USER]) as stream:
                async for _ in stream:
                    pass
    assert "upstream broke" in str(excinfo.value)


def test_request_roundtrip_through_encode_keeps_client_model() -> None:
    req = am.decode(body(model="my-alias"))
    assert isinstance(req, Request)
    resp = Response(model="upstream-model", choices=[Choice(0, "ok")], usage=Usage(1, 1))
    out = am.encode_response(resp, message_id="msg_1", request=req, usage=Usage(1, 1), receipt={})
    assert out["model"] == "my-alias"
