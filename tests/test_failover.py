"""One test per failure class (SPEC §1 retry/fallback and failure-charge policy).

Each asserts the HTTP answer, the receipt's attempts and fallback, the charge,
the ledger and the metric counters. The simulated upstream injects the faults.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import aiohttp
import openai
import orjson
import pytest

from tokensforge.mock_upstream import prompt_tokens
from tokensforge.money import charge_nanos

from .harness import Gw

MESSAGES = [{"role": "user", "content": "tell me about ledgers"}]
FUNDS = {"credit": 10**9, "routed": 10**9}
ATTEMPTS = "tokensforge_upstream_attempts_total"


def outcomes(receipt: dict) -> list[tuple[str, str]]:
    return [(a["channel"], a["outcome"]) for a in receipt["attempts"]]


async def balances(gw: Gw, key: str) -> dict[str, int]:
    return {b: v["balance_nanos"] for b, v in (await gw.balances(key)).items()}


async def test_connect_refused_fails_over_to_the_backup_channel(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    before = await gw.counter(ATTEMPTS, channel="dead", outcome="connect")
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="flaky-chain", messages=MESSAGES, max_tokens=3, extra_body={"route": "routed"})
    receipt = raw.parse().model_extra["receipt"]
    assert outcomes(receipt) == [("dead", "connect"), ("relay-b", "ok")]
    assert receipt["fallback"] == {"used": True, "cross_route": False, "from_route": None}
    assert receipt["channels"]["served_by"] == "relay-b" and raw.headers["x-tokensforge-fallback"] == "channel"
    assert receipt["charge_nanos"] == charge_nanos(prompt_tokens(MESSAGES), 3, Decimal("0.06"), Decimal("0.24"))
    assert (await balances(gw, key))["routed"] == 10**9 - receipt["charge_nanos"]
    assert await gw.counter(ATTEMPTS, channel="dead", outcome="connect") == before + 1
    assert await gw.counter("tokensforge_fallbacks_total", kind="channel") >= 1


async def test_timeout_fails_over_to_the_backup_channel(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-tc-quick": {"latency_ms": 2000}})
    before = await gw.counter(ATTEMPTS, channel="official-quick", outcome="timeout")
    completion = await gw.client(key).chat.completions.create(model="timeout-chain", messages=MESSAGES, max_tokens=2)
    receipt = completion.model_extra["receipt"]
    assert outcomes(receipt) == [("official-quick", "timeout"), ("relay-b", "ok")]
    assert receipt["attempts"][0]["latency_ms"] >= 350
    assert receipt["charge_nanos"] > 0 and receipt["status"] == "succeeded"
    assert await gw.counter(ATTEMPTS, channel="official-quick", outcome="timeout") == before + 1


async def test_5xx_fails_over_and_the_receipt_lists_every_attempt(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-relay-a": {"error_status": 502}})
    before = await gw.counter(ATTEMPTS, channel="relay-a", outcome="5xx")
    completion = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=2, extra_body={"route": "routed"})
    receipt = completion.model_extra["receipt"]
    assert outcomes(receipt) == [("relay-a", "5xx"), ("relay-b", "ok")]
    assert receipt["attempts"][0]["status"] == 502 and receipt["upstream_model"] == "up-relay-b"
    assert await gw.counter(ATTEMPTS, channel="relay-a", outcome="5xx") == before + 1
    _, ledger = await gw.get("/v1/ledger?bucket=routed", key)
    assert ledger["data"][0]["id"] == receipt["ledger_entry_id"]


async def test_429_retry_after_is_honoured_on_the_same_channel(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"error_status": 429, "retry_after_s": 1}})
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
    assert time.monotonic() - started >= 1.0  # waited as the upstream asked before the second attempt
    assert info.value.response.headers["retry-after"] == "1"
    _, usage = await gw.get("/v1/usage", key)
    assert outcomes(usage["data"][0]) == [("official-a", "429"), ("official-a", "429")]
    assert await balances(gw, key) == FUNDS
    # another channel need not wait: relay-a's 429 goes straight to relay-b
    await gw.mock.faults(**{"up-relay-a": {"error_status": 429, "retry_after_s": 30}})
    started = time.monotonic()
    completion = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=2, extra_body={"route": "routed"})
    assert time.monotonic() - started < 5
    assert outcomes(completion.model_extra["receipt"]) == [("relay-a", "429"), ("relay-b", "ok")]


async def test_malformed_upstream_json_is_retried_on_the_backup(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-relay-a": {"malformed_json": True}})
    before = await gw.counter(ATTEMPTS, channel="relay-a", outcome="malformed")
    completion = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=2, extra_body={"route": "routed"})
    assert outcomes(completion.model_extra["receipt"]) == [("relay-a", "malformed"), ("relay-b", "ok")]
    assert await gw.counter(ATTEMPTS, channel="relay-a", outcome="malformed") == before + 1


async def test_malformed_json_on_every_channel_is_a_502_and_free(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"malformed_json": True}})
    with pytest.raises(openai.InternalServerError) as info:
        await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 502
    assert await balances(gw, key) == FUNDS


@pytest.mark.parametrize("route,policy", [("routed", "charge_delivered"), ("official", "free")])
async def test_stream_cut_after_n_chunks_is_billed_by_the_failure_policy(gw: Gw, route: str, policy: str) -> None:
    _, key = await gw.account(**FUNDS)
    upstream = "up-relay-a" if route == "routed" else "up-official"
    await gw.mock.faults(**{upstream: {"cut_after_chunks": 3}})
    client = gw.client(key)
    received: list[str] = []
    async with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=True,
            stream_options={"include_usage": True}, extra_body={"route": route}) as response:
        request_id = response.headers["x-request-id"]
        with pytest.raises(openai.APIError) as info:
            async for chunk in await response.parse():
                received.extend(c.delta.content for c in chunk.choices if c.delta.content)
    assert len(received) == 3 and "stream" in str(info.value.message)
    _, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
    assert receipt["status"] == "failed" and receipt["on_failure"] == policy
    assert receipt["attempts"] == [dict(receipt["attempts"][0], outcome="ok")]  # no retry once bytes were sent
    prices = {"routed": ("0.06", "0.24"), "official": ("0.15", "0.60")}[route]
    expected = charge_nanos(prompt_tokens(MESSAGES), 3, *map(Decimal, prices)) if policy == "charge_delivered" else 0
    assert receipt["charge_nanos"] == expected
    assert (receipt["ledger_entry_id"] is None) == (expected == 0)
    bucket = "routed" if route == "routed" else "credit"
    assert (await balances(gw, key))[bucket] == 10**9 - expected


async def test_missing_usage_in_a_non_streamed_answer_is_estimated(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"no_usage": True}})
    completion = await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=4)
    receipt = completion.model_extra["receipt"]
    assert receipt["usage_source"] == "estimated" and receipt["usage"]["prompt_tokens"] == prompt_tokens(MESSAGES)
    assert 0 < receipt["charge_nanos"] <= receipt["reserved_nanos"]


@pytest.mark.parametrize("route,prices", [("routed", ("0.06", "0.24")), ("official", ("0.15", "0.60"))])
async def test_client_disconnect_mid_stream_cancels_upstream_and_bills_what_was_delivered(
        gw: Gw, route: str, prices: tuple[str, str]) -> None:
    """SPEC §1: a client that leaves after content reached it pays input + delivered output on every
    route, `free` ones included (the upstream billed for what it generated)."""
    _, key = await gw.account(**FUNDS)
    upstream = "up-relay-a" if route == "routed" else "up-official"
    await gw.mock.faults(**{upstream: {"chunk_delay_ms": 100}})
    before = (await gw.mock.stats())["cancelled"]
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50, "stream": True, "route": route}
    async with aiohttp.ClientSession() as session:
        response = await session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body),
                                      headers={"authorization": f"Bearer {key}"})
        request_id = response.headers["x-request-id"]
        events = 0
        async for line in response.content:
            if line.startswith(b"data:"):
                events += 1
            if events == 4:  # role chunk + 3 content chunks
                break
        response.close()  # the client goes away mid-stream
    receipt = None
    for _ in range(50):
        status, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert receipt is not None and receipt["status"] == "client_cancelled"
    assert (await gw.mock.stats())["cancelled"] == before + 1  # the upstream request was cut too
    delivered = receipt["usage"]["completion_tokens"]
    assert 3 <= delivered < 50
    assert receipt["charge_nanos"] == charge_nanos(prompt_tokens(MESSAGES), delivered,
                                                   Decimal(prices[0]), Decimal(prices[1]))
    assert receipt["ledger_entry_id"] is not None
    _, usage = await gw.get("/v1/usage?status=client_cancelled", key)
    assert [r["request_id"] for r in usage["data"]] == [request_id]


async def test_all_channels_failing_walks_the_chain_then_502_free(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-relay-a": {"error_status": 500}, "up-relay-b": {"error_status": 503}})
    before = await gw.counter("tokensforge_requests_total", route_kind="routed", status="failed")
    with pytest.raises(openai.InternalServerError) as info:
        await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=2, extra_body={"route": "routed"})
    assert info.value.status_code == 502
    _, usage = await gw.get("/v1/usage", key)
    record = usage["data"][0]
    assert outcomes(record) == [("relay-a", "5xx"), ("relay-b", "5xx"), ("relay-a", "5xx")]
    assert record["charge_nanos"] == 0 and record["status"] == "failed"
    assert await balances(gw, key) == FUNDS
    assert await gw.counter("tokensforge_requests_total", route_kind="routed", status="failed") == before + 1


async def test_cross_route_fallback_when_allowed_charges_the_fallback_route(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS, policy={"allow_cross_route_fallback": True, "route_preference": ["routed"]})
    await gw.mock.faults(**{"up-chain-b": {"error_status": 500}})
    before = await gw.counter("tokensforge_fallbacks_total", kind="route")
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="flaky-chain", messages=MESSAGES, max_tokens=2)
    receipt = raw.parse().model_extra["receipt"]
    assert receipt["fallback"] == {"used": True, "cross_route": True, "from_route": "flaky-chain/routed"}
    assert receipt["route"]["id"] == "flaky-chain/official" and receipt["bucket"] == "credit"
    assert raw.headers["x-tokensforge-fallback"] == "route" and raw.headers["x-tokensforge-bucket"] == "credit"
    assert [a["outcome"] for a in receipt["attempts"]] == ["connect", "5xx", "ok"]
    assert receipt["charge_nanos"] == charge_nanos(prompt_tokens(MESSAGES), 2, Decimal("0.15"), Decimal("0.60"))
    assert await balances(gw, key) == {"credit": 10**9 - receipt["charge_nanos"], "routed": 10**9}
    assert await gw.counter("tokensforge_fallbacks_total", kind="route") == before + 1


async def test_cross_route_fallback_refused_without_policy(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS, policy={"route_preference": ["routed"]})
    await gw.mock.faults(**{"up-chain-b": {"error_status": 500}})
    with pytest.raises(openai.InternalServerError):
        await gw.client(key).chat.completions.create(model="flaky-chain", messages=MESSAGES, max_tokens=2)
    _, usage = await gw.get("/v1/usage", key)
    assert usage["data"][0]["fallback"]["cross_route"] is False
    assert usage["data"][0]["route"]["id"] == "flaky-chain/routed"
    assert await balances(gw, key) == FUNDS  # the credit bucket was never touched


async def test_models_with_slash_and_colon_ids_are_reachable(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    model = await gw.client(key).models.retrieve("meta/llama-3:8b")
    assert model.id == "meta/llama-3:8b" and model.model_extra["routes"][0]["bucket"] == "routed"


async def test_client_giving_up_on_a_non_streamed_request_voids_it(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"latency_ms": 3000}})
    before = (await gw.mock.stats())["cancelled"]
    with pytest.raises(openai.APITimeoutError):
        await gw.client(key, timeout=0.5).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    record = None
    for _ in range(40):
        _, usage = await gw.get("/v1/usage", key)
        if usage["data"]:
            record = usage["data"][0]
            break
        await asyncio.sleep(0.05)
    assert record is not None and record["status"] == "client_cancelled" and record["charge_nanos"] == 0
    for _ in range(40):
        if (await gw.mock.stats())["cancelled"] == before + 1:
            break
        await asyncio.sleep(0.05)
    assert (await gw.mock.stats())["cancelled"] == before + 1  # the upstream call was cut, not left running
    assert await balances(gw, key) == FUNDS
    assert (await gw.balances(key))["credit"]["reserved_nanos"] == 0


async def test_upstream_4xx_is_the_request_s_fault_not_retried_and_keeps_the_circuit_closed(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"error_status": 400}})
    for _ in range(6):  # more than the breaker's threshold
        with pytest.raises(openai.BadRequestError) as info:
            await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
        assert "upstream rejected" in info.value.response.json()["error"]["message"]
    _, usage = await gw.get("/v1/usage", key)
    assert outcomes(usage["data"][0]) == [("official-a", "4xx")]  # not retried
    _, health = await gw.admin("GET", "/admin/routes/health")
    assert next(c for c in health["data"] if c["channel"] == "official-a")["state"] == "closed"
    assert await balances(gw, key) == FUNDS


async def test_a_channel_s_max_concurrency_covers_whole_streams(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-single": {"chunk_delay_ms": 40}})
    client = gw.client(key)
    peak = 0

    async def one() -> float:
        stream = await client.chat.completions.create(model="one-at-a-time", messages=MESSAGES, max_tokens=8,
                                                      stream=True)
        async for _ in stream:
            pass
        return time.monotonic()

    async def watch() -> None:
        nonlocal peak
        for _ in range(60):
            peak = max(peak, (await gw.mock.stats())["inflight"])
            await asyncio.sleep(0.02)

    started = time.monotonic()
    ends = await asyncio.gather(one(), one(), one(), watch())
    assert peak == 1  # max_concurrency = 1: the channel never saw two streams at once
    assert max(ends[:3]) - started >= 3 * 7 * 0.04 * 0.95  # they ran one after another (7 gaps each)
