"""POST /v1/messages and /v1/messages/count_tokens end to end: the official anthropic SDK (and raw HTTP with
`x-api-key`) → the gateway → the simulated upstream over the Anthropic-kind channel (claude-test) and an
OpenAI-kind channel (gpt-4o-mini), billed on a real ledger. Cross-dialect billing, failover and failure
charging are in test_dialects_e2e.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import orjson
import pytest
from anthropic.types import Message as SdkMessage
from anthropic.types import MessageParam

from tokensforge.mock_upstream import TOOL_RESULT_PREFIX

from .harness import UPSTREAM_SECRET, Gw

#: (public model, the upstream model its official route calls, the path the upstream is called on)
CHANNELS = [("claude-test", "up-claude", "/v1/messages"),
            ("gpt-4o-mini", "up-official", "/v1/chat/completions")]
CHANNEL_IDS = ["anthropic-channel", "openai-channel"]
WEATHER: dict[str, Any] = {
    "name": "get_weather", "description": "The weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FUNDS = 10**9
HELLO: list[MessageParam] = [{"role": "user", "content": "Say hello to the ledger."}]

Factory = Callable[[str], anthropic.AsyncAnthropic]


@pytest.fixture
async def claude(gw: Gw) -> AsyncIterator[Factory]:
    """anthropic.AsyncAnthropic clients for keys of this gateway (no retries), closed after the test."""
    made: list[anthropic.AsyncAnthropic] = []

    def make(key: str) -> anthropic.AsyncAnthropic:
        made.append(anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=10))
        return made[-1]

    try:
        yield make
    finally:
        for client in made:
            await client.close()


async def short_answers(gw: Gw, tokens: int) -> None:
    """Both official upstreams answer `tokens` tokens and finish normally (not at the output cap)."""
    await gw.mock.faults(**{upstream: {"completion_tokens": tokens} for _, upstream, _ in CHANNELS})


def receipt_of(obj: Any) -> dict[str, Any]:
    assert obj.model_extra is not None and "receipt" in obj.model_extra, obj
    receipt: dict[str, Any] = obj.model_extra["receipt"]
    return receipt


async def test_create_text_is_a_strict_message_billed_as_its_receipt_says(gw: Gw, claude: Factory) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 7)
    spent = 0
    for model, upstream_model, upstream_path in CHANNELS:
        raw = await claude(key).messages.with_raw_response.create(
            model=model, max_tokens=20, system="Be terse.", messages=HELLO)
        data = raw.http_response.json()
        message = SdkMessage.model_validate(data, strict=True)
        assert message.id.startswith("msg_") and message.model == model and message.stop_reason == "end_turn"
        assert [block.type for block in message.content] == ["text"] and message.content[0].text  # type: ignore[union-attr]
        assert message.usage.output_tokens == 7
        receipt = data["receipt"]
        assert receipt["endpoint"] == "messages" and receipt["upstream_model"] == upstream_model
        assert receipt["usage"] == {"prompt_tokens": message.usage.input_tokens, "completion_tokens": 7,
                                    "total_tokens": message.usage.input_tokens + 7, "cache_read_tokens": 0,
                                    "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "reasoning_tokens": 0}
        assert message.usage.cache_read_input_tokens == 0 and message.usage.cache_creation_input_tokens == 0
        assert raw.headers["x-request-id"] == receipt["request_id"]
        assert raw.headers["x-tokensforge-route"] == f"{model}/official"
        assert raw.headers["x-tokensforge-charge-nanos"] == str(receipt["charge_nanos"])
        spent += await gw.assert_billed(key, receipt, message.id)
        assert (await gw.balances(key))["credit"]["balance_nanos"] == FUNDS - spent
        last = (await gw.mock.stats())["last_request"]
        assert last["path"] == upstream_path and last["body"]["model"] == upstream_model
        assert "Be terse." in str(last["body"]) and "Say hello to the ledger." in str(last["body"])


@pytest.mark.parametrize("streamed", [False, True], ids=["create", "stream"])
async def test_tool_use_round_trip(gw: Gw, claude: Factory, streamed: bool) -> None:
    _, key = await gw.account(credit=FUNDS)
    for model, _, _ in CHANNELS:
        await tool_use_round_trip(gw, claude(key), key, model, streamed)


async def tool_use_round_trip(gw: Gw, client: anthropic.AsyncAnthropic, key: str, model: str,
                              streamed: bool) -> None:
    async def create(messages: list[dict[str, Any]]) -> tuple[SdkMessage, dict[str, Any]]:
        fields: dict[str, Any] = dict(model=model, max_tokens=200, tools=[WEATHER], messages=messages)
        if not streamed:
            message = await client.messages.create(**fields)
            return message, receipt_of(message)
        async with client.messages.stream(**fields) as stream:
            receipts = [receipt_of(e) async for e in stream if e.type == "message_delta"]
            assert len(receipts) == 1
            return await stream.get_final_message(), receipts[0]

    question = {"role": "user", "content": "Paris"}
    first, first_receipt = await create([question])
    assert first.stop_reason == "tool_use", first
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id
    answer = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}
    turn = {"role": "assistant", "content": [b.model_dump() for b in first.content]}
    second, second_receipt = await create([question, turn, answer])
    assert second.stop_reason == "end_turn"
    assert "".join(b.text for b in second.content if b.type == "text") == TOOL_RESULT_PREFIX + "sunny"
    await gw.assert_billed(key, first_receipt, first.id)
    await gw.assert_billed(key, second_receipt, second.id)
    assert use.id in str((await gw.mock.stats())["last_request"]["body"])  # the call id went upstream


async def test_stream_helper_final_message(gw: Gw, claude: Factory) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 5)
    for model, _, _ in CHANNELS:
        text, receipts = "", []
        async with claude(key).messages.stream(model=model, max_tokens=20, messages=HELLO) as stream:
            async for event in stream:
                if event.type == "text":
                    text += event.text
                elif event.type == "message_delta":  # the SDK's accumulated message drops unknown fields
                    receipts.append(receipt_of(event))
            final = await stream.get_final_message()
        assert text and final.content[0].text == text and final.usage.output_tokens == 5  # type: ignore[union-attr]
        assert final.stop_reason == "end_turn" and len(receipts) == 1
        await gw.assert_billed(key, receipts[0], final.id)


@pytest.mark.parametrize("model", [model for model, _, _ in CHANNELS], ids=CHANNEL_IDS)
async def test_raw_stream_events_start_first_receipt_on_delta_stop_last(gw: Gw, claude: Factory, model: str) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 6)
    stream = await claude(key).messages.create(model=model, max_tokens=20, messages=HELLO, stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and kinds[-2] == "message_delta"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert "content_block_delta" in kinds
    start, delta = events[0], events[-2]
    message_id = start.message.id  # type: ignore[union-attr]
    assert message_id.startswith("msg_") and start.message.model == model  # type: ignore[union-attr]
    assert delta.usage.output_tokens == 6  # type: ignore[union-attr]
    receipt = receipt_of(delta)
    assert receipt["request_id"].removeprefix("req_") == message_id.removeprefix("msg_")
    assert receipt["usage"]["completion_tokens"] == 6
    await gw.assert_billed(key, receipt, message_id)
    assert (await gw.mock.stats())["last_request"]["body"]["stream"] is True


async def test_count_tokens_charges_nothing(gw: Gw, claude: Factory) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = claude(key)
    before = await gw.balances(key)
    for model, _, _ in CHANNELS:
        short = await client.messages.count_tokens(model=model, messages=HELLO)
        longer = await client.messages.count_tokens(model=model, system="Be terse, and kind.", tools=[WEATHER],  # type: ignore[list-item]
                                                    messages=HELLO * 3)
        assert 0 < short.input_tokens < longer.input_tokens
    assert await gw.balances(key) == before
    _, ledger = await gw.get("/v1/ledger", key)
    assert [e["kind"] for e in ledger["data"]] == ["topup"]
    _, usage = await gw.get("/v1/usage", key)
    assert usage["data"] == []
    assert (await gw.mock.stats())["requests"] == 0  # counted by the gateway itself, nothing went upstream


async def test_both_auth_headers_and_anthropic_error_shape(gw: Gw, claude: Factory) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 3)
    body = orjson.dumps({"model": "claude-test", "max_tokens": 20, "messages": HELLO})
    request_ids = []
    for auth in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
        async with gw.session.post(gw.url + "/v1/messages", data=body,
                                   headers={"content-type": "application/json", **auth}) as r:
            data = await r.json()
            assert r.status == 200, data
            assert SdkMessage.model_validate(data).usage.output_tokens == 3
            request_ids.append(data["receipt"]["request_id"])
            await gw.assert_billed(key, data["receipt"], data["id"])
    assert len(set(request_ids)) == 2
    async with gw.session.post(gw.url + "/v1/messages", data=body,
                               headers={"content-type": "application/json", "x-api-key": "tf-wrong"}) as r:
        assert r.status == 401 and r.headers["x-should-retry"] == "false" and "x-request-id" in r.headers
        error = await r.json()
    assert error["type"] == "error" and error["error"]["type"] == "authentication_error"
    assert "tf-wrong" not in error["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        await claude("tf-wrong").messages.create(model="claude-test", max_tokens=5, messages=HELLO)


async def test_anthropic_beta_reaches_the_anthropic_channel_only(gw: Gw, claude: Factory) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 2)
    beta = "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19"
    client = claude(key)
    await client.messages.create(model="claude-test", max_tokens=10, messages=HELLO,
                                 extra_headers={"anthropic-beta": beta})
    headers = (await gw.mock.stats())["last_request"]["headers"]
    assert headers["anthropic-beta"] == beta
    assert headers["x-api-key"] == UPSTREAM_SECRET and "anthropic-version" in headers
    assert key not in str(headers)  # the client's key never goes upstream
    await client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=HELLO,
                                 extra_headers={"anthropic-beta": beta})
    headers = (await gw.mock.stats())["last_request"]["headers"]
    assert "anthropic-beta" not in headers and headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
