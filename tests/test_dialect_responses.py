"""The OpenAI Responses codec: table-driven decode/encode, the stream encoder's event order, and the
official SDKs (openai, openai-agents) reading what it writes over real HTTP on loopback."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tokensforge.canonical import (
    Choice,
    Finish,
    MediaPart,
    Message,
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
    UpstreamFailure,
)
from tokensforge.dialects import openai_responses as codec
from tokensforge.errors import InvalidRequest

RECEIPT = {"request_id": "req_test", "charge_nanos": 42, "status": "succeeded"}
USAGE = Usage(prompt_tokens=11, completion_tokens=7, cache_read_tokens=3, reasoning_tokens=2)
WEATHER: dict[str, Any] = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "input": "hi", **fields}


def user(text: str) -> Message:
    return Message("user", (TextPart(text),))


# ================================================================== decode: each input form


DECODE_CASES: list[tuple[str, dict[str, Any], list[Message]]] = [
    ("string input", body(), [user("hi")]),
    ("instructions lead", body(instructions="be brief"),
     [Message("system", (TextPart("be brief"),)), user("hi")]),
    ("role item without type", body(input=[{"role": "user", "content": "hello"}]), [user("hello")]),
    ("developer is system", body(input=[{"type": "message", "role": "developer", "content": "rules"}]),
     [Message("system", (TextPart("rules"),))]),
    ("parts and image url", body(input=[{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "what is"},
        {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "low"}]}]),
     [Message("user", (TextPart("what is"), MediaPart(kind="image", url="https://x.test/a.png", detail="low")))]),
    ("inline file", body(input=[{"role": "user", "content": [
        {"type": "input_file", "file_data": "data:application/pdf;base64,QUJD", "filename": "a.pdf"}]}]),
     [Message("user", (MediaPart(kind="file", url="data:application/pdf;base64,QUJD"),))]),
    ("assistant output_text, calls join it, outputs are tool messages", body(input=[
        {"role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"A\"}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{\"city\":\"B\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
    ]), [user("weather?"),
         Message("assistant", (TextPart("Looking."), ToolCall("c1", "get_weather", "{\"city\":\"A\"}"),
                               ToolCall("c2", "get_weather", "{\"city\":\"B\"}"))),
         Message("tool", (ToolResult("c1", "sunny"),)), Message("tool", (ToolResult("c2", "rain"),))]),
    ("reasoning items dropped", body(input=[{"type": "reasoning", "id": "rs_1", "summary": []},
                                            {"role": "user", "content": "go"}]), [user("go")]),
]


@pytest.mark.parametrize(("case", "request_body", "messages"), DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_input_forms(case: str, request_body: dict[str, Any], messages: list[Message]) -> None:
    req = codec.decode(request_body)
    assert req.dialect == "openai_responses"
    assert req.model == "gpt-4o-mini"
    assert req.messages == messages
    if case == "reasoning items dropped":
        assert (req.notes, req.untranslatable) == ([], ["reasoning items"])


def test_decode_translates_every_field() -> None:
    req = codec.decode(body(
        max_output_tokens=300, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False, temperature=0.2, top_p=0.9, metadata={"team": "a"}, user="u1", stream=True,
        reasoning={"effort": "low", "summary": "auto"}, store=False, include=["reasoning.encrypted_content"],
        truncation="auto", service_tier="flex", stream_options={"include_obfuscation": False},
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
    ))
    assert (req.max_output_tokens, req.parallel_tool_calls, req.temperature, req.top_p) == (300, False, 0.2, 0.9)
    assert req.tools == (Tool("get_weather", WEATHER["description"], WEATHER["parameters"], None),)
    assert req.tool_choice == ToolChoice(mode="function", name="get_weather")
    assert (req.metadata, req.user, req.stream) == ({"team": "a"}, "u1", True)
    assert req.reasoning == {"effort": "low", "summary": "auto"}
    assert req.response_format == {"type": "json_schema",
                                   "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}}
    assert req.notes == []
    assert req.untranslatable == ["include", "service_tier"]
    assert (req.n, req.stop) == (1, ())
    assert req.raw is not None and req.raw["service_tier"] == "flex"  # kept for a native channel


@pytest.mark.parametrize(("text", "expected"), [
    ({"format": {"type": "text"}}, None),
    ({"format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"verbosity": "low"}, None),
])
def test_decode_text_format(text: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert codec.decode(body(text=text)).response_format == expected


def test_options() -> None:
    assert codec.options(body()) == codec.ResponsesOptions(store=True, previous_response_id=None, include=[])
    opts = codec.options(body(store=False, previous_response_id="resp_1", include=["x"], route="routed"))
    assert opts == codec.ResponsesOptions(store=False, previous_response_id="resp_1", include=["x"], route="routed")


# ================================================================== decode: refused → 400 naming the field


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"input": "hi"}, "model"),
    (body(input=None), "input"),
    (body(input=7), "input"),
    (body(n=2), "n"),
    (body(background=True), "background"),
    (body(conversation="conv_1"), "conversation"),
    (body(prompt={"id": "pmpt_1"}), "prompt"),
    (body(top_logprobs=3), "top_logprobs"),
    (body(tools=[{"type": "function", "name": "bad name!"}]), "tools[0].name"),
    (body(tool_choice={"type": "function", "name": "missing"}, tools=[WEATHER]), "tool_choice.name"),
    (body(tool_choice="required"), "tool_choice"),
    (body(max_output_tokens=0), "max_output_tokens"),
    (body(max_output_tokens=True), "max_output_tokens"),
    (body(temperature=3), "temperature"),
    (body(top_p="1"), "top_p"),
    (body(metadata={"k": 1}), "metadata.k"),
    (body(stream="yes"), "stream"),
    (body(store="no"), "store"),
    (body(include="x"), "include"),
    (body(truncation="sometimes"), "truncation"),
    (body(reasoning={"effort": "huge"}), "reasoning.effort"),
    (body(text={"format": {"type": "yaml"}}), "text.format.type"),
    (body(text={"format": {"type": "json_schema", "schema": {}}}), "text.format"),
    (body(input=[{"type": "message", "role": "user", "content": [
        {"type": "input_image", "file_id": "file_1"}]}]), "input[0].content[0].file_id"),
    (body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x"}]}]),
     "input[0].content[0].image_url"),
    (body(input=[{"role": "system", "content": [{"type": "input_image", "image_url": "https://x"}]}]),
     "input[0].content[0].type"),
    (body(input=[{"role": "user", "content": [{"type": "input_audio"}]}]), "input[0].content[0].type"),
    (body(input=[{"role": "robot", "content": "x"}]), "input[0].role"),
    (body(input=[{"role": "user", "content": 5}]), "input[0].content"),
    (body(input=[{"type": "function_call", "call_id": "c", "name": "f"}]), "input[0].arguments"),
    (body(input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}]), "input[0].call_id"),
    (body(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                 {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_audio"}]}]),
     "input[1].output[0]"),
    (body(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                 {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]),
     "input[1].output[0].image_url"),
    (body(provider={"order": ["x"]}), "provider"),
    (body(models=["a", "b"]), "models"),
    (body(input=[{"type": "item_reference", "id": "msg_1"}]), "input[0].type"),
    (body(input=["hi"]), "input[0]"),
    (body(input=[]), "input"),
    (body(input=[{"type": "reasoning", "summary": []}]), "input"),
    (body(tools=[WEATHER, WEATHER]), "tools[1].name"),
    (body(stream_options=True), "stream_options"),
]


@pytest.mark.parametrize(("request_body", "param"), REFUSED, ids=[p for _, p in REFUSED])
def test_decode_refuses_with_param(request_body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        codec.decode(request_body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.body()["error"]["param"] == param


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
FIELD = st.sampled_from(["model", "input", "instructions", "max_output_tokens", "tools", "tool_choice", "text",
                         "reasoning", "metadata", "temperature", "truncation", "include", "store", "top_logprobs"])
PART = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "input_image", "input_file", "output_text",
                                                       "refusal", "x"])}, optional={"text": JSON, "image_url": JSON})
ITEM = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "x"]) | JSON,
    "role": st.sampled_from(["user", "assistant", "developer", "tool"]) | JSON,
    "content": st.lists(PART, max_size=2) | JSON, "call_id": JSON, "name": JSON, "arguments": JSON, "output": JSON})


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(FIELD, JSON, max_size=4), st.lists(ITEM, max_size=3) | JSON)
def test_decode_never_fails_with_anything_but_a_400(fields: dict[str, Any], items: Any) -> None:
    """SPEC §5: no client input gets a 500 — any body decodes or raises InvalidRequest."""
    try:
        codec.decode({"model": "m", "input": items, **fields})
        codec.options({"model": "m", **fields})
    except InvalidRequest as exc:
        assert exc.status == 400


def test_refusals_say_why() -> None:
    for field_name in ("background", "conversation", "prompt"):
        with pytest.raises(InvalidRequest) as caught:
            codec.decode(body(**{field_name: "x" if field_name != "background" else True}))
        assert "not supported" in caught.value.message or "cannot be served" in caught.value.message


def test_refused_fields_accepted_when_unset() -> None:
    req = codec.decode(body(background=False, conversation=None, prompt=None, top_logprobs=0))
    assert req.messages == [user("hi")]


# ================================================================== encode (unary)


def decoded(**fields: Any) -> Request:
    return codec.decode(body(**fields))


ENCODE_CASES: list[tuple[str, Choice, str, list[str]]] = [
    ("text", Choice(0, "Hello there"), "completed", ["message"]),
    ("tool calls", Choice(0, None, (ToolCall("call_a", "get_weather", "{\"city\":\"A\"}"),
                                    ToolCall("call_b", "get_weather", "{\"city\":\"B\"}")), "tool_calls"),
     "completed", ["function_call", "function_call"]),
    ("text then call", Choice(0, "Checking.", (ToolCall("call_a", "get_weather", "{}"),), "tool_calls"),
     "completed", ["message", "function_call"]),
    ("length", Choice(0, "cut sho", finish_reason="length"), "incomplete", ["message"]),
    ("refusal", Choice(0, None, refusal="I can't help with that."), "completed", ["message"]),
    ("empty", Choice(0, None), "completed", ["message"]),
]


@pytest.mark.parametrize(("case", "choice", "status", "kinds"), ENCODE_CASES, ids=[c[0] for c in ENCODE_CASES])
def test_encode_response_validates_strictly(case: str, choice: Choice, status: str, kinds: list[str]) -> None:
    req = decoded(instructions="be brief", tools=[WEATHER], max_output_tokens=50, metadata={"k": "v"},
                  temperature=0.5, previous_response_id="resp_prev", text={"format": {"type": "json_object"}})
    data = codec.encode_response(Response(model="upstream-model", choices=[choice], usage=USAGE),
                                 response_id="resp_r1", request=req, created_at=1_700_000_000, usage=USAGE,
                                 receipt=RECEIPT)
    sdk = SdkResponse.model_validate(data, strict=True)
    assert (sdk.id, sdk.object, sdk.model, sdk.status) == ("resp_r1", "response", "gpt-4o-mini", status)
    assert [item.type for item in sdk.output] == kinds
    assert sdk.output_text == (choice.text or "")
    assert sdk.instructions == "be brief" and sdk.max_output_tokens == 50 and sdk.temperature == 0.5
    assert sdk.previous_response_id == "resp_prev" and sdk.metadata == {"k": "v"}
    assert sdk.text is not None and sdk.text.format is not None and sdk.text.format.type == "json_object"
    assert [t.name for t in sdk.tools if t.type == "function"] == ["get_weather"]
    assert sdk.usage is not None
    assert (sdk.usage.input_tokens, sdk.usage.output_tokens, sdk.usage.total_tokens) == (11, 7, 18)
    assert sdk.usage.input_tokens_details.cached_tokens == 3
    assert sdk.usage.output_tokens_details.reasoning_tokens == 2
    assert data["receipt"] == RECEIPT and sdk.error is None
    assert len({item.id for item in sdk.output}) == len(sdk.output)
    calls = [item for item in sdk.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        (t.id, t.name, t.arguments, "completed") for t in choice.tool_calls]
    if case == "length":
        assert sdk.incomplete_details is not None and sdk.incomplete_details.reason == "max_output_tokens"
    else:
        assert sdk.incomplete_details is None
    if case == "refusal":
        message = sdk.output[0]
        assert message.type == "message" and message.content[-1].type == "refusal"


def test_encode_survives_the_lifecycle_replacing_the_cap() -> None:
    """The lifecycle sets the reserved output cap on a copy; the echo fields must come along."""
    req = dataclasses.replace(decoded(instructions="be brief", store=False), max_output_tokens=64)
    data = codec.encode_response(Response(model="m", choices=[Choice(0, "x")], usage=None),
                                 response_id="resp_r3", request=req, created_at=1, usage=USAGE, receipt={})
    assert (data["instructions"], data["max_output_tokens"], data["store"]) == ("be brief", 64, False)
    assert codec.history(req, Response(model="m", choices=[Choice(0, "x")], usage=None))[0]["role"] == "user"


def test_encode_echoes_defaults() -> None:
    data = codec.encode_response(Response(model="m", choices=[Choice(0, "x")], usage=None),
                                 response_id="resp_r2", request=decoded(), created_at=1, usage=USAGE, receipt={})
    sdk = SdkResponse.model_validate(data, strict=True)
    assert (sdk.tool_choice, sdk.tools, sdk.parallel_tool_calls, sdk.truncation) == ("auto", [], True, "disabled")
    assert sdk.instructions is None and data["store"] is True


# ================================================================== stream encoder


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        data = orjson.loads(lines[b"data"])
        assert lines[b"event"].decode() == data["type"]
        events.append(data)
    return events


def run_stream(events: list[StreamEvent], request: Request | None = None,
               usage: Usage = USAGE) -> tuple[list[dict[str, Any]], codec.StreamEncoder]:
    enc = codec.StreamEncoder(response_id="resp_s1", request=request or decoded(tools=[WEATHER]),
                              created_at=1_700_000_000)
    raw = enc.start() + b"".join(enc.feed(e) for e in events) + enc.finish(usage, RECEIPT)
    out = parse_sse(raw)
    for event in out:
        EVENTS.validate_python(event, strict=True)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert {e["response"]["id"] for e in out if "response" in e} == {"resp_s1"}
    return out, enc


def call(index: int, arguments: str = "", call_id: str | None = None, name: str | None = None) -> ToolCallDelta:
    return ToolCallDelta(index=index, arguments=arguments, id=call_id, name=name)


LIFECYCLE = ["response.created", "response.in_progress"]
TEXT_ITEM = ["response.output_item.added", "response.content_part.added"]
TEXT_DONE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_DONE = ["response.function_call_arguments.done", "response.output_item.done"]


STREAM_CASES: list[tuple[str, list[StreamEvent], list[str]]] = [
    ("text only", [TextDelta("Hel"), TextDelta("lo"), Finish("stop"), UsageReport(USAGE)],
     LIFECYCLE + TEXT_ITEM + ["response.output_text.delta"] * 2 + TEXT_DONE + ["response.completed"]),
    ("text then tool call", [TextDelta("Let me check."), call(0, "", "call_1", "get_weather"),
                             call(0, "{\"city\":"), call(0, "\"Paris\"}"), Finish("tool_calls")],
     LIFECYCLE + TEXT_ITEM + ["response.output_text.delta"] + TEXT_DONE
     + ["response.output_item.added"] + ["response.function_call_arguments.delta"] * 2 + CALL_DONE
     + ["response.completed"]),
    ("two parallel tool calls", [call(0, "{\"city\":\"A\"}", "call_a", "get_weather"),
                                 call(1, "{\"city\":", "call_b", "get_weather"), call(1, "\"B\"}"),
                                 Finish("tool_calls")],
     LIFECYCLE + ["response.output_item.added", "response.function_call_arguments.delta"]
     + ["response.output_item.added"] + ["response.function_call_arguments.delta"] * 2 + CALL_DONE * 2
     + ["response.completed"]),
    ("length finish", [TextDelta("cut sho"), Finish("length")],
     LIFECYCLE + TEXT_ITEM + ["response.output_text.delta"] + TEXT_DONE + ["response.incomplete"]),
    ("no finish event", [TextDelta("abrupt")],
     LIFECYCLE + TEXT_ITEM + ["response.output_text.delta"] + TEXT_DONE + ["response.completed"]),
]


@pytest.mark.parametrize(("case", "events", "kinds"), STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_stream_event_order(case: str, events: list[StreamEvent], kinds: list[str]) -> None:
    out, enc = run_stream(events)
    assert [e["type"] for e in out] == kinds
    assert out[0]["response"]["status"] == out[1]["response"]["status"] == "in_progress"
    final = out[-1]["response"]
    assert final["receipt"] == RECEIPT and final["usage"]["total_tokens"] == USAGE.total_tokens
    sdk = SdkResponse.model_validate(final, strict=True)
    added = [e for e in out if e["type"] == "response.output_item.added"]
    done = [e for e in out if e["type"] == "response.output_item.done"]
    # every item is closed, with the id it was opened with, and the final output lists them in index order
    assert sorted((e["output_index"], e["item"]["id"]) for e in added) == sorted(
        (e["output_index"], e["item"]["id"]) for e in done)
    assert [item.id for item in sdk.output] == [e["item"]["id"] for e in added]
    for e in out:
        if "item_id" in e:
            assert e["item_id"] == sdk.output[e["output_index"]].id
    canonical = enc.output()
    assert canonical.usage == USAGE and canonical.model == "gpt-4o-mini"
    streamed_text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert sdk.output_text == streamed_text == (canonical.choices[0].text or "")
    if case == "length finish":
        assert sdk.status == "incomplete" and sdk.incomplete_details is not None
        assert sdk.incomplete_details.reason == "max_output_tokens"
        assert canonical.choices[0].finish_reason == "length"
    if case == "two parallel tool calls":
        calls = [(c.call_id, c.arguments) for c in sdk.output if c.type == "function_call"]
        assert calls == [("call_a", "{\"city\":\"A\"}"), ("call_b", "{\"city\":\"B\"}")]
        assert canonical.choices[0].tool_calls == (ToolCall("call_a", "get_weather", "{\"city\":\"A\"}"),
                                                   ToolCall("call_b", "get_weather", "{\"city\":\"B\"}"))


def test_stream_feed_returns_nothing_for_bookkeeping_events() -> None:
    enc = codec.StreamEncoder(response_id="resp_s2", request=decoded(), created_at=1)
    enc.start()
    assert enc.feed(UsageReport(USAGE)) == b""
    assert enc.feed(TextDelta("")) == b""
    assert enc.feed(TextDelta("other choice", choice=1)) == b""
    assert enc.feed(UpstreamFailure("boom")) == b""


def test_stream_fail_after_content() -> None:
    enc = codec.StreamEncoder(response_id="resp_s3", request=decoded(), created_at=1)
    raw = enc.start() + enc.feed(TextDelta("partial"))
    raw += enc.fail({"error": {"message": "upstream broke", "type": "upstream_error", "code": "upstream_error",
                               "param": None}}, RECEIPT)
    out = parse_sse(raw)
    for event in out:
        EVENTS.validate_python(event, strict=True)
    assert [e["type"] for e in out][-2:] == ["response.failed", "error"]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    failed = SdkResponse.model_validate(out[-2]["response"], strict=True)
    assert failed.status == "failed" and failed.error is not None and failed.error.message == "upstream broke"
    assert failed.output_text == "partial" and out[-2]["response"]["receipt"] == RECEIPT
    assert out[-1]["error"] == {"message": "upstream broke", "type": "upstream_error",
                                "code": "upstream_error", "param": None}


# ================================================================== history


def test_history_round_trip_without_instructions() -> None:
    first = codec.decode(body(instructions="secret rules", tools=[WEATHER], input=[
        {"role": "user", "content": [{"type": "input_text", "text": "weather in A?"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]))
    answer = Response(model="m", usage=USAGE, choices=[
        Choice(0, "Checking.", (ToolCall("call_1", "get_weather", "{\"city\":\"A\"}"),), "tool_calls")])
    stored = orjson.loads(orjson.dumps(codec.history(first, answer)))
    loaded = codec.load_history(stored)
    assistant = Message("assistant", (TextPart("Checking."),) + answer.choices[0].tool_calls)
    assert loaded == first.messages[1:] + [assistant]
    follow = codec.decode(body(instructions="new rules", previous_response_id="resp_1", input=[
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]), loaded)
    assert follow.messages[0] == Message("system", (TextPart("new rules"),))
    assert all("secret" not in m.text() for m in follow.messages)
    assert follow.messages[-1] == Message("tool", (ToolResult("call_1", "sunny"),))
    # the follow-up's own history chains on: everything but its instructions, then its answer
    second = codec.history(follow, Response(model="m", choices=[Choice(0, "Sunny in A.")], usage=USAGE))
    assert codec.load_history(orjson.loads(orjson.dumps(second))) == follow.messages[1:] + [
        Message("assistant", (TextPart("Sunny in A."),))]


def test_history_of_streamed_output() -> None:
    _, enc = run_stream([call(0, "{}", "call_9", "get_weather"), Finish("tool_calls")])
    req = decoded(tools=[WEATHER])
    loaded = codec.load_history(codec.history(req, enc.output()))
    assert loaded == [user("hi"), Message("assistant", (ToolCall("call_9", "get_weather", "{}"),))]


# ================================================================== the official SDKs over HTTP


Script = Callable[[Request], list[StreamEvent]]


def weather_model(req: Request) -> list[StreamEvent]:
    """A deterministic stand-in model: call the first tool, then quote what the tool said."""
    last = req.messages[-1]
    if last.role == "tool":
        result = next(p for p in last.parts if isinstance(p, ToolResult))
        return [TextDelta("The tool said: "), TextDelta(result.content), Finish("stop"), UsageReport(USAGE)]
    if req.tools:
        return [call(0, "", f"call_{len(req.messages)}", req.tools[0].name), call(0, "{\"city\":"),
                call(0, "\"Paris\"}"), Finish("tool_calls"), UsageReport(USAGE)]
    return [TextDelta("Hello "), TextDelta("from the codec."), Finish("stop"), UsageReport(USAGE)]


@dataclass
class Served:
    """A tiny Responses endpoint built from the codec alone: decode, run a script, encode."""

    url: str = ""
    script: Script = weather_model
    bodies: list[dict[str, Any]] = field(default_factory=list)
    stored: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.bodies.append(payload)
        try:
            opts = codec.options(payload)
            stored = self.stored.get(opts.previous_response_id or "", [])
            req = codec.decode(payload, codec.load_history(stored))
        except InvalidRequest as exc:
            return web.json_response(exc.body(), status=exc.status)
        response_id = f"resp_{next(self.ids)}"
        enc = codec.StreamEncoder(response_id=response_id, request=req, created_at=1_700_000_000)
        frames = [enc.start()] + [enc.feed(e) for e in self.script(req)] + [enc.finish(USAGE, RECEIPT)]
        if opts.store:
            self.stored[response_id] = codec.history(req, enc.output())
        if not req.stream:
            return web.json_response(codec.encode_response(
                enc.output(), response_id=response_id, request=req, created_at=1_700_000_000, usage=USAGE,
                receipt=RECEIPT), dumps=lambda v: orjson.dumps(v).decode())
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames:
            if frame:
                await resp.write(frame)
        await resp.write_eof()
        return resp


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    state = Served()
    app = web.Application()

    async def route(request: web.Request) -> web.StreamResponse:
        return await state.handle(request)  # looked up per request, so a test can swap the handler

    app.router.add_post("/v1/responses", route)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=served.url, api_key="tf-test", max_retries=0, timeout=10)
    try:
        yield sdk
    finally:
        await sdk.close()


async def test_sdk_stream_get_final_response(client: openai.AsyncOpenAI) -> None:
    deltas = []
    async with client.responses.stream(model="gpt-4o-mini", input="hi", instructions="be nice") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append((event.delta, event.snapshot))
        final = await stream.get_final_response()
    assert deltas == [("Hello ", "Hello "), ("from the codec.", "Hello from the codec.")]
    assert final.output_text == "Hello from the codec." and final.status == "completed"
    assert final.usage is not None and final.usage.total_tokens == USAGE.total_tokens
    assert final.model_extra is not None and final.model_extra["receipt"] == RECEIPT


async def test_sdk_stream_tool_calls(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="gpt-4o-mini", input="weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        final = await stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments, c.call_id) for c in calls] == [("get_weather", "{\"city\":\"Paris\"}", "call_1")]


async def test_sdk_raw_stream_events(client: openai.AsyncOpenAI, served: Served) -> None:
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds == LIFECYCLE + TEXT_ITEM + ["response.output_text.delta"] * 2 + TEXT_DONE + ["response.completed"]
    assert served.bodies[-1]["stream"] is True


async def test_sdk_unary_and_previous_response_id(client: openai.AsyncOpenAI, served: Served) -> None:
    first = await client.responses.create(model="gpt-4o-mini", input="weather?", tools=[WEATHER])  # type: ignore[list-item]
    call_item = next(item for item in first.output if item.type == "function_call")
    second = await client.responses.create(
        model="gpt-4o-mini", previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call_item.call_id, "output": "sunny"}])
    assert second.output_text == "The tool said: sunny" and second.id != first.id


async def test_sdk_sees_400_with_param(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="gpt-4o-mini", input="hi", background=True)
    assert caught.value.param == "background"


async def test_sdk_stream_failure_raises(client: openai.AsyncOpenAI, served: Served) -> None:
    original = served.handle

    async def failing(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        enc = codec.StreamEncoder(response_id="resp_f", request=codec.decode(payload), created_at=1)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(enc.start() + enc.feed(TextDelta("part")))
        await resp.write(enc.fail({"message": "upstream broke", "type": "upstream_error",
                                   "code": "upstream_error", "param": None}, RECEIPT))
        await resp.write_eof()
        return resp

    served.handle = failing  # type: ignore[method-assign]
    try:
        seen = []
        with pytest.raises(openai.APIError, match="upstream broke"):
            stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
            async for event in stream:
                seen.append(event.type)
        assert seen[-1] == "response.failed"
    finally:
        served.handle = original  # type: ignore[method-assign]


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_openai_agents_runner_with_function_tool(served: Served, client: openai.AsyncOpenAI,
                                                       streamed: bool) -> None:
    """The README example: openai-agents' Runner against a Responses endpoint, one function tool."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # never export traces to api.openai.com from a test

    @function_tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        return f"sunny in {city}"

    agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                  model=OpenAIResponsesModel("gpt-4o-mini", client))
    if streamed:
        run = Runner.run_streamed(agent, "Weather in Paris?")
        async for _ in run.stream_events():
            pass
        final = run.final_output
    else:
        final = (await Runner.run(agent, "Weather in Paris?")).final_output
    assert final == "The tool said: sunny in Paris"
    assert len(served.bodies) == 2
    second = codec.decode(served.bodies[1])
    assert second.messages[0] == Message("system", (TextPart("Answer briefly."),))
    assert second.messages[-1].parts == (ToolResult(second.messages[-2].parts[-1].id, "sunny in Paris"),)  # type: ignore[union-attr]
