"""POST /v1/responses end to end: the official openai SDK (and openai-agents) → the gateway → the simulated
upstream over an OpenAI-kind channel (gpt-4o-mini) and an Anthropic-kind channel (claude-test), billed on a
real ledger. Cross-dialect billing, failover and failure charging are in test_dialects_e2e.py."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types.responses import Response as SdkResponse

from tokensforge.mock_upstream import TOOL_RESULT_PREFIX

from .harness import Gw

#: (public model, the upstream model its official route calls, the path the upstream is called on)
CHANNELS = [("gpt-4o-mini", "up-official", "/v1/chat/completions"),
            ("claude-test", "up-claude", "/v1/messages")]
CHANNEL_IDS = ["openai-channel", "anthropic-channel"]
WEATHER: dict[str, Any] = {
    "type": "function", "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FUNDS = 10**9


async def short_answers(gw: Gw, tokens: int) -> None:
    """Both official upstreams answer `tokens` tokens and finish normally (not at the output cap)."""
    await gw.mock.faults(**{upstream: {"completion_tokens": tokens} for _, upstream, _ in CHANNELS})


def receipt_of(response: Any) -> dict[str, Any]:
    assert response.model_extra is not None and "receipt" in response.model_extra, response
    receipt: dict[str, Any] = response.model_extra["receipt"]
    return receipt


async def test_unary_is_a_strict_response_billed_as_its_receipt_says(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 7)
    spent = 0
    for model, upstream_model, upstream_path in CHANNELS:
        raw = await gw.client(key).responses.with_raw_response.create(
            model=model, input="Say hello to the ledger.", instructions="Be terse.", max_output_tokens=9)
        data = raw.http_response.json()
        response = SdkResponse.model_validate(data, strict=True)
        assert response.id.startswith("resp_") and response.status == "completed" and response.model == model
        assert response.output_text and response.instructions == "Be terse." and response.max_output_tokens == 9
        assert response.usage is not None and response.usage.output_tokens == 7
        receipt = data["receipt"]
        assert receipt["endpoint"] == "responses" and receipt["upstream_model"] == upstream_model
        assert receipt["usage"] == {"prompt_tokens": response.usage.input_tokens, "completion_tokens": 7,
                                    "total_tokens": response.usage.total_tokens, "cache_read_tokens": 0,
                                    "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "reasoning_tokens": 0}
        assert response.usage.input_tokens_details.cached_tokens == 0
        assert raw.headers["x-request-id"] == receipt["request_id"]
        assert raw.headers["x-tokensforge-charge-nanos"] == str(receipt["charge_nanos"])
        assert raw.headers["x-tokensforge-ledger-entry"] == receipt["ledger_entry_id"]
        spent += await gw.assert_billed(key, receipt, response.id)
        assert (await gw.balances(key))["credit"]["balance_nanos"] == FUNDS - spent
        last = (await gw.mock.stats())["last_request"]
        assert last["path"] == upstream_path and last["body"]["model"] == upstream_model
        sent = str(last["body"])
        assert "Be terse." in sent and "Say hello to the ledger." in sent


@pytest.mark.parametrize("model", [model for model, _, _ in CHANNELS], ids=CHANNEL_IDS)
async def test_raw_stream_events_in_order_with_one_id_and_the_receipt_last(gw: Gw, model: str) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 6)
    stream = await gw.client(key).responses.create(model=model, input="Stream to me.", max_output_tokens=20,
                                                   stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") >= 1 and "response.failed" not in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_ids = {e.response.id for e in events if hasattr(e, "response")}
    assert len(response_ids) == 1
    (response_id,) = response_ids
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids and all(i.removeprefix("msg_").startswith(response_id.removeprefix("resp_")) for i in item_ids)
    final = events[-1].response  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and final.usage is not None and final.usage.output_tokens == 6
    receipt = receipt_of(final)
    assert receipt["request_id"].removeprefix("req_") == response_id.removeprefix("resp_")
    assert receipt["usage"]["completion_tokens"] == 6
    await gw.assert_billed(key, receipt, response_id)
    assert (await gw.mock.stats())["last_request"]["body"]["stream"] is True


async def test_stream_helper_final_response(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 5)
    for model, _, _ in CHANNELS:
        deltas: list[str] = []
        async with gw.client(key).responses.stream(model=model, input="Hi there.", max_output_tokens=20) as stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
            final = await stream.get_final_response()
        assert final.status == "completed" and final.output_text == "".join(deltas) != ""
        assert final.usage is not None and final.usage.output_tokens == 5
        await gw.assert_billed(key, receipt_of(final), final.id)


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
async def test_function_tool_round_trip_with_previous_response_id(gw: Gw, streamed: bool) -> None:
    _, key = await gw.account(credit=FUNDS)
    for model, _, _ in CHANNELS:
        await tool_round_trip(gw, key, model, streamed)


async def tool_round_trip(gw: Gw, key: str, model: str, streamed: bool) -> None:
    client = gw.client(key)

    async def create(**fields: Any) -> Any:
        if not streamed:
            return await client.responses.create(model=model, tools=[WEATHER], **fields)  # type: ignore[list-item]
        async with client.responses.stream(model=model, tools=[WEATHER], **fields) as stream:  # type: ignore[list-item]
            return await stream.get_final_response()

    first = await create(input="Paris")
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", first.output
    assert calls[0].arguments == '{"city":"Paris"}' and calls[0].call_id
    second = await create(previous_response_id=first.id,
                          input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert second.output_text == TOOL_RESULT_PREFIX + "sunny" and second.previous_response_id == first.id
    assert second.id != first.id
    for response in (first, second):
        await gw.assert_billed(key, receipt_of(response), response.id)
    sent = str((await gw.mock.stats())["last_request"]["body"])
    assert "Paris" in sent and calls[0].call_id in sent  # the stored first turn went upstream


async def test_previous_response_id_carries_the_first_turn_upstream(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    await short_answers(gw, 4)
    client = gw.client(key)
    for model, _, _ in CHANNELS:
        first = await client.responses.create(model=model, input="My name is Ada.", instructions="Be kind.",
                                               max_output_tokens=20)
        second = await client.responses.create(model=model, input="What is my name?",
                                                previous_response_id=first.id, max_output_tokens=20)
        body = (await gw.mock.stats())["last_request"]["body"]
        turns = [(m["role"], str(m["content"])) for m in body["messages"]]
        roles = [role for role, _ in turns]
        assert roles[-3:] == ["user", "assistant", "user"], turns
        assert "My name is Ada." in turns[-3][1] and first.output_text in turns[-2][1]
        assert "What is my name?" in turns[-1][1]
        assert "Be kind." not in str(body)  # instructions belong to their own turn only (as OpenAI does)
        assert receipt_of(second)["usage"]["prompt_tokens"] > receipt_of(first)["usage"]["prompt_tokens"]


async def test_unknown_or_foreign_previous_response_id_is_a_404(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    _, other_key = await gw.account(credit=FUNDS)
    theirs = await gw.client(other_key).responses.create(model="gpt-4o-mini", input="secret", max_output_tokens=2)
    before = await gw.balances(key)
    for unknown in ("resp_0000000000000000deadbeef", theirs.id):
        with pytest.raises(openai.NotFoundError) as caught:
            await gw.client(key).responses.create(model="gpt-4o-mini", input="go on", previous_response_id=unknown)
        error = caught.value.body
        assert isinstance(error, dict) and set(error) >= {"message", "type", "code", "param"}, error
        assert error["param"] == "previous_response_id" and error["code"] == "not_found"
        assert unknown in error["message"] and "secret" not in error["message"]
        assert caught.value.response.headers["x-should-retry"] == "false"
    assert await gw.balances(key) == before


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_openai_agents_runner_calls_the_tool_through_the_gateway(gw: Gw, streamed: bool) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # never export traces to api.openai.com from a test
    _, key = await gw.account(credit=FUNDS)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        seen.append(city)
        return f"sunny in {city}"

    agent = Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                  model=OpenAIResponsesModel("gpt-4o-mini", gw.client(key)))
    if streamed:
        run = Runner.run_streamed(agent, "Paris")
        async for _ in run.stream_events():
            pass
        final = run.final_output
    else:
        final = (await Runner.run(agent, "Paris")).final_output
    assert seen == ["Paris"]
    assert final == TOOL_RESULT_PREFIX + "sunny in Paris"
    status, usage = await gw.get("/v1/usage", key)
    assert status == 200
    records = usage["data"]
    assert len(records) == 2 and {r["endpoint"] for r in records} == {"responses"}
    charged = [await gw.assert_billed(key, r) for r in records]
    assert (await gw.balances(key))["credit"]["balance_nanos"] == FUNDS - sum(charged)
