"""Leases across real gateway processes: two instances × four workers on one tight account, budgets,
and a process SIGKILLed while it holds a lease with a stream in flight."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import asyncpg
import openai
import orjson

from .harness import Gw, write_catalog
from .invariants import assert_ledger_invariants
from .procs import GatewayProcess

MESSAGES = [{"role": "user", "content": "hello there"}]
FAST_LEASES = {"TOKENSFORGE_LEASE_IDLE_S": "0.5", "TOKENSFORGE_SWEEP_INTERVAL_S": "0.2"}


async def test_eight_processes_never_overspend_a_tight_account_or_a_budget(dsn: str, gw: Gw, tmp_path: Path) -> None:
    _, probe = await gw.account(routed=10**9)
    _, quote, _ = await gw.post("/v1/quote", probe, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                     "max_tokens": 10, "route": "routed"})
    reserve = quote["reserve_nanos"]
    funding = 60 * reserve
    tight_account, tight = await gw.account(routed=funding)
    budget = 20 * reserve
    _, budgeted = await gw.account(routed=10**12, policy={"budget_nanos": budget, "budget_period": "total"})
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    with GatewayProcess(catalog, dsn=dsn, workers=4, env=FAST_LEASES) as a, \
            GatewayProcess(catalog, dsn=dsn, workers=4, env=FAST_LEASES) as b:
        clients = {k: [openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=k, max_retries=0) for s in (a, b)]
                   for k in (tight, budgeted)}

        async def one(key: str, i: int) -> int:
            try:
                completion = await clients[key][i % 2].chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, extra_body={"route": "routed"})
                return int(completion.model_extra["receipt"]["charge_nanos"])
            except openai.APIStatusError as exc:
                error = exc.response.json()["error"]
                if key == tight:  # genuine: after giving back, the database could not cover it
                    assert exc.status_code == 402, error
                    assert error["available_nanos"] < error["needed_nanos"] == reserve, error
                else:
                    assert exc.status_code == 403 and error["code"] == "budget_exceeded", error
                return -1

        sem = asyncio.Semaphore(48)

        async def paced(key: str, i: int) -> int:
            async with sem:
                return await one(key, i)

        results = await asyncio.gather(*(paced(key, i) for i in range(160) for key in (tight, budgeted)))
        tight_spent = sum(r for i, r in enumerate(results) if i % 2 == 0 and r > 0)
        budget_spent = sum(r for i, r in enumerate(results) if i % 2 == 1 and r > 0)
        assert 0 < tight_spent <= funding and 0 < budget_spent <= budget
        assert -1 in results[0::2] and -1 in results[1::2]
        balances = await gw.balances(tight)
        assert balances["routed"]["balance_nanos"] == funding - tight_spent
        # every refusal came when the rest could not be spent: what is left is under one request
        # plus what the other processes still held for requests in flight when it was refused
        conn = await asyncpg.connect(dsn)
        try:
            leased = await conn.fetch(
                "SELECT DISTINCT r.holder FROM usage_records u JOIN reservations r ON r.id = u.lease_id"
                " WHERE u.account_id = $1", tight_account)
            assert len(leased) >= 2, "the processes did not hold leases"
            spent = await conn.fetchval("SELECT spent_nanos FROM budgets WHERE scope LIKE 'key:%'"
                                        " ORDER BY spent_nanos DESC LIMIT 1")
            assert spent == budget_spent <= budget
            for _ in range(50):  # idle leases go back within lease_idle_s
                held = await conn.fetch("SELECT id, kind, holder, amount_nanos FROM reservations"
                                        " WHERE status = 'open'")
                if not held:
                    break
                await asyncio.sleep(0.1)
            assert not held, ([dict(r) for r in held], a.log()[-3000:], b.log()[-3000:])
            await assert_ledger_invariants(conn)
        finally:
            await conn.close()
        left = funding - tight_spent
        # with everything given back, a request that fits is served, and one that does not is refused
        if left >= reserve:
            assert await one(tight, 0) > 0
        else:
            assert await one(tight, 1) == -1
        for pair in clients.values():
            for client in pair:
                await client.close()


async def test_a_killed_process_leaves_its_lease_to_the_sweeper_and_the_stream_a_gateway_lost_record(
        dsn: str, gw: Gw, tmp_path: Path) -> None:
    """SPEC §5.9: the x-request-id the client saw has a usage record, `failed` / `gateway_lost`, charged 0."""
    account_id, key = await gw.account(credit=10**9)
    await gw.mock.faults(**{"up-official": {"chunk_delay_ms": 200}})
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    # a settled request first: what was posted before the crash stays posted
    with GatewayProcess(catalog, dsn=dsn, env={"TOKENSFORGE_LEASE_TTL_S": "1.5"}) as victim:
        async with openai.AsyncOpenAI(base_url=victim.url + "/v1", api_key=key, max_retries=0) as client:
            done = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
        charged = int(done.model_extra["receipt"]["charge_nanos"])
        async with aiohttp.ClientSession() as session:
            response = await session.post(victim.url + "/v1/chat/completions", headers={
                "authorization": f"Bearer {key}"}, data=orjson.dumps({
                    "model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50, "stream": True}))
            request_id = response.headers["x-request-id"]
            async for line in response.content:
                if b"lorem" in line:
                    break  # content reached the client
            victim.stop(signal.SIGKILL)
            response.close()
    conn = await asyncpg.connect(dsn)
    try:
        lease = await conn.fetchrow("SELECT id, status, amount_nanos FROM reservations WHERE kind = 'lease'"
                                    " AND account_id = $1", account_id)
        assert lease["status"] == "open" and lease["amount_nanos"] > 0
        assert await conn.fetchval("SELECT count(*) FROM reservations WHERE request_id = $1", request_id) == 0
        # the stream was made durable as it started, without a row of its own holding money
        traced = await conn.fetchval("SELECT lease_id FROM stream_traces WHERE request_id = $1", request_id)
        assert traced == lease["id"]
        # no gateway is left to sweep: a new one starts; its sweeper voids the lease after the TTL and then
        # records the lost stream
        with GatewayProcess(catalog, dsn=dsn, env={"TOKENSFORGE_TRACE_GRACE_S": "0"}):
            for _ in range(80):
                status = await conn.fetchval("SELECT status FROM reservations WHERE id = $1", lease["id"])
                record = await conn.fetchrow("SELECT status, charge_nanos, receipt FROM usage_records"
                                             " WHERE request_id = $1", request_id)
                if status != "open" and record is not None:
                    break
                await asyncio.sleep(0.1)
        assert status == "expired"
        assert record is not None, "the stream the client saw has no usage record"
        assert (record["status"], record["charge_nanos"]) == ("failed", 0)
        assert orjson.loads(record["receipt"])["error"]["code"] == "gateway_lost"
        assert await conn.fetchval("SELECT count(*) FROM stream_traces") == 0
        await assert_ledger_invariants(conn)
    finally:
        await conn.close()
    status_code, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
    assert status_code == 200, receipt
    assert receipt["status"] == "failed" and receipt["charge_nanos"] == 0 and receipt["error"]["code"] == "gateway_lost"
    assert receipt["request_id"] == request_id and receipt["account_id"] == account_id
    balances = await gw.balances(key)
    assert balances["credit"]["reserved_nanos"] == 0 and balances["credit"]["leased_nanos"] == 0
    assert balances["credit"]["balance_nanos"] == 10**9 - charged
