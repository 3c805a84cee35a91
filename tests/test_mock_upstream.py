"""Tests for the simulated upstream, driven both raw and through the official openai SDK."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from tokensforge.mock_upstream import (
    TOOL_RESULT_PREFIX,
    Faults,
    MockConfig,
    add_arguments,
    anthropic_prompt_tokens,
    config_from_args,
    count_tokens,
    create_app,
    embedding_vector,
    prompt_tokens,
    reply_text,
    tool_arguments,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "héllo wörld"}, {"type": "image_url"}]},
]
ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    async def factory(config: MockConfig | None = None) -> TestClient:
        return await aiohttp_client(create_app(config))

    return factory


@asynccontextmanager
async def sdk_for(client: TestClient, **kwargs: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    options = {"api_key": "x", "max_retries": 0, **kwargs}
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), **options) as sdk:
        yield sdk


async def stats(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/_mock/stats")
    return await resp.json()


async def wait_for_stat(client: TestClient, key: str, value: int, timeout: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = await stats(client)
        if current[key] == value or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.02)


def sse_events(raw: bytes) -> list[Any]:
    events = [line[len(b"data: ") :] for line in raw.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


# --------------------------------------------------------------------------- token accounting


def test_count_tokens_is_ceil_of_utf8_bytes_over_four() -> None:
    assert count_tokens("") == 0
    assert count_tokens("a") == 1
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2
    assert count_tokens("éé") == 1  # 4 bytes
    assert count_tokens("ééé") == 2  # 6 bytes


def test_prompt_tokens_counts_text_parts_and_per_message_overhead() -> None:
    messages = [
        {"role": "user", "content": "abcdefgh"},  # 2
        {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]},  # 1
        {"role": "assistant", "content": None, "tool_calls": []},  # 0
    ]
    assert prompt_tokens(messages) == 2 + 1 + 0 + 3 * 3
    assert prompt_tokens([]) == 0


def test_reply_text_has_n_words() -> None:
    assert reply_text(0) == ""
    assert reply_text(3) == "lorem ipsum dolor"
    assert len(reply_text(4096).split(" ")) == 4096


# --------------------------------------------------------------------------- chat


async def test_sdk_chat_non_streamed_usage_matches(make_client: ClientFactory) -> None:
    client = await make_client()
    async with sdk_for(client) as sdk:
        capped = await sdk.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=5)
        default = await sdk.chat.completions.create(model="gpt-x", messages=MESSAGES)
    expected_prompt = prompt_tokens(MESSAGES)
    assert capped.model == "gpt-x"
    assert capped.id.startswith("chatcmpl-mock-") and capped.id != default.id
    assert capped.choices[0].message.content == reply_text(5)
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None
    assert (capped.usage.prompt_tokens, capped.usage.completion_tokens) == (expected_prompt, 5)
    assert capped.usage.total_tokens == expected_prompt + 5
    assert default.choices[0].finish_reason == "stop"
    assert default.usage is not None and default.usage.completion_tokens == 16


async def test_completion_tokens_fault_and_max_completion_tokens(
    make_client: ClientFactory,
) -> None:
    config = MockConfig(per_model={"fixed": Faults(completion_tokens=3)})
    client = await make_client(config)
    body = {"model": "fixed", "messages": [], "max_tokens": 50, "extra_field": {"x": 1}}
    fixed = await (await client.post("/v1/chat/completions", json=body)).json()
    assert fixed["usage"]["completion_tokens"] == 3
    assert fixed["choices"][0]["finish_reason"] == "stop"
    body = {"model": "other", "messages": [], "max_completion_tokens": 7, "max_tokens": 2}
    other = await (await client.post("/v1/chat/completions", json=body)).json()
    assert other["usage"]["completion_tokens"] == 7
    assert other["choices"][0]["message"]["content"] == reply_text(7)
    assert (await stats(client))["last_request"]["body"] == body


async def test_sdk_stream_with_include_usage(make_client: ClientFactory) -> None:
    client = await make_client()
    async with sdk_for(client) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-x",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(content) == 6
    assert "".join(content) == reply_text(6)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == prompt_tokens(MESSAGES)
    assert chunks[-1].usage.completion_tokens == 6


async def test_stream_without_include_usage_has_no_usage(make_client: ClientFactory) -> None:
    client = await make_client()
    async with sdk_for(client) as sdk:
        stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert all(c.usage is None and c.choices for c in chunks)
    body = {"model": "m", "messages": [], "stream": True}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.read())
    assert all("usage" not in e for e in events)
    assert len(events) == 1 + 16 + 1
    assert events[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


async def test_stream_cut_after_chunks_breaks_the_sdk_iteration(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(cut_after_chunks=3)))
    received: list[str] = []
    async with sdk_for(client) as sdk:
        stream = await sdk.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
    assert received == ["lorem ", "ipsum ", "dolor "]
    current = await wait_for_stat(client, "cut", 1)
    assert (current["cut"], current["completed"], current["inflight"]) == (1, 0, 0)


async def test_chunk_delay_and_latency_are_honoured(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(latency_ms=60, chunk_delay_ms=20)))
    started = time.monotonic()
    body = {"model": "m", "messages": [], "max_tokens": 4, "stream": True}
    resp = await client.post("/v1/chat/completions", json=body)
    first_byte = time.monotonic() - started
    events = sse_events(await resp.read())
    total = time.monotonic() - started
    assert first_byte >= 0.06
    assert total >= 0.06 + 3 * 0.02
    assert len(events) == 1 + 4 + 1


async def test_client_leaving_mid_stream_counts_as_cancelled(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(chunk_delay_ms=30)))
    body = {"model": "m", "messages": [], "max_tokens": 100, "stream": True}
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.content.readuntil(b"\n\n")
    resp.close()
    current = await wait_for_stat(client, "cancelled", 1)
    assert (current["cancelled"], current["completed"], current["inflight"]) == (1, 0, 0)


# --------------------------------------------------------------------------- embeddings


async def test_sdk_embeddings_default_base64_decodes_to_floats(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(embedding_dim=12))
    async with sdk_for(client) as sdk:
        result = await sdk.embeddings.create(model="emb", input=["hello", "world!"])
    assert (await stats(client))["last_request"]["body"]["encoding_format"] == "base64"
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == 12
        assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in item.embedding)
    assert result.data[0].embedding == embedding_vector(b"hello", 12).tolist()
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens == count_tokens("hello") + count_tokens("world!")
    raw = await client.post("/v1/embeddings", json={"model": "emb", "input": "hello"})
    as_float = await raw.json()
    assert as_float["data"][0]["embedding"] == result.data[0].embedding
    assert as_float["object"] == "list" and as_float["model"] == "emb"


async def test_embeddings_token_arrays_and_bad_input(make_client: ClientFactory) -> None:
    client = await make_client()
    resp = await client.post("/v1/embeddings", json={"model": "e", "input": [[1, 2, 3], [4, 5]]})
    payload = await resp.json()
    assert payload["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert len(payload["data"]) == 2 and len(payload["data"][0]["embedding"]) == 8
    flat = await (await client.post("/v1/embeddings", json={"model": "e", "input": [1, 2]})).json()
    assert flat["usage"]["prompt_tokens"] == 2 and len(flat["data"]) == 1
    bad = await client.post("/v1/embeddings", json={"model": "e", "input": [1, "x"]})
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "input"


# --------------------------------------------------------------------------- faults


async def test_error_status_500_raises_internal_server_error(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(error_status=500)))
    async with sdk_for(client) as sdk:
        with pytest.raises(openai.InternalServerError) as excinfo:
            await sdk.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError):
            await sdk.embeddings.create(model="e", input="x")
    assert excinfo.value.status_code == 500
    assert excinfo.value.body["type"] == "server_error"  # type: ignore[index]
    assert set(excinfo.value.body) == {"message", "type", "code", "param"}  # type: ignore[arg-type]


async def test_429_carries_retry_after(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(error_status=429, retry_after_s=7)))
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert resp.status == 429
    assert resp.headers["retry-after"] == "7"
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    async with sdk_for(client) as sdk:
        with pytest.raises(openai.RateLimitError) as excinfo:
            await sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert excinfo.value.response.headers["retry-after"] == "7"


async def test_error_rate_is_seeded_and_deterministic(make_client: ClientFactory) -> None:
    async def failures(seed: int) -> list[int]:
        faults = Faults(error_status=503, error_rate=0.5)
        client = await make_client(MockConfig(default=faults, seed=seed))
        statuses = []
        for _ in range(30):
            resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
            statuses.append(resp.status)
        return statuses

    first, again, other = await failures(1), await failures(1), await failures(2)
    assert first == again
    assert first != other
    assert set(first) == {200, 503}


async def test_no_usage_everywhere(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(no_usage=True)))
    async with sdk_for(client) as sdk:
        plain = await sdk.chat.completions.create(model="m", messages=MESSAGES)
        stream = await sdk.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert plain.usage is None
    assert plain.choices[0].message.content == reply_text(16)
    assert all(c.usage is None and c.choices for c in chunks)
    emb = await (await client.post("/v1/embeddings", json={"model": "e", "input": "x"})).json()
    assert "usage" not in emb and len(emb["data"]) == 1


async def test_malformed_json(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(malformed_json=True)))
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert resp.status == 200
    assert resp.content_type == "application/json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(await resp.read())
    async with sdk_for(client) as sdk:
        with pytest.raises(ValueError):  # the SDK surfaces json.JSONDecodeError unwrapped
            await sdk.chat.completions.create(model="m", messages=MESSAGES)


async def test_hang_until_client_gives_up(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(per_model={"stuck": Faults(hang=True)}))
    async with sdk_for(client, timeout=0.2) as sdk:
        with pytest.raises(openai.APITimeoutError):
            await sdk.chat.completions.create(model="stuck", messages=MESSAGES)
        ok = await sdk.chat.completions.create(model="fine", messages=MESSAGES)
    assert ok.choices[0].message.content
    current = await wait_for_stat(client, "cancelled", 1)
    assert current["cancelled"] == 1
    assert current["inflight"] == 0
    assert current["completed"] == 1
    assert current["by_model"] == {"stuck": 1, "fine": 1}


async def test_api_key_is_enforced(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(api_key="sk-mock"))
    async with sdk_for(client, api_key="wrong") as sdk:
        with pytest.raises(openai.AuthenticationError) as excinfo:
            await sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert excinfo.value.status_code == 401
    assert excinfo.value.code == "invalid_api_key"
    missing = await client.get("/v1/models")
    assert missing.status == 401
    async with sdk_for(client, api_key="sk-mock") as sdk:
        ok = await sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert ok.usage is not None
    last = (await stats(client))["last_request"]
    assert last["path"] == "/v1/chat/completions"
    assert last["headers"]["authorization"] == "Bearer sk-mock"


async def test_runtime_faults_and_reset(make_client: ClientFactory) -> None:
    client = await make_client()
    body = {"model": "flaky", "messages": []}
    assert (await client.post("/v1/chat/completions", json=body)).status == 200
    new = {"default": {"latency_ms": 0}, "per_model": {"flaky": {"error_status": 503}}}
    changed = await client.post("/_mock/faults", json=new)
    assert changed.status == 200
    assert (await changed.json())["per_model"]["flaky"]["error_status"] == 503
    assert (await client.post("/v1/chat/completions", json=body)).status == 503
    other = await client.post("/v1/chat/completions", json={"model": "ok", "messages": []})
    assert other.status == 200
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["mock-model", "flaky"]
    typo = await client.post("/_mock/faults", json={"default": {"error_stauts": 500}})
    assert typo.status == 400
    assert "error_stauts" in (await typo.json())["error"]["message"]
    before = await stats(client)
    assert before["requests"] == 4 and before["by_model"] == {"flaky": 2, "ok": 1}
    await client.post("/_mock/reset")
    after = await stats(client)
    assert (after["requests"], after["completed"], after["by_model"]) == (0, 0, {})
    assert after["last_request"] is None


async def test_invalid_requests_get_openai_errors(make_client: ClientFactory) -> None:
    client = await make_client()
    cases = [
        (b"{not json", None),
        (orjson.dumps({"messages": []}), "model"),
        (orjson.dumps({"model": "m", "messages": "hi"}), "messages"),
        (orjson.dumps({"model": "m", "messages": [], "max_tokens": "3"}), "max_tokens"),
    ]
    for raw, param in cases:
        resp = await client.post("/v1/chat/completions", data=raw)
        assert resp.status == 400, raw
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
    assert (await client.get("/healthz")).status == 200
    assert await (await client.get("/healthz")).text() == "ok"


# --------------------------------------------------------------------------- tool calls (chat)

SEARCH_SCHEMA = {
    "type": "object",
    "properties": {
        "q": {"type": "string"},
        "limit": {"type": "integer"},
        "lang": {"type": "string"},
    },
    "required": ["q", "limit"],
}
CHAT_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}},
    },
    {"type": "function", "function": {"name": "search", "parameters": SEARCH_SCHEMA}},
]


def test_tool_arguments_are_deterministic() -> None:
    assert orjson.loads(tool_arguments(SEARCH_SCHEMA, "cats")) == {"q": "cats"}
    assert orjson.loads(tool_arguments({"type": "object"}, "x" * 100)) == {"query": "x" * 64}
    assert orjson.loads(tool_arguments(None, "")) == {"query": ""}


async def test_sdk_chat_tool_call_then_answer(make_client: ClientFactory) -> None:
    client = await make_client()
    asked: list[Any] = [{"role": "user", "content": "please search for cats"}]
    async with sdk_for(client) as sdk:
        first = await sdk.chat.completions.create(model="m", messages=asked, tools=CHAT_TOOLS)
        named_clock = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "what time"}], tools=CHAT_TOOLS
        )
        not_allowed = await sdk.chat.completions.create(
            model="m", messages=asked, tools=CHAT_TOOLS, tool_choice="none"
        )
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        answered = [
            *asked,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "3 cats found"},
        ]
        second = await sdk.chat.completions.create(model="m", messages=answered, tools=CHAT_TOOLS)
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content is None
    assert call.function.name == "search"  # type: ignore[union-attr]
    arguments = call.function.arguments  # type: ignore[union-attr]
    assert orjson.loads(arguments) == {"q": "please search for cats"}
    assert first.usage is not None
    assert first.usage.completion_tokens == count_tokens("search") + count_tokens(arguments)
    clock = named_clock.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert clock.function.name == "clock"  # type: ignore[union-attr]
    assert not_allowed.choices[0].message.tool_calls is None
    assert not_allowed.choices[0].message.content == reply_text(16)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == TOOL_RESULT_PREFIX + "3 cats found"
    assert second.usage is not None
    assert second.usage.completion_tokens == count_tokens(TOOL_RESULT_PREFIX + "3 cats found")


async def test_sdk_chat_tool_call_stream(make_client: ClientFactory) -> None:
    client = await make_client()
    asked: list[Any] = [
        {"role": "user", "content": "search the archive for the longest article title"}
    ]
    async with sdk_for(client) as sdk:
        stream = await sdk.chat.completions.create(
            model="m", messages=asked, tools=CHAT_TOOLS, max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].index == 0 and calls[0].id and calls[0].type == "function"
    assert calls[0].function is not None and calls[0].function.name == "search"
    assert len(calls) > 2 and all(tc.id is None and tc.index == 0 for tc in calls[1:])
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert orjson.loads(arguments) == {"q": asked[0]["content"][:64]}
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    )  # capped by max_tokens


async def test_chat_tool_result_stream_and_cut(make_client: ClientFactory) -> None:
    client = await make_client()
    body = {"model": "m", "stream": True, "messages": [
        {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c", "content": "all good"}]}  # fmt: skip
    events = sse_events(await (await client.post("/v1/chat/completions", json=body)).read())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == TOOL_RESULT_PREFIX + "all good"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    await client.post("/_mock/faults", json={"default": {"cut_after_chunks": 1}})
    cut = {
        "model": "m",
        "stream": True,
        "tools": CHAT_TOOLS,
        "messages": [{"role": "user", "content": "hi"}],
    }
    resp = await client.post("/v1/chat/completions", json=cut)
    with pytest.raises(Exception):  # noqa: B017 - the connection drops mid-body
        await resp.read()
    current = await wait_for_stat(client, "cut", 1)
    assert current["cut"] == 1


# --------------------------------------------------------------------------- anthropic messages

ANTHROPIC_KEY = "sk-ant-mock"
ANTHROPIC_TOOLS: list[Any] = [
    {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    {"name": "search", "description": "Search", "input_schema": SEARCH_SCHEMA},
]
ANTHROPIC_MESSAGES: list[Any] = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "héllo"}, {"type": "text", "text": " wörld"}],
    }
]


@asynccontextmanager
async def anthropic_for(
    client: TestClient, **kwargs: Any
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    options = {"api_key": ANTHROPIC_KEY, "max_retries": 0, **kwargs}
    async with anthropic.AsyncAnthropic(base_url=str(client.make_url("")), **options) as sdk:
        yield sdk


async def test_anthropic_sdk_messages_unary_and_stream(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(api_key=ANTHROPIC_KEY))
    expected_prompt = anthropic_prompt_tokens({"system": "terse", "messages": ANTHROPIC_MESSAGES})
    assert (
        expected_prompt
        == count_tokens("terse") + count_tokens("héllo") + count_tokens(" wörld") + 6
    )
    async with anthropic_for(client) as sdk:
        short = await sdk.messages.create(
            model="claude-m", max_tokens=5, system="terse", messages=ANTHROPIC_MESSAGES
        )
        full = await sdk.messages.create(
            model="claude-m", max_tokens=100, messages=ANTHROPIC_MESSAGES,
            extra_headers={"anthropic-beta": "some-beta-2025"},
        )  # fmt: skip
        last = (await stats(client))["last_request"]
        async with sdk.messages.stream(
            model="claude-m", max_tokens=7, system="terse", messages=ANTHROPIC_MESSAGES
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            streamed = await stream.get_final_message()
        counted = await sdk.messages.count_tokens(
            model="claude-m", system="terse", messages=ANTHROPIC_MESSAGES
        )
    assert short.id.startswith("msg_mock_") and short.model == "claude-m"
    assert short.content[0].type == "text" and short.content[0].text == reply_text(5)
    assert short.stop_reason == "max_tokens"
    assert (short.usage.input_tokens, short.usage.output_tokens) == (expected_prompt, 5)
    assert full.stop_reason == "end_turn" and full.usage.output_tokens == 16
    assert last["path"] == "/v1/messages"
    assert (
        last["headers"]["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    )  # how anthropic 2.x authenticates
    assert last["headers"]["anthropic-version"]
    assert last["headers"]["anthropic-beta"] == "some-beta-2025"
    assert text == reply_text(7)
    assert streamed.stop_reason == "max_tokens"
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (expected_prompt, 7)
    assert counted.input_tokens == expected_prompt


async def test_anthropic_sdk_tool_use_round_trip(make_client: ClientFactory) -> None:
    client = await make_client()
    asked: list[Any] = [{"role": "user", "content": "search for dogs"}]
    async with anthropic_for(client) as sdk:
        first = await sdk.messages.create(
            model="m", max_tokens=100, messages=asked, tools=ANTHROPIC_TOOLS
        )
        async with sdk.messages.stream(
            model="m", max_tokens=100, messages=asked, tools=ANTHROPIC_TOOLS
        ) as stream:
            streamed = await stream.get_final_message()
        block = first.content[0]
        assert block.type == "tool_use"
        answered = [
            *asked,
            {"role": "assistant", "content": [block.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "2 dogs"}],
            },
        ]
        second = await sdk.messages.create(
            model="m", max_tokens=100, messages=answered, tools=ANTHROPIC_TOOLS
        )
    assert (block.name, block.input, first.stop_reason) == (
        "search",
        {"q": "search for dogs"},
        "tool_use",
    )
    assert first.usage.output_tokens == count_tokens("search") + count_tokens(
        '{"q":"search for dogs"}'
    )
    stream_block = streamed.content[0]
    assert stream_block.type == "tool_use" and stream_block.input == {"q": "search for dogs"}
    assert streamed.stop_reason == "tool_use"
    assert second.stop_reason == "end_turn"
    assert (
        second.content[0].type == "text" and second.content[0].text == TOOL_RESULT_PREFIX + "2 dogs"
    )


async def test_anthropic_faults_and_errors(make_client: ClientFactory) -> None:
    config = MockConfig(
        api_key=ANTHROPIC_KEY,
        per_model={
            "busy": Faults(error_status=529),
            "limited": Faults(error_status=429, retry_after_s=3),
            "quiet": Faults(no_usage=True),
            "broken": Faults(malformed_json=True),
            "cut": Faults(cut_after_chunks=2),
            "fixed": Faults(completion_tokens=3),
        },
    )
    client = await make_client(config)
    async with anthropic_for(client, api_key="wrong") as sdk:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await sdk.messages.create(model="m", max_tokens=5, messages=ANTHROPIC_MESSAGES)
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    for headers in ({"x-api-key": "wrong"}, {"authorization": f"Bearer {ANTHROPIC_KEY}x"}, {}):
        resp = await client.post(
            "/v1/messages/count_tokens", json={"model": "m", "messages": []}, headers=headers
        )
        assert resp.status == 401
        assert (await resp.json())["type"] == "error"
    ok = await client.post("/v1/messages/count_tokens", json={"model": "m", "messages": []},
                           headers={"x-api-key": ANTHROPIC_KEY})  # fmt: skip
    assert await ok.json() == {"input_tokens": 0}
    async with anthropic_for(client) as sdk:
        with pytest.raises(anthropic.APIStatusError) as busy:
            await sdk.messages.create(model="busy", max_tokens=5, messages=ANTHROPIC_MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await sdk.messages.create(model="limited", max_tokens=5, messages=ANTHROPIC_MESSAGES)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await sdk.messages.create(model="m", max_tokens=0, messages=ANTHROPIC_MESSAGES)
        fixed = await sdk.messages.create(
            model="fixed", max_tokens=100, messages=ANTHROPIC_MESSAGES
        )
        received: list[str] = []
        with pytest.raises(Exception) as dropped:  # noqa: B017 - the SDK surfaces httpx's error unwrapped
            async with sdk.messages.stream(
                model="cut", max_tokens=100, messages=ANTHROPIC_MESSAGES
            ) as stream:
                async for text in stream.text_stream:
                    received.append(text)
    assert busy.value.status_code == 529
    assert busy.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert limited.value.response.headers["retry-after"] == "3"
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert fixed.usage.output_tokens == 3 and fixed.content[0].text == reply_text(3)  # type: ignore[union-attr]
    assert received == ["lorem ", "ipsum "]
    assert "peer closed connection" in str(dropped.value)
    quiet = await client.post("/v1/messages", json={"model": "quiet", "max_tokens": 5, "messages": ANTHROPIC_MESSAGES,
                                                    "stream": True}, headers={"x-api-key": ANTHROPIC_KEY})  # fmt: skip
    assert b'"usage"' not in await quiet.read()
    broken = await client.post("/v1/messages", json={"model": "broken", "max_tokens": 5, "messages": []},
                               headers={"x-api-key": ANTHROPIC_KEY})  # fmt: skip
    assert broken.status == 400  # validation comes before faults
    broken = await client.post("/v1/messages", json={"model": "broken", "max_tokens": 5,
                                                     "messages": ANTHROPIC_MESSAGES},
                               headers={"x-api-key": ANTHROPIC_KEY})  # fmt: skip
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(await broken.read())
    current = await wait_for_stat(client, "cut", 1)
    assert current["by_model"]["busy"] == 1 and current["cut"] == 1


# --------------------------------------------------------------------------- command line


def test_cli_arguments_build_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--port", "0", "--latency-ms", "5", "--error-status", "429", "--retry-after", "2",
         "--cut-after", "3", "--no-usage", "--api-key", "k", "--cache-min-tokens", "256",
         "--model-faults", '{"slow": {"latency_ms": 50, "error_status": 500}}']
    )  # fmt: skip
    config = config_from_args(args)
    assert config.default == Faults(
        latency_ms=5, error_status=429, retry_after_s=2, cut_after_chunks=3, no_usage=True
    )
    assert config.per_model == {"slow": Faults(latency_ms=50, error_status=500)}
    assert config.api_key == "k" and config.cache_min_tokens == 256
    with pytest.raises(SystemExit):
        parser.parse_args(["--port", "0", "--model-faults", '{"m": {"nope": 1}}'])


def test_run_from_args_serves_and_exits_cleanly_on_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from tokensforge.mock_upstream import add_arguments, run_from_args\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(run_from_args(p.parse_args(['--port', '0'])))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("mock-upstream listening on http://127.0.0.1:")
        assert line.rstrip().endswith("/v1") and ":0/" not in line
        health_url = line.split(" on ")[1].strip().removesuffix("/v1") + "/healthz"
        with urllib.request.urlopen(health_url, timeout=5) as health:
            assert health.read() == b"ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
