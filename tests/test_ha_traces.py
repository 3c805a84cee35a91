"""No lost traces (SPEC §5.9, 0009_stream_traces.sql): what the sweeper does with a stream's trace.

The process-level test (a gateway SIGKILLed mid-stream) is in tests/test_leases_processes.py; these
pin the rules on one gateway: a stream that settles leaves no trace behind and one usage record; a
trace is recorded only once its lease has ended and the grace has passed, as `failed` /
`gateway_lost`, charged 0; a settlement that comes first wins.
"""

from __future__ import annotations

import asyncio

import asyncpg
import orjson

from .harness import Gw

MESSAGES = [{"role": "user", "content": "hello there"}]


async def test_a_settled_stream_leaves_one_usage_record_and_no_trace(gw: Gw) -> None:
    account_id, key = await gw.account(credit=10**9)
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True})
    request_id = stream.response.headers["x-request-id"]
    receipt = None
    async for chunk in stream:
        if not chunk.choices and chunk.model_extra and "receipt" in chunk.model_extra:
            receipt = chunk.model_extra["receipt"]
    assert receipt is not None and receipt["status"] == "succeeded" and receipt["charge_nanos"] > 0
    conn = await asyncpg.connect(gw.dsn)
    try:
        # it was carved from a lease, so it was traced as it started (unless its settlement came first)
        assert await conn.fetchval("SELECT lease_id IS NOT NULL FROM usage_records WHERE request_id = $1",
                                   request_id)
        for _ in range(50):  # the sweeper (every 0.2 s here) forgets the traces of settled requests
            if not await conn.fetchval("SELECT count(*) FROM stream_traces"):
                break
            await asyncio.sleep(0.1)
        assert await conn.fetchval("SELECT count(*) FROM stream_traces") == 0
        rows = await conn.fetch("SELECT status, charge_nanos FROM usage_records WHERE request_id = $1", request_id)
        assert [(r["status"], r["charge_nanos"]) for r in rows] == [("succeeded", receipt["charge_nanos"])]
    finally:
        await conn.close()


async def test_a_trace_is_recorded_as_gateway_lost_only_after_its_lease_ended_and_the_grace(gw: Gw) -> None:
    account_id, key = await gw.account(credit=10**9)
    store = gw.gateway.ledger
    grant = await store.lease_grow("lease_test_traces", "a-dead-process", account_id, "credit", want_nanos=10**6,
                                   min_nanos=10**5, fraction_ppm=500_000, ttl_s=600)
    assert grant.outcome == "ok"
    lost, settled = "req_lost_trace_0001", "req_settled_trace_01"
    base = {"object": "receipt", "status": None, "account_id": account_id, "key_id": None, "project_id": None,
            "selected_model": "gpt-4o-mini", "route": {"id": "official", "kind": "official"}, "bucket": "credit",
            "reserved_nanos": 10**5, "charge_nanos": 0, "attempts": []}
    await asyncio.gather(store.trace("lease_test_traces", {**base, "request_id": lost}),
                         store.trace("lease_test_traces", {**base, "request_id": settled}))
    # the second request settles (its usage record), the first never does
    await store.lease_finish("lease_test_traces", settled, 0, {**base, "request_id": settled, "status": "succeeded"})
    conn = await asyncpg.connect(gw.dsn)
    try:
        assert await store.close_lost(0) == 0  # the lease is open: its holder may still settle
        assert await conn.fetchval("SELECT count(*) FROM stream_traces") == 1  # the settled one is forgotten
        await store.lease_return({"lease_test_traces": 2**63 - 1}, close=True)  # the lease ends
        assert await store.close_lost(3600) == 0  # within the grace: a settlement being retried could still come
        assert await store.close_lost(0) == 1
        assert await store.close_lost(0) == 0  # once
        rows = await conn.fetch("SELECT request_id, status, charge_nanos, ledger_entry_id, receipt FROM usage_records"
                                " WHERE request_id = ANY($1::text[]) ORDER BY request_id", [lost, settled])
        assert [(r["request_id"], r["status"], r["charge_nanos"], r["ledger_entry_id"]) for r in rows] == [
            (lost, "failed", 0, None), (settled, "succeeded", 0, None)]
        receipt = orjson.loads(rows[0]["receipt"])
        assert receipt["error"]["code"] == "gateway_lost" and receipt["charge_usd"] == "0.000000000"
        assert await conn.fetchval("SELECT count(*) FROM stream_traces") == 0
        # a trace that arrives after its request's record writes nothing
        await store.trace("lease_test_traces", {**base, "request_id": settled})
        assert await conn.fetchval("SELECT count(*) FROM stream_traces") == 0
    finally:
        await conn.close()
    status, body = await gw.get(f"/v1/receipts/{lost}", key)
    assert status == 200 and body["status"] == "failed" and body["error"]["code"] == "gateway_lost", body
    credit = (await gw.balances(key))["credit"]
    assert (credit["balance_nanos"], credit["reserved_nanos"], credit["leased_nanos"]) == (10**9, 0, 0)
