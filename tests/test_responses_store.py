"""Stored responses (SPEC §2): GET / DELETE /v1/responses/{id} and its input_items, driven with the official
openai SDK against a real gateway; the pure parts (input items, page windows) without one."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from tokensforge.conversations import ConversationStore, Window, input_items, window

from .harness import Gw
from .test_openapi import conforms

FUNDS = 10**9
MODEL = "gpt-4o-mini"
FIVE_ITEMS: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be terse."},
    {"role": "user", "content": "one"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "two"}]},
    {"role": "user", "content": [{"type": "input_text", "text": "three"}], "id": "msg_client_3"},
    {"role": "user", "content": "four"},
]


# ================================================================== pure


def test_a_string_input_is_one_user_message_item_with_an_id() -> None:
    assert input_items("Hello", "resp_abc") == [
        {"id": "msg_abc_in0", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": "Hello"}]}]


def test_input_items_keep_their_own_ids_order_and_fields_and_never_repeat_an_id() -> None:
    items = input_items([
        {"role": "assistant", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "id": "fc_own"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "user", "content": "again", "id": "fc_own"},  # a repeated id: a cursor must name one item
        "not an item",
    ], "resp_x")
    assert [i["id"] for i in items] == ["msg_x_in0", "fc_own", "fco_x_in2", "rs_1", "msg_x_in4"]
    assert items[0]["content"] == [{"type": "output_text", "text": "hi", "annotations": []}]
    assert items[1] == {"id": "fc_own", "type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}",
                        "status": "completed"}
    assert items[2]["status"] == "completed" and items[2]["output"] == "ok"
    assert items[3] == {"id": "rs_1", "type": "reasoning", "summary": []}  # no status invented for it
    assert input_items(None, "resp_x") == [] and input_items({"role": "user"}, "resp_x") == []


@pytest.mark.parametrize("order,after,before,expected", [
    ("asc", None, None, Window(-1, 2**31 - 1, ascending=True, reverse=False)),
    ("desc", None, None, Window(-1, 2**31 - 1, ascending=False, reverse=False)),
    ("asc", 3, None, Window(3, 2**31 - 1, ascending=True, reverse=False)),
    ("desc", 3, None, Window(-1, 3, ascending=False, reverse=False)),
    ("asc", None, 3, Window(-1, 3, ascending=False, reverse=True)),  # the items just before 3, listed asc
    ("desc", None, 3, Window(3, 2**31 - 1, ascending=True, reverse=True)),
    ("asc", 1, 4, Window(1, 4, ascending=True, reverse=False)),
    ("desc", 4, 1, Window(1, 4, ascending=False, reverse=False)),
])
def test_page_windows_follow_openai_cursor_semantics(order: Any, after: int | None, before: int | None,
                                                      expected: Window) -> None:
    assert window(order, after, before) == expected


# ================================================================== end to end


async def test_a_created_response_is_retrieved_as_it_was_returned_receipt_included(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    raw = await client.responses.with_raw_response.create(model=MODEL, input="Keep me.", max_output_tokens=12)
    created_json = raw.http_response.json()
    created = raw.parse()
    assert created_json["store"] is True and created_json["receipt"]["status"] == "succeeded"
    async with gw.session.get(f"{gw.url}/v1/responses/{created.id}",
                              headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.read() == raw.http_response.content  # byte for byte
        assert r.headers["x-request-id"].startswith("req_")
    retrieved = await client.responses.retrieve(created.id)
    assert retrieved == created and retrieved.model_extra == created.model_extra
    assert retrieved.output_text == created.output_text != ""
    conforms("GET", "/v1/responses/{response_id}", 200, created_json)


async def test_a_streamed_response_is_retrieved_as_its_completed_event_carried_it(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    await gw.mock.faults(**{"up-official": {"completion_tokens": 5}})  # a normal finish, under the cap
    stream = await client.responses.create(model=MODEL, input="Stream and keep me.", max_output_tokens=12,
                                           stream=True)
    events: list[Any] = [event async for event in stream]
    assert events[-1].type == "response.completed"
    completed = events[-1].response
    status, stored = await gw.get(f"/v1/responses/{completed.id}", key)
    assert status == 200, stored
    assert stored == completed.model_dump(mode="json", exclude_unset=True)
    assert stored["receipt"]["status"] == "succeeded" and stored["output"][0]["content"][0]["text"]
    assert await client.responses.retrieve(completed.id) == completed
    items = [item async for item in client.responses.input_items.list(completed.id)]
    assert [i.type for i in items] == ["message"] and _text(items[0]) == "Stream and keep me."


@pytest.mark.parametrize("case", ["tool_call", "empty_answer", "length_cut"])
async def test_a_stream_is_stored_byte_for_byte_as_its_terminal_event_carried_it(gw: Gw, case: str) -> None:
    _, key = await gw.account(credit=FUNDS)
    weather = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    body: dict[str, Any] = {"model": MODEL, "input": "Paris", "stream": True, "max_output_tokens": 6}
    if case == "tool_call":
        body["tools"] = [weather]
    elif case == "empty_answer":
        await gw.mock.faults(**{"up-official": {"completion_tokens": 0}})
    events = await _raw_stream(gw, key, body)
    kinds = [event["type"] for event in events]
    final = events[-1]["response"]
    assert kinds[-1] == ("response.incomplete" if case == "length_cut" else "response.completed"), kinds
    assert kinds.count(kinds[-1]) == 1 and [e["sequence_number"] for e in events] == list(range(len(events)))
    assert {"tool_call": ["function_call"], "empty_answer": [], "length_cut": ["message"]}[case] == [
        item["type"] for item in final["output"]]
    async with gw.session.get(f"{gw.url}/v1/responses/{final['id']}",
                              headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status == 200 and await r.read() == orjson.dumps(final)  # as sent, key order included


async def test_input_items_page_in_both_orders_with_openai_cursors(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    created = await client.responses.create(model=MODEL, input=FIVE_ITEMS, max_output_tokens=8)  # type: ignore[arg-type]
    everything: list[Any] = [item async for item in client.responses.input_items.list(created.id, order="asc", limit=2)]
    ids = [item.id for item in everything]
    assert len(ids) == 5 == len(set(ids)) and ids[3] == "msg_client_3"
    assert [item.role for item in everything] == ["developer", "user", "assistant", "user", "user"]
    assert _text(everything[1]) == "one"
    newest_first = [item.id async for item in client.responses.input_items.list(created.id, limit=2)]
    assert newest_first == ids[::-1]  # desc is the default, as at OpenAI

    async def page(query: str) -> dict[str, Any]:
        status, body = await gw.get(f"/v1/responses/{created.id}/input_items?{query}", key)
        assert status == 200, body
        conforms("GET", "/v1/responses/{response_id}/input_items", 200, body)
        return dict(body)

    first = await page("order=asc&limit=2")
    assert [i["id"] for i in first["data"]] == ids[:2] and first["has_more"] is True
    assert (first["object"], first["first_id"], first["last_id"]) == ("list", ids[0], ids[1])
    last = await page(f"order=asc&limit=2&after={ids[2]}")
    assert [i["id"] for i in last["data"]] == ids[3:] and last["has_more"] is False
    before = await page(f"order=asc&limit=2&before={ids[3]}")  # the two just before, still ascending
    assert [i["id"] for i in before["data"]] == ids[1:3] and before["has_more"] is True
    desc_after = await page(f"limit=2&after={ids[3]}")
    assert [i["id"] for i in desc_after["data"]] == [ids[2], ids[1]] and desc_after["has_more"] is True
    desc_before = await page(f"limit=3&before={ids[1]}")
    assert [i["id"] for i in desc_before["data"]] == [ids[4], ids[3], ids[2]] and desc_before["has_more"] is False
    between = await page(f"order=asc&after={ids[0]}&before={ids[4]}")
    assert [i["id"] for i in between["data"]] == ids[1:4] and between["has_more"] is False
    empty = await page(f"order=asc&after={ids[4]}")
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


async def test_bad_page_requests_are_400s_naming_the_parameter(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    created = await gw.client(key).responses.create(model=MODEL, input="hi", max_output_tokens=4)
    path = f"/v1/responses/{created.id}/input_items"
    for query, param in (("?after=msg_nope", "after"), ("?before=msg_nope", "before"), ("?order=up", "order"),
                         ("?limit=0", "limit"), ("?limit=101", "limit"), ("?after=a%00", "after")):
        status, body = await gw.get(path + query, key)
        assert status == 400 and body["error"]["param"] == param, (query, body)
        conforms("GET", "/v1/responses/{response_id}/input_items", 400, body)


async def test_delete_forgets_the_response_but_never_the_money(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    created = await client.responses.create(model=MODEL, input="Forget me.", max_output_tokens=8)
    receipt: dict[str, Any] = created.model_extra["receipt"]  # type: ignore[index]
    balances, ledger = await gw.balances(key), await gw.get("/v1/ledger?limit=100", key)
    status, deleted = await _delete(gw, key, created.id)
    assert status == 200 and deleted == {"id": created.id, "object": "response", "deleted": True}
    conforms("DELETE", "/v1/responses/{response_id}", 200, deleted)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.retrieve(created.id)
    assert caught.value.body["code"] == "not_found" and created.id in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(created.id)
    with pytest.raises(openai.NotFoundError) as follow:
        await client.responses.create(model=MODEL, input="and?", previous_response_id=created.id)
    assert follow.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert (await _delete(gw, key, created.id))[0] == 404
    # the usage record, the receipt and the ledger are untouched
    assert await gw.balances(key) == balances and await gw.get("/v1/ledger?limit=100", key) == ledger
    assert await gw.assert_billed(key, receipt, created.id) == receipt["charge_nanos"]


async def test_the_sdk_delete_then_retrieve_is_not_found(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    created = await client.responses.create(model=MODEL, input="bye", max_output_tokens=4)
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)


async def test_store_false_is_not_retrievable(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    unary = await client.responses.create(model=MODEL, input="ephemeral", max_output_tokens=4, store=False)
    stream = await client.responses.create(model=MODEL, input="ephemeral", max_output_tokens=4, store=False,
                                           stream=True)
    events: list[Any] = [event async for event in stream]
    streamed = events[-1].response
    for response in (unary, streamed):
        assert response.model_dump()["store"] is False  # echoed (an extra field of the SDK model)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.input_items.list(response.id)


async def test_another_accounts_response_is_a_404_in_openai_shape_and_stays(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    _, other = await gw.account(credit=FUNDS)
    mine = await gw.client(key).responses.create(model=MODEL, input="mine only", max_output_tokens=4)
    for method, path in (("GET", f"/v1/responses/{mine.id}"), ("DELETE", f"/v1/responses/{mine.id}"),
                         ("GET", f"/v1/responses/{mine.id}/input_items"),
                         ("GET", "/v1/responses/resp_0000000000000000deadbeef")):
        async with gw.session.request(method, gw.url + path, headers={"authorization": f"Bearer {other}"}) as r:
            body = await r.json()
            assert r.status == 404 and r.headers["x-should-retry"] == "false", body
        assert set(body["error"]) >= {"message", "type", "code", "param"} and body["error"]["code"] == "not_found"
        assert "mine only" not in str(body)
        conforms(method, path.replace(mine.id, "{response_id}").replace("resp_0000000000000000deadbeef",
                                                                         "{response_id}"), 404, body)
    with pytest.raises(openai.NotFoundError):
        await gw.client(other).responses.retrieve(mine.id)
    assert (await gw.client(key).responses.retrieve(mine.id)).id == mine.id  # the owner still has it


async def test_a_follow_up_still_chains_and_its_own_input_items_are_listed(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    first = await client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8)
    second = await client.responses.create(model=MODEL, input="Who am I?", previous_response_id=first.id,
                                           max_output_tokens=8)
    assert "My name is Ada." in str((await gw.mock.stats())["last_request"]["body"])
    items = [item async for item in client.responses.input_items.list(second.id)]
    assert [_text(i) for i in items] == ["Who am I?"]
    assert (await client.responses.retrieve(second.id)).previous_response_id == first.id


async def test_what_postgresql_cannot_hold_is_answered_and_billed_but_not_stored(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    nul_text = b'{"model": "gpt-4o-mini", "input": "hi\\u0000there", "max_output_tokens": 4}'
    status, answer, headers = await gw.post("/v1/responses", key, nul_text)
    assert status == 200 and answer["receipt"]["charge_nanos"] > 0, answer  # not a 5xx after a charge
    await gw.assert_billed(key, answer["receipt"], answer["id"])
    assert (await gw.get(f"/v1/responses/{answer['id']}", key))[0] == 404  # a NUL cannot be in jsonb
    nul_id = b'{"model": "gpt-4o-mini", "input": [{"role": "user", "content": "x", "id": "a\\u0000"}]}'
    status, answer, _ = await gw.post("/v1/responses", key, nul_id)
    assert status == 200, answer
    status, page = await gw.get(f"/v1/responses/{answer['id']}/input_items", key)
    assert status == 200 and [i["id"] for i in page["data"]] == ["msg_" + answer["id"][5:] + "_in0"]


async def test_the_store_keeps_the_upstream_id_and_channel_for_a_native_follow_up(gw: Gw) -> None:
    account_id, _ = await gw.account()
    store = ConversationStore(gw.gateway.pool)
    history = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    await store.save("resp_native", account_id, history, response={"id": "resp_native", "object": "response"},
                     input_items=input_items("hi", "resp_native"), upstream_response_id="resp_up_1",
                     channel_id="openai-direct")
    await store.save("resp_legacy", account_id, history)  # the old call: follow-ups only, no views
    turn = await store.load_turn("resp_native", account_id)
    assert (turn.history, turn.upstream_response_id, turn.channel_id) == (history, "resp_up_1", "openai-direct")
    legacy = await store.load_turn("resp_legacy", account_id)
    assert (legacy.upstream_response_id, legacy.channel_id) == (None, None) and legacy.history == history
    assert orjson.loads(await store.response("resp_native", account_id)) == {"id": "resp_native",
                                                                              "object": "response"}
    with pytest.raises(Exception) as caught:
        await store.response("resp_legacy", account_id)
    assert getattr(caught.value, "status", None) == 404
    page = await store.items("resp_native", account_id, limit=5)
    assert [item_id for item_id, _ in page.items] == ["msg_native_in0"] and not page.has_more


async def _delete(gw: Gw, key: str, response_id: str) -> tuple[int, Any]:
    async with gw.session.delete(f"{gw.url}/v1/responses/{response_id}",
                                 headers={"authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


async def _raw_stream(gw: Gw, key: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The data of every SSE event of a streamed POST /v1/responses, as sent."""
    async with gw.session.post(f"{gw.url}/v1/responses", json=body, headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        text = await r.read()
    return [orjson.loads(line[6:]) for line in text.split(b"\n") if line.startswith(b"data: ")]


def _text(item: Any) -> str:
    """The text of an input message item's first content part."""
    return str(item.content[0].text)
