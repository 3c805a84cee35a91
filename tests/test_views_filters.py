"""`GET /v1/usage`'s filters (SPEC §2): model, route kind, bucket, status, key, a time range, and any id
a client holds — asked with the official openai SDK's own ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from .harness import Gw


async def test_usage_is_found_by_any_id_a_client_holds(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    client = gw.client(key)
    chat = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    completion = chat.parse()
    response = await client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=16)
    status, message, _ = await gw.post("/v1/messages", key, {
        "model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, message
    assert completion.id.startswith("chatcmpl-") and response.id.startswith("resp_")
    assert message["id"].startswith("msg_")
    for answer_id in (completion.id, response.id, message["id"], chat.headers["x-request-id"]):
        status, found = await gw.get(f"/v1/usage?id={quote(answer_id)}", key)
        assert status == 200 and len(found["data"]) == 1, (answer_id, found)
        assert found["data"][0]["request_id"] == "req_" + answer_id.split("_", 1)[-1].split("-", 1)[-1]
    status, found = await gw.get(f"/v1/usage?id={completion.id}", key)
    assert found["data"][0]["request_id"] == chat.headers["x-request-id"]
    status, found = await gw.get("/v1/usage?id=chatcmpl-nothing", key)
    assert status == 200 and found["data"] == []


async def test_usage_filters_narrow_the_list(gw: Gw) -> None:
    account_id, key = await gw.account(credit=10**9, routed=10**9)
    status, second = await gw.admin("POST", f"/admin/accounts/{account_id}/keys", {"name": "b", "policy": {}})
    assert status == 201
    sent = []
    for k, route in ((key, "gpt-4o-mini/official"), (key, "gpt-4o-mini/routed"), (second["key"], "gpt-4o-mini/routed")):
        status, body, _ = await gw.post("/v1/chat/completions", k, {
            "model": "gpt-4o-mini", "route": route, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
        assert status == 200, body
        sent.append(body["receipt"])
    await gw.mock.faults(**{"up-relay-a": {"error_status": 500}, "up-relay-b": {"error_status": 500}})
    status, _, _ = await gw.post("/v1/chat/completions", key, {
        "model": "gpt-4o-mini", "route": "gpt-4o-mini/routed", "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}]})
    assert status == 502
    await gw.mock.reset()

    async def ids(query: str) -> list[str]:
        status, body = await gw.get("/v1/usage?" + query, key)
        assert status == 200, body
        return [r["request_id"] for r in body["data"]]

    everything = await ids("")
    assert len(everything) == 4
    failed = everything[0]
    assert await ids("route_kind=official") == [sent[0]["request_id"]]
    assert await ids("bucket=routed&status=succeeded") == [sent[2]["request_id"], sent[1]["request_id"]]
    assert await ids("status=failed") == [failed]
    assert await ids(f"key_id={second['id']}") == [sent[2]["request_id"]]
    assert await ids("model=gpt-4o-mini&route_kind=routed&status=succeeded&limit=1") == [sent[2]["request_id"]]
    assert await ids("model=nothing") == []
    now = datetime.now(UTC)
    assert len(await ids("since=" + quote((now - timedelta(minutes=5)).isoformat()))) == 4
    assert await ids("until=" + quote((now - timedelta(minutes=5)).isoformat())) == []
    assert await ids("since=" + quote((now + timedelta(minutes=5)).isoformat())) == []
    assert len(await ids("since=2000-01-01T00:00:00Z&until=2999-01-01T00:00:00Z")) == 4
    status, body = await gw.get("/v1/usage?since=yesterday", key)
    assert status == 400 and body["error"]["param"] == "since"
    async with gw.session.get(gw.url + f"/v1/usage?format=csv&id={sent[1]['request_id']}",
                              headers={"authorization": f"Bearer {key}"}) as r:
        lines = (await r.text()).splitlines()
    assert len(lines) == 2 and lines[1].startswith(sent[1]["request_id"] + ",")
