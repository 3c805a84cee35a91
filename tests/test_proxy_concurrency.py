"""No overspend under concurrency, through the whole proxy (SPEC §5.1, §5.4)."""

from __future__ import annotations

import asyncio

import openai

from .harness import Gw
from .invariants import assert_ledger_invariants

MESSAGES = [{"role": "user", "content": "count to twenty"}]


async def test_200_concurrent_streams_against_a_bucket_that_covers_20(gw: Gw) -> None:
    _, probe_key = await gw.account(routed=10**9)
    _, quote, _ = await gw.post("/v1/quote", probe_key, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                         "max_tokens": 20, "route": "routed"})
    funding = 20 * quote["reserve_nanos"]
    _, key = await gw.account(routed=funding, credit=10**9)
    await gw.mock.faults(**{"up-relay-a": {"chunk_delay_ms": 5}})
    client = gw.client(key, timeout=60)

    async def one() -> tuple[str, int]:
        try:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True,
                stream_options={"include_usage": True}, extra_body={"route": "routed"})
            chunks = [c async for c in stream]
            return "ok", chunks[-1].model_extra["receipt"]["charge_nanos"]
        except openai.APIStatusError as exc:
            assert exc.status_code == 402, exc
            error = exc.response.json()["error"]
            assert error["bucket"] == "routed" and error["needed_nanos"] == quote["reserve_nanos"]
            assert error["available_nanos"] < error["needed_nanos"]
            return "402", 0

    results = await asyncio.gather(*(one() for _ in range(200)))
    served = [charge for outcome, charge in results if outcome == "ok"]
    assert len(served) >= 20 and any(outcome == "402" for outcome, _ in results)
    balances = await gw.balances(key)
    assert balances["routed"]["balance_nanos"] == funding - sum(served) >= 0
    assert balances["routed"]["reserved_nanos"] == 0
    assert balances["credit"]["balance_nanos"] == 10**9  # never paid for the routed bucket
    await assert_ledger_invariants(gw.dsn)


async def test_a_key_budget_is_never_exceeded_under_concurrency(gw: Gw) -> None:
    budget = 30_000
    account_id, key = await gw.account(credit=10**9, policy={"budget_nanos": budget, "budget_period": "day"})
    client = gw.client(key, timeout=60)

    async def one() -> int:
        try:
            completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
            return int(completion.model_extra["receipt"]["charge_nanos"])
        except openai.PermissionDeniedError as exc:
            assert exc.response.json()["error"]["code"] == "budget_exceeded"
            return 0

    spent = sum(await asyncio.gather(*(one() for _ in range(60))))
    assert 0 < spent <= budget
    balances = await gw.balances(key)
    assert balances["credit"]["balance_nanos"] == 10**9 - spent
    await assert_ledger_invariants(gw.dsn)
