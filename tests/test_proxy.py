"""The proxy path end to end: the official SDK → gateway → simulated upstream, on a real ledger."""

from __future__ import annotations

import openai
import pytest

from tokensforge.mock_upstream import prompt_tokens
from tokensforge.money import charge_nanos, usd
from decimal import Decimal

from .harness import Gw, UPSTREAM_SECRET

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the ledger."}]


def expected_charge(prompt: int, completion: int, input_price: str, output_price: str) -> int:
    return charge_nanos(prompt, completion, Decimal(input_price), Decimal(output_price))


async def test_non_streamed_chat_receipt_matches_prices_usage_ledger_and_balance(gw: Gw) -> None:
    _, key = await gw.account(credit=1_000_000_000, routed=1_000_000_000)
    client = gw.client(key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=7)
    completion = raw.parse()
    receipt = completion.model_extra["receipt"]
    prompt = prompt_tokens(MESSAGES)
    assert completion.usage.prompt_tokens == prompt and completion.usage.completion_tokens == 7
    charge = expected_charge(prompt, 7, "0.15", "0.60")
    assert receipt["charge_nanos"] == charge and receipt["charge_usd"] == usd(charge)
    assert receipt["route"] == {"id": "gpt-4o-mini/official", "kind": "official"}
    assert receipt["bucket"] == "credit" and receipt["upstream_model"] == "up-official"
    assert receipt["price"] == {"input_per_mtok": "0.15", "output_per_mtok": "0.60", "cache_read_per_mtok": "0.15",
                                "cache_write_per_mtok": "0.15", "cache_write_1h_per_mtok": "0.15",
                                "rounding": "half_up_nano"}  # the test catalog prices no cache class
    assert receipt["cost_lines"] == [
        {"class": "input", "tokens": prompt, "per_mtok": "0.15", "nanos": prompt * 150},
        {"class": "output", "tokens": 7, "per_mtok": "0.60", "nanos": 7 * 600}]
    assert receipt["channels"] == {"primary": "official-a", "backups": [], "served_by": "official-a"}
    assert receipt["attempts"][0]["outcome"] == "ok" and len(receipt["attempts"]) == 1
    assert receipt["fallback"] == {"used": False, "cross_route": False, "from_route": None}
    assert receipt["status"] == "succeeded" and receipt["usage_source"] == "upstream"
    assert receipt["reserved_nanos"] >= charge
    assert receipt["balance_after_nanos"] == 1_000_000_000 - charge
    headers = raw.headers
    assert headers["x-request-id"] == receipt["request_id"]
    assert headers["x-tokensforge-route"] == "gpt-4o-mini/official"
    assert headers["x-tokensforge-route-kind"] == "official"
    assert headers["x-tokensforge-bucket"] == "credit"
    assert headers["x-tokensforge-upstream-model"] == "up-official"
    assert headers["x-tokensforge-channel"] == "official-a"
    assert headers["x-tokensforge-fallback"] == "none"
    assert headers["x-tokensforge-charge-nanos"] == str(charge)
    assert headers["x-tokensforge-ledger-entry"] == receipt["ledger_entry_id"]
    assert int(headers["x-tokensforge-reserved-nanos"]) == receipt["reserved_nanos"]

    _, stored = await gw.get(f"/v1/receipts/{receipt['request_id']}", key)
    assert {k: stored[k] for k in receipt} == receipt
    _, usage = await gw.get("/v1/usage", key)
    assert usage["data"][0]["request_id"] == receipt["request_id"]
    assert usage["data"][0]["charge_nanos"] == charge and "created_at" in usage["data"][0]
    _, ledger = await gw.get("/v1/ledger", key)
    entry = ledger["data"][0]
    assert entry["id"] == receipt["ledger_entry_id"] and entry["kind"] == "charge"
    assert entry["amount_nanos"] == -charge and entry["request_id"] == receipt["request_id"]
    assert entry["balance_after_nanos"] == receipt["balance_after_nanos"]
    balances = await gw.balances(key)
    assert balances["credit"]["balance_nanos"] == 1_000_000_000 - charge
    assert balances["credit"]["reserved_nanos"] == 0
    assert balances["routed"]["balance_nanos"] == 1_000_000_000  # the other bucket did not move
    last = (await gw.mock.stats())["last_request"]
    assert last["headers"]["authorization"] == f"Bearer {UPSTREAM_SECRET}"  # the channel's secret
    assert last["body"]["model"] == "up-official"


