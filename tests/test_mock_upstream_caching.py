"""The simulated upstream's prompt caches and signed thinking, driven through the real SDKs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from tokensforge.mock_cache import CACHE_KEY, PromptCache, Unit, anthropic_units, boundaries, chat_units, scope_of
from tokensforge.mock_core import anthropic_prompt_tokens, count_tokens, prompt_tokens
from tokensforge.mock_thinking import sign
from tokensforge.mock_upstream import MockConfig, create_app

ClientFactory = Callable[..., Awaitable[TestClient]]
SMALL = MockConfig(cache_min_tokens=64, cache_quantum_tokens=16)
LONG = "word " * 200  # 250 tokens in the mock's counting


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    async def factory(config: MockConfig | None = None) -> TestClient:
        return await aiohttp_client(create_app(config))

    return factory


def claude(client: TestClient, key: str = "k") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key=key, max_retries=0)


def gpt(client: TestClient, key: str = "k") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)


def agent_turn(question: str, ttl: str | None = None) -> dict[str, Any]:
    """A Claude Code-like request: a long marked system prompt and a marked last user message."""
    marker: dict[str, Any] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {
        "model": "claude-x",
        "max_tokens": 64,
        "system": [{"type": "text", "text": LONG, "cache_control": marker}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": question + LONG,
                                                   "cache_control": {"type": "ephemeral"}}]}],
    }  # fmt: skip


# --------------------------------------------------------------------------- pure cache logic


def test_anthropic_units_add_up_to_the_billed_prompt() -> None:
    body = agent_turn("why?")
    body["tools"] = [{"name": "t", "input_schema": {}}]
    body["messages"].append({"role": "assistant", "content": "ok"})
    units = anthropic_units(body)
    assert sum(u.tokens for u in units) == anthropic_prompt_tokens(body)
    assert [u.marker_ttl_s for u in units] == [None, 300.0, 300.0, None]
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert sum(u.tokens for u in chat_units(messages)) == prompt_tokens(messages)


def test_moving_a_marker_keeps_the_prefix_identity() -> None:
    marked = agent_turn("q")
    unmarked = agent_turn("q")
    del unmarked["system"][0]["cache_control"]
    a, b = (boundaries(scope_of("x"), anthropic_units(body)) for body in (marked, unmarked))
    assert [x.digest for x in a] == [x.digest for x in b]


def test_anthropic_cache_reads_longest_prefix_and_writes_by_ttl() -> None:
    now = [0.0]
    cache = PromptCache(lambda: now[0])
    units = [Unit(b"a", 100, 3600.0), Unit(b"b", 50, None), Unit(b"c", 30, 300.0)]
    first = cache.anthropic(boundaries(b"s", units), min_tokens=64)
    assert (first.read_tokens, first.write_1h_tokens, first.write_5m_tokens) == (0, 100, 80)
    again = cache.anthropic(boundaries(b"s", units), min_tokens=64)
    assert (again.read_tokens, again.write_1h_tokens, again.write_5m_tokens) == (180, 0, 0)
    now[0] += 301  # the 5-minute entry is gone, the hour one is not
    later = cache.anthropic(boundaries(b"s", units), min_tokens=64)
    assert (later.read_tokens, later.write_1h_tokens, later.write_5m_tokens) == (100, 0, 80)
    assert cache.anthropic(boundaries(b"other scope", units), 64).read_tokens == 0


def test_prefix_below_minimum_is_never_cached() -> None:
    cache = PromptCache()
    units = [Unit(b"a", 10, 300.0)]
    for _ in range(2):
        use = cache.anthropic(boundaries(b"s", units), min_tokens=64)
        assert (use.read_tokens, use.write_5m_tokens) == (0, 0)
    assert len(cache) == 0


def test_openai_cache_rounds_down_to_the_quantum() -> None:
    cache = PromptCache()
    units = [Unit(b"sys", 1100, None), Unit(b"u1", 200, None)]
    assert cache.openai(boundaries(b"s", units), 1024, 128, 300.0) == 0
    assert cache.openai(boundaries(b"s", units), 1024, 128, 300.0) == 1280
    grown = [*units, Unit(b"a1", 40, None), Unit(b"u2", 40, None)]
    assert cache.openai(boundaries(b"s", grown), 1024, 128, 300.0) == 1280
    changed = [Unit(b"other sys", 1100, None), *units[1:]]
    assert cache.openai(boundaries(b"s", changed), 1024, 128, 300.0) == 0


# --------------------------------------------------------------------------- Anthropic over HTTP


async def test_anthropic_second_turn_reads_what_the_first_wrote(make_client: ClientFactory) -> None:
    client = await make_client(SMALL)
    async with claude(client) as sdk, claude(client, key="other") as other:
        first = await sdk.messages.create(**agent_turn("first question"))
        second = await sdk.messages.create(**agent_turn("second question"))
        other_key = await other.messages.create(**agent_turn("first question"))
    total = anthropic_prompt_tokens(agent_turn("first question"))
    system = anthropic_units(agent_turn("x"))[0].tokens
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation_input_tokens == total and first.usage.input_tokens == 0
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == total
    assert second.usage.cache_read_input_tokens == system  # the system prefix; the question changed
    assert second.usage.cache_creation_input_tokens == anthropic_prompt_tokens(agent_turn("second question")) - system
    assert other_key.usage.cache_read_input_tokens == 0  # caches are per credential


async def test_anthropic_stream_reports_cache_in_start_and_delta(make_client: ClientFactory) -> None:
    client = await make_client(SMALL)
    body = agent_turn("q", ttl="1h")
    async with claude(client) as sdk:
        await sdk.messages.create(**body)
        resp = await client.post("/v1/messages", json={**body, "stream": True}, headers={"x-api-key": "k"})
        raw = await resp.read()
    events = [orjson.loads(chunk.split(b"data: ", 1)[1]) for chunk in raw.split(b"\n\n") if chunk]
    start = events[0]["message"]["usage"]
    delta = next(e for e in events if e["type"] == "message_delta")["usage"]
    total = anthropic_prompt_tokens(body)
    assert start["cache_read_input_tokens"] == total == delta["cache_read_input_tokens"]
    assert start["input_tokens"] == 0 == delta["input_tokens"] and delta["cache_creation_input_tokens"] == 0
    assert delta["output_tokens"] == 16 and start["output_tokens"] == 1


async def test_anthropic_cache_expires_and_resets(make_client: ClientFactory) -> None:
    client = await make_client(SMALL)
    async with claude(client) as sdk:
        await sdk.messages.create(**agent_turn("q"))
        assert (await sdk.messages.create(**agent_turn("q"))).usage.cache_read_input_tokens > 0
        assert (await client.post("/_mock/cache/advance", json={"seconds": 301})).status == 200
        assert (await sdk.messages.create(**agent_turn("q"))).usage.cache_read_input_tokens == 0
        assert (await client.post("/_mock/cache/reset")).status == 200
        assert (await sdk.messages.create(**agent_turn("q"))).usage.cache_read_input_tokens == 0
        assert (await client.post("/_mock/reset")).status == 200
        assert (await sdk.messages.create(**agent_turn("q"))).usage.cache_read_input_tokens == 0


async def test_anthropic_refuses_bad_markers(make_client: ClientFactory) -> None:
    client = await make_client(SMALL)
    marked = [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}] * 5
    too_many = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": marked}]}
    bad_ttl = agent_turn("q", ttl="2h")
    for body in (too_many, bad_ttl):
        resp = await client.post("/v1/messages", json=body)
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- OpenAI chat over HTTP


async def test_chat_reports_cached_tokens_inside_prompt_tokens(make_client: ClientFactory) -> None:
    client = await make_client(SMALL)
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    async with gpt(client) as sdk:
        first = await sdk.chat.completions.create(model="gpt-x", messages=messages)
        second = await sdk.chat.completions.create(model="gpt-x", messages=[*messages, *messages[1:]])
        keyed = await sdk.chat.completions.create(model="gpt-x", messages=messages, prompt_cache_key="s1")
        stream = await sdk.chat.completions.create(model="gpt-x", messages=messages, stream=True,
                                                   stream_options={"include_usage": True})  # fmt: skip
        chunks = [c async for c in stream]
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    prefix = prompt_tokens(messages)
    assert second.usage.prompt_tokens == prefix + prompt_tokens(messages[1:])
    assert second.usage.prompt_tokens_details.cached_tokens == prefix // 16 * 16
    assert keyed.usage is not None and keyed.usage.prompt_tokens_details is not None
    assert keyed.usage.prompt_tokens_details.cached_tokens == 0  # another prompt_cache_key, another cache
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == prefix // 16 * 16


async def test_short_chat_prompts_are_not_cached(make_client: ClientFactory) -> None:
    client = await make_client()
    messages = [{"role": "user", "content": "hi"}]
    async with gpt(client) as sdk:
        for _ in range(2):
            reply = await sdk.chat.completions.create(model="gpt-x", messages=messages)
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert len(client.app[CACHE_KEY]) == 0


# --------------------------------------------------------------------------- thinking


def thinking_turn(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "Think about weather"}], **extra}  # fmt: skip


TOOLS = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}}]  # fmt: skip


async def test_thinking_block_comes_first_and_signed(make_client: ClientFactory) -> None:
    client = await make_client()
    config = MockConfig()
    async with claude(client) as sdk:
        message = await sdk.messages.create(**thinking_turn())
        async with sdk.messages.stream(**thinking_turn()) as stream:
            kinds = [e.type for e in [e async for e in stream]]
            streamed = await stream.get_final_message()
    block = message.content[0]
    assert block.type == "thinking" and block.thinking
    assert block.signature == sign(config.thinking_secret, block.thinking)
    assert message.content[1].type == "text"
    assert message.usage.output_tokens == count_tokens(block.thinking) + 16
    assert streamed.content[0].type == "thinking" and streamed.content[0].signature == block.signature
    assert streamed.content[0].thinking == block.thinking
    assert streamed.usage.output_tokens == message.usage.output_tokens
    assert "thinking" in kinds and "signature" in kinds


async def test_thinking_round_trip_and_tampering(make_client: ClientFactory) -> None:
    client = await make_client()
    async with claude(client) as sdk:
        call = await sdk.messages.create(**thinking_turn(tools=TOOLS))
        assert [b.type for b in call.content] == ["thinking", "tool_use"]
        assistant = [b.model_dump(exclude_none=True) for b in call.content]
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.content[1].id,
                                               "content": "sunny"}]}  # fmt: skip
        history = [*thinking_turn()["messages"], {"role": "assistant", "content": assistant}, result]
        answer = await sdk.messages.create(**thinking_turn(tools=TOOLS, messages=history))
        assert answer.content[-1].type == "text" and "sunny" in answer.content[-1].text
        tampered = [{**assistant[0], "thinking": assistant[0]["thinking"] + "!"}, assistant[1]]
        unsigned = [{k: v for k, v in assistant[0].items() if k != "signature"}, assistant[1]]
        for content in (tampered, unsigned, assistant[1:]):
            bad = [history[0], {"role": "assistant", "content": content}, result]
            with pytest.raises(anthropic.BadRequestError) as err:
                await sdk.messages.create(**thinking_turn(tools=TOOLS, messages=bad))
            assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        redacted = [{"type": "redacted_thinking", "data": "opaque"}, assistant[1]]
        ok = await sdk.messages.create(**thinking_turn(tools=TOOLS, messages=[history[0],
                                                       {"role": "assistant", "content": redacted}, result]))
        assert ok.content[0].type == "thinking"


async def test_thinking_budget_is_validated(make_client: ClientFactory) -> None:
    client = await make_client()
    for thinking, max_tokens in (({"type": "enabled", "budget_tokens": 100}, 2048),
                                 ({"type": "enabled", "budget_tokens": 4096}, 2048)):  # fmt: skip
        resp = await client.post("/v1/messages", json={**thinking_turn(thinking=thinking), "max_tokens": max_tokens})
        assert resp.status == 400, await resp.text()
