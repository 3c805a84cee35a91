"""The simulated upstream's native Responses API, driven through the real openai SDK and raw."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from tokensforge.mock_core import TOOL_RESULT_PREFIX, reply_text
from tokensforge.mock_responses import item_tokens
from tokensforge.mock_upstream import Faults, MockConfig, create_app

ClientFactory = Callable[..., Awaitable[TestClient]]
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]  # fmt: skip


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    async def factory(config: MockConfig | None = None) -> TestClient:
        return await aiohttp_client(create_app(config))

    return factory


def gpt(client: TestClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="k", max_retries=0)


def sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in raw.split(b"\n\n"):
        if chunk:
            event, data = chunk.split(b"\n", 1)
            out.append((event.removeprefix(b"event: ").decode(), orjson.loads(data.removeprefix(b"data: "))))
    return out


async def test_sdk_create_text_and_usage(make_client: ClientFactory) -> None:
    client = await make_client()
    async with gpt(client) as sdk:
        response = await sdk.responses.create(model="gpt-r", input="hello there", instructions="Be terse.")
    assert response.status == "completed" and response.model == "gpt-r"
    assert response.output_text == reply_text(16)
    assert response.usage is not None
    expected = item_tokens({"role": "user", "content": "hello there"}) + (len("Be terse.") + 3) // 4 + 3
    assert response.usage.input_tokens == expected
    assert response.usage.output_tokens == 16 and response.usage.total_tokens == expected + 16
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0


async def test_sdk_stream_events_in_openai_order(make_client: ClientFactory) -> None:
    client = await make_client()
    async with gpt(client) as sdk:
        async with sdk.responses.stream(model="gpt-r", input="hi", max_output_tokens=20) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == reply_text(16)
    assert final.usage is not None and final.usage.output_tokens == 16


async def test_function_call_then_answer_with_previous_response(make_client: ClientFactory) -> None:
    client = await make_client()
    async with gpt(client) as sdk:
        first = await sdk.responses.create(model="gpt-r", input="weather in Paris?", tools=TOOLS)
        call = first.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        assert orjson.loads(call.arguments) == {"city": "weather in Paris?"}
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        second = await sdk.responses.create(model="gpt-r", previous_response_id=first.id, input=[output], tools=TOOLS)
        fetched = await sdk.responses.retrieve(first.id)
        with pytest.raises(openai.BadRequestError) as err:
            await sdk.responses.create(model="gpt-r", previous_response_id="resp_nope", input="x")
    assert second.output_text == TOOL_RESULT_PREFIX + "sunny"
    assert first.usage is not None and second.usage is not None
    # the whole conversation is input again: the first input, its call, and the output
    assert second.usage.input_tokens == first.usage.input_tokens + item_tokens(call.model_dump()) + item_tokens(output)
    assert fetched.id == first.id
    assert "Previous response with id 'resp_nope' not found." in str(err.value)


async def test_sdk_stream_function_call(make_client: ClientFactory) -> None:
    client = await make_client()
    async with gpt(client) as sdk:
        async with sdk.responses.stream(model="gpt-r", input="get_weather Oslo", tools=TOOLS) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_response()
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert final.output[0].type == "function_call" and args == done.arguments == final.output[0].arguments


async def test_reasoning_item_and_encrypted_content_round_trip(make_client: ClientFactory) -> None:
    client = await make_client()
    async with gpt(client) as sdk:
        plain = await sdk.responses.create(model="o-r", input="think", reasoning={"effort": "low"})
        sealed = await sdk.responses.create(model="o-r", input="think", reasoning={"effort": "high"}, store=False,
                                            include=["reasoning.encrypted_content"])  # fmt: skip
        item = sealed.output[0]
        assert item.type == "reasoning" and item.encrypted_content and item.summary == []
        back = [{"role": "user", "content": "think"}, item.model_dump(exclude_none=True),
                {"role": "user", "content": "more"}]  # fmt: skip
        again = await sdk.responses.create(model="o-r", input=back, reasoning={"effort": "low"})
        tampered = [back[0], {**back[1], "encrypted_content": item.encrypted_content[:-8] + "AAAAAAA="}, back[2]]
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.create(model="o-r", input=tampered, reasoning={"effort": "low"})
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(sealed.id)  # store=false keeps nothing
    assert plain.output[0].type == "reasoning" and getattr(plain.output[0], "encrypted_content", None) is None
    assert plain.usage is not None and plain.usage.output_tokens_details.reasoning_tokens == 16
    assert plain.usage.output_tokens == 16 + 16
    assert sealed.usage is not None and sealed.usage.output_tokens_details.reasoning_tokens == 64
    assert again.status == "completed"


async def test_max_output_tokens_makes_it_incomplete(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(default=Faults(completion_tokens=40)))
    async with gpt(client) as sdk:
        capped = await sdk.responses.create(model="gpt-r", input="hi", max_output_tokens=16)
        thought_out = await sdk.responses.create(model="o-r", input="hi", max_output_tokens=30,
                                                 reasoning={"effort": "high"})  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.create(model="gpt-r", input="hi", max_output_tokens=8)
    assert capped.status == "incomplete" and capped.incomplete_details is not None
    assert capped.incomplete_details.reason == "max_output_tokens" and capped.output_text == reply_text(16)
    assert thought_out.status == "incomplete" and [o.type for o in thought_out.output] == ["reasoning"]
    assert thought_out.usage is not None and thought_out.usage.output_tokens == 30
    body = {"model": "m", "input": "hi", "max_output_tokens": 16, "stream": True}
    resp = await client.post("/v1/responses", json=body)
    events = sse(await resp.read())
    assert events[-1][0] == "response.incomplete" and events[-1][1]["response"]["status"] == "incomplete"


async def test_responses_prompt_cache(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(cache_min_tokens=64, cache_quantum_tokens=16))
    long = "word " * 200
    async with gpt(client) as sdk:
        first = await sdk.responses.create(model="gpt-r", instructions=long, input="one")
        second = await sdk.responses.create(model="gpt-r", previous_response_id=first.id, input="two",
                                            instructions=long)  # fmt: skip
        keyed = await sdk.responses.create(model="gpt-r", instructions=long, input="one", prompt_cache_key="k2")
    assert first.usage is not None and second.usage is not None and keyed.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    prefix = first.usage.input_tokens  # instructions + "one" were cached as whole items
    assert second.usage.input_tokens_details.cached_tokens == prefix // 16 * 16 > 0
    assert keyed.usage.input_tokens_details.cached_tokens == 0


async def test_responses_faults_apply(make_client: ClientFactory) -> None:
    client = await make_client(MockConfig(per_model={
        "down": Faults(error_status=503), "cut": Faults(cut_after_chunks=2), "quiet": Faults(no_usage=True)}))
    body = {"input": "hello", "stream": True}
    down = await client.post("/v1/responses", json={"model": "down", **body})
    assert down.status == 503 and (await down.json())["error"]["type"] == "server_error"
    cut = await client.post("/v1/responses", json={"model": "cut", **body})
    with pytest.raises(Exception):  # noqa: B017 - the connection is dropped mid-stream
        await cut.read()
    quiet = await client.post("/v1/responses", json={"model": "quiet", "input": "hello"})
    assert (await quiet.json())["usage"] is None
    stats = await (await client.get("/_mock/stats")).json()
    assert stats["cut"] == 1


async def test_delete_and_bad_input(make_client: ClientFactory) -> None:
    client = await make_client()
    async with gpt(client) as sdk:
        response = await sdk.responses.create(model="gpt-r", input="hi")
        await sdk.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(response.id)
    bad = await client.post("/v1/responses", json={"model": "m", "input": 3})
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "input"