async def test_unknown_fields_are_forwarded_and_route_field_is_not(gw: Gw) -> None:
    _, key = await gw.account(routed=10**9)
    client = gw.client(key)
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=2,
        extra_body={"route": "routed", "x_vendor_knob": {"a": 1}, "temperature": 0.2})
    body = (await gw.mock.stats())["last_request"]["body"]
    assert body["x_vendor_knob"] == {"a": 1} and body["temperature"] == 0.2
    assert "route" not in body and body["model"] == "up-relay-a"


async def test_streamed_chat_with_include_usage_carries_receipt_on_usage_chunk(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    client = gw.client(key)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-tokensforge-route": "routed"})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 5
    receipt = final.model_extra["receipt"]
    prompt = prompt_tokens(MESSAGES)
    charge = expected_charge(prompt, 5, "0.06", "0.24")
    assert receipt["charge_nanos"] == charge and receipt["bucket"] == "routed"
    assert receipt["route"]["kind"] == "routed" and receipt["channels"]["served_by"] == "relay-a"
    _, stored = await gw.get(f"/v1/receipts/{receipt['request_id']}", key)
    assert stored["ledger_entry_id"] == receipt["ledger_entry_id"] and stored["charge_nanos"] == charge
    balances = await gw.balances(key)
    assert balances["routed"]["balance_nanos"] == 10**9 - charge
    assert balances["credit"]["balance_nanos"] == 10**9


async def test_streamed_chat_without_include_usage_has_no_usage_chunk_but_is_billed(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    client = gw.client(key)
    async with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=4, stream=True) as response:
        request_id = response.headers["x-request-id"]
        chunks = [chunk async for chunk in await response.parse()]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert (await gw.mock.stats())["last_request"]["body"]["stream_options"] == {"include_usage": True}
    _, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
    assert receipt["charge_nanos"] == expected_charge(prompt_tokens(MESSAGES), 4, "0.15", "0.60")
    assert receipt["usage_source"] == "upstream"


async def test_stream_without_upstream_usage_is_estimated_and_marked(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    await gw.mock.faults(**{"up-official": {"no_usage": True}})
    client = gw.client(key)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    receipt = chunks[-1].model_extra["receipt"]
    assert receipt["usage_source"] == "estimated"
    assert receipt["usage"]["completion_tokens"] == 6  # one token per content chunk delivered
    assert receipt["charge_nanos"] == expected_charge(receipt["usage"]["prompt_tokens"], 6, "0.15", "0.60")


async def test_embeddings_with_sdk_default_encoding(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    client = gw.client(key)
    raw = await client.embeddings.with_raw_response.create(model="embed-small", input=["hello world", "ledger"])
    result = raw.parse()
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    assert all(isinstance(x, float) for x in result.data[0].embedding)
    assert (await gw.mock.stats())["last_request"]["body"]["encoding_format"] == "base64"
    tokens = result.usage.prompt_tokens
    charge = expected_charge(tokens, 0, "0.02", "0")
    assert raw.headers["x-tokensforge-charge-nanos"] == str(charge)
    _, receipt = await gw.get(f"/v1/receipts/{raw.headers['x-request-id']}", key)
    assert receipt["charge_nanos"] == charge and receipt["endpoint"] == "embeddings"
    plain = await client.embeddings.create(model="embed-small", input="x", encoding_format="float")
    assert len(plain.data[0].embedding) == 8


async def test_fine_price_is_rounded_half_up_once_per_request(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    client = gw.client(key)
    messages = [{"role": "user", "content": "hi"}]
    completion = await client.chat.completions.create(model="fine-price", messages=messages, max_tokens=1)
    receipt = completion.model_extra["receipt"]
    prompt = completion.usage.prompt_tokens
    exact = prompt * Decimal("1.5") + 1 * Decimal("2.5")
    assert receipt["charge_nanos"] == int(exact.quantize(Decimal(1), rounding="ROUND_HALF_UP"))


@pytest.mark.parametrize("pin", ["header-id", "header-kind", "body-id", "body-kind"])
async def test_route_pinning_charges_only_the_pinned_bucket(gw: Gw, pin: str) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    client = gw.client(key)
    value = "gpt-4o-mini/routed" if pin.endswith("id") else "routed"
    kwargs = {"extra_headers": {"x-tokensforge-route": value}} if pin.startswith("header") else {
        "extra_body": {"route": value}}
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3, **kwargs)
    receipt = completion.model_extra["receipt"]
    assert receipt["bucket"] == "routed" and receipt["route"]["id"] == "gpt-4o-mini/routed"
    balances = await gw.balances(key)
    assert balances["routed"]["balance_nanos"] == 10**9 - receipt["charge_nanos"]
    assert balances["credit"]["balance_nanos"] == 10**9


async def test_official_route_charges_credit_and_never_routed(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    completion = await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert completion.model_extra["receipt"]["bucket"] == "credit"
    balances = await gw.balances(key)
    assert balances["credit"]["balance_nanos"] < 10**9 and balances["routed"]["balance_nanos"] == 10**9


async def test_models_list_and_get_show_routes_filtered_by_policy(gw: Gw) -> None:
    _, key = await gw.account(policy={"allowed_route_kinds": ["routed"], "allowed_models": ["gpt-4o-mini"]})
    client = gw.client(key)
    models = await client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["gpt-4o-mini"]
    routes = models.data[0].model_extra["routes"]
    assert [r["id"] for r in routes] == ["gpt-4o-mini/routed"]
    assert routes[0]["channels"] == {"primary": "relay-a", "backups": ["relay-b"]}
    assert routes[0]["input_price_per_mtok"] == "0.06" and routes[0]["healthy"] is True
    one = await client.models.retrieve("gpt-4o-mini")
    assert one.id == "gpt-4o-mini" and one.model_extra["routes"] == routes
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("embed-small")


async def test_quote_shows_route_bucket_prices_reservation_and_availability(gw: Gw) -> None:
    _, key = await gw.account(credit=5_000, routed=10**9)
    status, quote, _ = await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                        "max_tokens": 100})
    assert status == 200
    assert quote["route"] == {"id": "gpt-4o-mini/official", "kind": "official"} and quote["bucket"] == "credit"
    assert quote["reserve_nanos"] > 5_000 and quote["available_nanos"] == 5_000
    assert quote["allowed"] is False and "credit" in quote["reason"]
    assert quote["channels"] == {"primary": "official-a", "backups": []}
    assert quote["retry"]["max_attempts"] == 2 and quote["on_failure"] == "free"
    status, routed, _ = await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                         "max_tokens": 100, "route": "routed"})
    assert routed["bucket"] == "routed" and routed["allowed"] is True
    # the quote reserves exactly what the real request then reserves
    completion = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=100, extra_body={"route": "routed"})
    assert completion.model_extra["receipt"]["reserved_nanos"] == routed["reserve_nanos"]
    assert (await gw.balances(key))["credit"]["balance_nanos"] == 5_000


async def test_usage_and_ledger_paginate_and_filter(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    client = gw.client(key)
    for i in range(5):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1,
                                             extra_body={"route": "routed" if i % 2 else "official"})
    status, page1 = await gw.get("/v1/usage?limit=2", key)
    assert status == 200 and len(page1["data"]) == 2 and page1["has_more"] is True
    _, page2 = await gw.get(f"/v1/usage?limit=2&after={page1['next_cursor']}", key)
    _, page3 = await gw.get(f"/v1/usage?limit=2&after={page2['next_cursor']}", key)
    ids = [r["request_id"] for r in page1["data"] + page2["data"] + page3["data"]]
    assert len(set(ids)) == 5 and page3["has_more"] is False and page3["next_cursor"] is None
    _, routed = await gw.get("/v1/usage?route_kind=routed", key)
    assert len(routed["data"]) == 2 and all(r["bucket"] == "routed" for r in routed["data"])
    _, ledger = await gw.get("/v1/ledger?bucket=credit", key)
    kinds = [e["kind"] for e in ledger["data"]]
    assert kinds == ["charge", "charge", "charge", "topup"]
    status, bad = await gw.get("/v1/usage?after=xyz", key)
    assert status == 400 and bad["error"]["code"] == "invalid_request"
