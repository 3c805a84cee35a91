"""The Anthropic upstream codec: request/answer tables, and round trips against the real mock upstream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tokensforge.canonical import (
    Choice,
    Finish,
    Frame,
    MalformedUpstream,
    MediaPart,
    Message,
    Request,
    StreamEvent,
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
from tokensforge.errors import InvalidRequest
from tokensforge.mock_upstream import (
    TOOL_RESULT_PREFIX,
    MockConfig,
    anthropic_prompt_tokens,
    create_app,
    reply_text,
)
from tokensforge.upstream import anthropic as up

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
HI = Message("user", (TextPart("hi"),))
T_JSON = [{"name": "t", "input_schema": {"type": "object", "properties": {}}}]


def request(**fields: Any) -> Request:
    return Request(**{"model": "alias", "messages": [HI], "max_output_tokens": 50, **fields})


def built(req: Request) -> dict[str, Any]:
    result = orjson.loads(up.build(req, "claude-upstream"))
    assert isinstance(result, dict)
    return result


# ------------------------------------------------------------------ headers and build


def test_headers() -> None:
    assert up.headers("sk-ant", up.DEFAULT_VERSION, None) == {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant",
    }
    beta = up.headers(None, "2024-01-01", "prompt-caching-2024-07-31")
    assert beta["anthropic-beta"] == "prompt-caching-2024-07-31" and "x-api-key" not in beta
    assert beta["anthropic-version"] == "2024-01-01"


BUILD_CASES: list[tuple[str, Request, dict[str, Any]]] = [
    ("minimal", request(), {"model": "claude-upstream", "max_tokens": 50,
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    (
        "systems joined, sampling, stop, user, stream",
        request(messages=[Message("system", (TextPart("a"),)), Message("system", (TextPart("b"),)), HI],
                temperature=1.7, top_p=0.9, stop=("END",), user="u1", stream=True),
        {"system": "a\n\nb", "temperature": 1.0, "top_p": 0.9, "stop_sequences": ["END"],
         "metadata": {"user_id": "u1"}, "stream": True},
    ),
    (
        "tool turn: tool results merged into one user turn with the following text",
        request(
            messages=[
                HI,
                Message("assistant", (TextPart(""), ToolCall("c1", "weather", '{"city":"Oslo"}'),
                                      ToolCall("c2", "clock", ""))),
                Message("tool", (ToolResult("c1", "rain"),)),
                Message("tool", (ToolResult("c2", "boom", is_error=True),)),
                Message("user", (TextPart("so?"),)),
            ],
            tools=(Tool("weather", "Weather now", WEATHER, strict=True), Tool("clock")),
            tool_choice=ToolChoice("function", "weather"),
            parallel_tool_calls=False,
        ),
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "c2", "name": "clock", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "c1", "content": "rain"},
                    {"type": "tool_result", "tool_use_id": "c2", "content": "boom", "is_error": True},
                    {"type": "text", "text": "so?"},
                ]},
            ],
            "tools": [
                {"name": "weather", "description": "Weather now", "input_schema": WEATHER},
                {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
            ],
            "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        },
    ),
    ("tool_choice required", request(tools=(Tool("t"),), tool_choice=ToolChoice("required")),
     {"tool_choice": {"type": "any"}, "tools": T_JSON}),
    ("no parallel calls alone", request(tools=(Tool("t"),), parallel_tool_calls=False),
     {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}, "tools": T_JSON}),
    ("tool_choice none", request(tools=(Tool("t"),), tool_choice=ToolChoice("none"), parallel_tool_calls=False),
     {"tool_choice": {"type": "none"}, "tools": T_JSON}),
    (
        "media",
        request(messages=[Message("user", (
            MediaPart("image", url="data:image/png;base64,iVBO"),
            MediaPart("image", url="https://x.test/a.png"),
            MediaPart("file", data_b64="JVBE", media_type="application/pdf"),
        ))]),
        {"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
        ]}]},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("name", "req", "expected"), BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
def test_build(name: str, req: Request, expected: dict[str, Any]) -> None:
    out = built(req)
    for key, value in expected.items():
        assert out[key] == value, key
    absent = {"system", "tools", "tool_choice", "stop_sequences", "temperature", "metadata", "stream"} - set(expected)
    assert not absent & set(out), absent & set(out)
    assert req.notes == []


def test_build_notes_what_messages_cannot_express() -> None:
    req = request(response_format={"type": "json_object"}, reasoning={"effort": "high"}, metadata={"k": "v"})
    out = built(req)
    assert req.notes == ["dropped: response_format", "dropped: reasoning", "dropped: metadata"]
    assert "metadata" not in out and "response_format" not in out
    built(req)
    assert len(req.notes) == 3  # a retry on another channel does not repeat the notes


BUILD_ERRORS: list[tuple[Request, str]] = [
    (request(n=2), "n"),
    (request(max_output_tokens=None), "max_tokens"),
    (request(messages=[Message("assistant", (ToolCall("c", "f", "{oops"),))]), "messages.0"),
    (request(messages=[Message("assistant", (ToolCall("c", "f", "[1, 2]"),))]), "messages.0"),
    (request(messages=[Message("user", (MediaPart("audio", data_b64="AA", media_type="audio/wav"),))]), "messages.0"),
    (request(messages=[Message("user", (MediaPart("image", url="data:image/png,raw"),))]), "messages.0"),
    (request(messages=[Message("user", (MediaPart("image", data_b64="AA"),))]), "messages.0"),
    (request(messages=[Message("user", (MediaPart("image"),))]), "messages.0"),
]  # fmt: skip


@pytest.mark.parametrize(("req", "param"), BUILD_ERRORS)
def test_build_refuses(req: Request, param: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        up.build(req, "claude-upstream")
    assert excinfo.value.param == param


# ------------------------------------------------------------------ unary answers


def message(**fields: Any) -> dict[str, Any]:
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-upstream",
        "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 3}, **fields,
    }  # fmt: skip


PARSE_CASES: list[tuple[str, dict[str, Any], Choice, Usage | None]] = [
    ("text", message(), Choice(0, "hello", (), "stop"), Usage(10, 3)),
    ("max_tokens", message(stop_reason="max_tokens"), Choice(0, "hello", (), "length"), Usage(10, 3)),
    ("stop_sequence", message(stop_reason="stop_sequence", stop_sequence="END"), Choice(0, "hello"), Usage(10, 3)),
    ("refusal", message(stop_reason="refusal"), Choice(0, "hello", (), "content_filter"), Usage(10, 3)),
    (
        "thinking, text and tools",
        message(content=[{"type": "thinking", "thinking": "hm", "signature": "s"}, {"type": "text", "text": "a"},
                         {"type": "text", "text": "b"},
                         {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
                stop_reason="tool_use"),
        Choice(0, "ab", (ToolCall("toolu_1", "weather", '{"city":"Oslo"}'),), "tool_calls"),
        Usage(10, 3),
    ),
    ("only tools: text is None", message(content=[{"type": "tool_use", "id": "t", "name": "f", "input": {}}]),
     Choice(0, None, (ToolCall("t", "f", "{}"),), "stop"), Usage(10, 3)),
    ("cache counts are prompt", message(usage={"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 5,
                                               "cache_creation_input_tokens": 2}),
     Choice(0, "hello"), Usage(17, 3, cache_read_tokens=5, cache_write_tokens=2)),
    ("null cache fields", message(usage={"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": None}),
     Choice(0, "hello"), Usage(1, 2)),
    ("no usage", message(usage=None), Choice(0, "hello"), None),
    ("negative usage", message(usage={"input_tokens": -1, "output_tokens": 3}), Choice(0, "hello"), None),
    ("float usage", message(usage={"input_tokens": 1.5, "output_tokens": 3}), Choice(0, "hello"), None),
    ("absurd usage", message(usage={"input_tokens": 2**60, "output_tokens": 3}), Choice(0, "hello"), None),
    ("bool usage", message(usage={"input_tokens": 1, "output_tokens": True}), Choice(0, "hello"), None),
    ("missing input", message(usage={"output_tokens": 3}), Choice(0, "hello"), None),
    ("null output", message(usage={"input_tokens": 3, "output_tokens": None}), Choice(0, "hello"), None),
    ("bad cache count", message(usage={"input_tokens": 3, "output_tokens": 1, "cache_read_input_tokens": "4"}),
     Choice(0, "hello"), None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "choice", "usage"), PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_response(name: str, data: dict[str, Any], choice: Choice, usage: Usage | None) -> None:
    resp = up.parse_response(data)
    assert resp.choices == [choice]
    assert resp.usage == usage
    assert resp.model == "claude-upstream"


@pytest.mark.parametrize("data", [
    {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
    [],
    message(type="completion"),
    message(content="hello"),
    message(content=["hello"]),
    message(content=[{"type": "text"}]),
    message(content=[{"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]),
    message(content=[{"type": "tool_use", "id": 1, "name": "f", "input": {}}]),
    message(stop_reason=3),
])  # fmt: skip
def test_parse_response_malformed(data: Any) -> None:
    with pytest.raises(MalformedUpstream):
        up.parse_response(data)


def test_error_message() -> None:
    assert up.error_message(b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}') == (
        "slow down"
    )
    for raw in (b"", b"not json", b"[]", b'{"error": "x"}', b'{"error": {"message": 3}}'):
        assert up.error_message(raw) == ""


# ------------------------------------------------------------------ stream decoding

STREAM: list[tuple[str, dict[str, Any], tuple[StreamEvent, ...]]] = [
    ("message_start", {"type": "message_start", "message": {**message(content=[], stop_reason=None),
                                                            "usage": {"input_tokens": 12, "output_tokens": 1,
                                                                      "cache_read_input_tokens": 4}}},
     (UsageReport(Usage(16, 0, cache_read_tokens=4), final=False),)),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "thinking", "thinking": ""}}, ()),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "thinking_delta", "thinking": "hm"}}, ()),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}, ()),
    ("ping", {"type": "ping"}, ()),
    ("content_block_start", {"type": "content_block_start", "index": 1,
                             "content_block": {"type": "text", "text": ""}}, ()),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "text_delta", "text": "Hi"}}, (TextDelta("Hi"),)),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}, ()),
    ("content_block_start", {"type": "content_block_start", "index": 2,
                             "content_block": {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {}}},
     (ToolCallDelta(0, id="toolu_a", name="weather"),)),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city"'}},
     (ToolCallDelta(0, arguments='{"city"'),)),
    ("content_block_start", {"type": "content_block_start", "index": 3,
                             "content_block": {"type": "tool_use", "id": "toolu_b", "name": "clock", "input": {}}},
     (ToolCallDelta(1, id="toolu_b", name="clock"),)),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": ': "Oslo"}'}},
     (ToolCallDelta(0, arguments=': "Oslo"}'),)),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 20}},
     (Finish("tool_calls"), UsageReport(Usage(16, 20, cache_read_tokens=4)))),
    ("message_stop", {"type": "message_stop"}, ()),
    ("future_event", {"type": "future_event", "x": 1}, ()),
]  # fmt: skip


def test_stream_decoder_table() -> None:
    decoder = up.StreamDecoder()
    for event, data, expected in STREAM:
        assert decoder.feed(event, data) == Frame(expected), data["type"]


def test_stream_decoder_without_event_names_and_usage_gaps() -> None:
    decoder = up.StreamDecoder()
    decoder.feed(None, {"type": "message_start", "message": {"usage": {}}})
    frame = decoder.feed(None, {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                "usage": {"output_tokens": 5}})  # fmt: skip
    assert frame.events == (Finish("length"),)  # input tokens never known: no usage report
    decoder = up.StreamDecoder()
    decoder.feed("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}})
    late = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 4, "output_tokens": 2, "cache_read_input_tokens": None}}  # fmt: skip
    assert decoder.feed("message_delta", late).events == (Finish("stop"), UsageReport(Usage(4, 2)))
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert decoder.feed("error", error).events == (UpstreamFailure("Overloaded"),)


@pytest.mark.parametrize(("event", "data"), [
    (None, {"no": "type"}),
    ("message_start", {"type": "message_stop"}),
    (None, {"type": "message_start"}),
    (None, {"type": "content_block_start", "content_block": {"type": "text", "text": ""}}),
    (None, {"type": "content_block_start", "index": 0}),
    (None, {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t"}}),
    (None, {"type": "content_block_delta", "index": 9, "delta": {"type": "text_delta", "text": "x"}}),
    (None, {"type": "message_delta"}),
])  # fmt: skip
def test_stream_decoder_malformed(event: str | None, data: dict[str, Any]) -> None:
    with pytest.raises(MalformedUpstream):
        up.StreamDecoder().feed(event, data)


def test_stream_decoder_malformed_deltas_on_open_blocks() -> None:
    decoder = up.StreamDecoder()
    decoder.feed(None, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    for delta in ({"type": "input_json_delta", "partial_json": "{}"}, {"type": "text_delta"}, None):
        with pytest.raises(MalformedUpstream):
            decoder.feed(None, {"type": "content_block_delta", "index": 0, "delta": delta})


# ------------------------------------------------------------------ against the mock upstream over HTTP

SECRET = "sk-ant-mock"


def sse_frames(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    frames = []
    for chunk in raw.decode().split("\n\n"):
        event, data = None, None
        for line in chunk.splitlines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = orjson.loads(line.removeprefix("data: "))
        if data is not None:
            frames.append((event, data))
    return frames


async def call(client: TestClient, req: Request, beta: str | None = None) -> tuple[int, bytes]:
    headers = up.headers(SECRET, up.DEFAULT_VERSION, beta)
    resp = await client.post("/v1/messages", data=up.build(req, "claude-upstream"), headers=headers)
    return resp.status, await resp.read()


def decode_all(raw: bytes) -> list[StreamEvent]:
    decoder = up.StreamDecoder()
    return [e for event, data in sse_frames(raw) for e in decoder.feed(event, data).events]


@pytest.fixture
async def mock(aiohttp_client: Any) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(MockConfig(api_key=SECRET)))
    return client


async def test_mock_unary_and_stream_text(mock: TestClient) -> None:
    req = request(messages=[Message("system", (TextPart("be brief"),)), HI], max_output_tokens=5)
    prompt = anthropic_prompt_tokens(orjson.loads(up.build(req, "x")))
    status, raw = await call(mock, req, beta="tools-2024-04-04")
    assert status == 200
    resp = up.parse_response(orjson.loads(raw))
    assert resp.choices == [Choice(0, reply_text(5), (), "length")]
    assert resp.usage == Usage(prompt, 5)
    last = (await (await mock.get("/_mock/stats")).json())["last_request"]
    assert last["headers"]["anthropic-version"] == "2023-06-01"
    assert last["headers"]["anthropic-beta"] == "tools-2024-04-04"
    assert last["body"]["system"] == "be brief" and last["body"]["model"] == "claude-upstream"

    req.stream = True
    status, raw = await call(mock, req)
    events = decode_all(raw)
    assert status == 200
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == reply_text(5)
    assert events[-2:] == [Finish("length"), UsageReport(Usage(prompt, 5))]


async def test_mock_tool_call_round_trip(mock: TestClient) -> None:
    tools = (Tool("clock"), Tool("weather", "Weather now", WEATHER))
    ask = Message("user", (TextPart("what does weather say in Oslo"),))
    status, raw = await call(mock, request(messages=[ask], tools=tools))
    assert status == 200
    resp = up.parse_response(orjson.loads(raw))
    (call_,) = resp.choices[0].tool_calls
    assert (call_.name, orjson.loads(call_.arguments)) == ("weather", {"city": "what does weather say in Oslo"})
    assert resp.choices[0].finish_reason == "tool_calls" and resp.choices[0].text is None

    stream_events = decode_all((await call(mock, request(messages=[ask], tools=tools, stream=True)))[1])
    deltas = [e for e in stream_events if isinstance(e, ToolCallDelta)]
    assert deltas[0].index == 0 and deltas[0].name == "weather" and deltas[0].id
    assert orjson.loads("".join(d.arguments for d in deltas)) == {"city": "what does weather say in Oslo"}
    assert Finish("tool_calls") in stream_events

    answered = [ask, Message("assistant", (call_,)), Message("tool", (ToolResult(call_.id, "rain, 4 degrees"),))]
    status, raw = await call(mock, request(messages=answered, tools=tools))
    final = up.parse_response(orjson.loads(raw))
    assert final.choices[0].text == TOOL_RESULT_PREFIX + "rain, 4 degrees"
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].tool_calls
    events = decode_all((await call(mock, request(messages=answered, tools=tools, stream=True)))[1])
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == TOOL_RESULT_PREFIX + "rain, 4 degrees"


async def test_mock_errors_are_anthropic_shaped(mock: TestClient) -> None:
    resp = await mock.post("/v1/messages", data=up.build(request(), "m"), headers=up.headers("wrong", "x", None))
    assert resp.status == 401
    assert up.error_message(await resp.read()) == "invalid x-api-key"
    await mock.post("/_mock/faults", json={"per_model": {"claude-upstream": {"error_status": 529}}})
    status, raw = await call(mock, request())
    assert status == 529
    assert orjson.loads(raw)["error"]["type"] == "overloaded_error"
    assert up.error_message(raw)
