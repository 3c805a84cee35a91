"""Circuit breaking, database outages and crashes (SPEC §5.5): fail closed, recover, lose nothing."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import asyncpg
import openai
import orjson
import pytest

from tokensforge.db import migrate
from tokensforge.embedded_pg import EmbeddedPostgres

from .harness import Gw, Mock, gateway_of, gateway_settings, start_gateway, write_catalog
from .invariants import assert_ledger_invariants
from .procs import GatewayProcess

MESSAGES = [{"role": "user", "content": "hello"}]


async def test_circuit_opens_skips_probes_and_closes(dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    await mock_upstream.reset()
    settings = gateway_settings(write_catalog(tmp_path / "c.toml", mock_upstream.url),
                                breaker_failure_threshold=3, breaker_cooldown_s=0.5)
    ctx, url, app = await start_gateway(settings, dsn)
    async with ctx, aiohttp.ClientSession() as session:
        gw = Gw(url, dsn, gateway_of(app), mock_upstream, session)
        _, key = await gw.account(routed=10**9)
        client = gw.client(key)
        await mock_upstream.faults(**{"up-relay-a": {"error_status": 500}})
        for _ in range(3):  # relay-a fails, relay-b serves
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1,
                                                 extra_body={"route": "routed"})
        _, health = await gw.admin("GET", "/admin/routes/health")
        relay_a = next(c for c in health["data"] if c["channel"] == "relay-a")
        assert relay_a["state"] == "open" and relay_a["consecutive_failures"] == 3
        assert relay_a["last_error"] and "gpt-4o-mini/routed" in relay_a["routes"]
        assert await gw.counter("tokensforge_circuit_state", channel="relay-a") == 2
        assert await gw.counter("tokensforge_channel_up", channel="relay-a") == 0
        calls_before = (await mock_upstream.stats())["by_model"].get("up-relay-a", 0)
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1,
                                                          extra_body={"route": "routed"})
        receipt = completion.model_extra["receipt"]
        assert receipt["attempts"][0] == {"channel": "relay-a", "outcome": "skipped", "status": None,
                                          "latency_ms": 0, "skipped": "circuit_open"}
        assert receipt["channels"]["served_by"] == "relay-b"
        assert (await mock_upstream.stats())["by_model"].get("up-relay-a", 0) == calls_before  # not called
        models = await client.models.list()
        routed = next(r for r in models.data[0].model_extra["routes"] if r["id"] == "gpt-4o-mini/routed")
        assert routed["healthy"] is True  # relay-b still serves the route
        await mock_upstream.faults()  # relay-a recovers
        await asyncio.sleep(0.6)  # cool-down passes: the next request probes relay-a
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1,
                                                          extra_body={"route": "routed"})
        assert completion.model_extra["receipt"]["channels"]["served_by"] == "relay-a"
        _, health = await gw.admin("GET", "/admin/routes/health")
        relay_a = next(c for c in health["data"] if c["channel"] == "relay-a")
        assert relay_a["state"] == "closed" and relay_a["consecutive_failures"] == 0
        assert 0 < relay_a["success_rate"] < 1 and relay_a["latency_p50_ms"] is not None
        assert await gw.counter("tokensforge_circuit_state", channel="relay-a") == 0
        for client_ in gw.clients:
            await client_.close()


async def test_database_outage_fails_closed_and_recovers(mock_upstream: Mock, tmp_path: Path) -> None:
    await mock_upstream.reset()
    cluster = EmbeddedPostgres.throwaway()
    try:
        dsn = cluster.start()
        await migrate(dsn)
        settings = gateway_settings(write_catalog(tmp_path / "c.toml", mock_upstream.url), key_cache_ttl_s=30)
        ctx, url, app = await start_gateway(settings, dsn)
        async with ctx, aiohttp.ClientSession() as session:
            gw = Gw(url, dsn, gateway_of(app), mock_upstream, session)
            _, key = await gw.account(credit=10**9)
            client = gw.client(key, timeout=20)
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
            served_before = (await mock_upstream.stats())["requests"]
            cluster.stop()
            for _ in range(25):  # /readyz reads the background probe (every 0.5 s): not ready within ~2 s
                async with session.get(url + "/readyz") as r:
                    status, ready = r.status, await r.json()
                if status == 503:
                    break
                await asyncio.sleep(0.1)
            assert status == 503 and ready["checks"]["database"] is False
            for _ in range(3):
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
                    raise AssertionError("served without a ledger")
                except openai.InternalServerError as exc:
                    assert exc.status_code == 503
                    assert exc.response.json()["error"]["code"] == "ledger_unavailable"
            assert (await mock_upstream.stats())["requests"] == served_before  # nothing served unbilled
            cluster.start()
            for _ in range(100):
                async with session.get(url + "/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert r.status == 200
            completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
            assert completion.model_extra["receipt"]["charge_nanos"] > 0
            for client_ in gw.clients:
                await client_.close()
        await assert_ledger_invariants(dsn)
    finally:
        cluster.close()


async def test_gateway_killed_mid_stream_leaves_a_reservation_the_sweeper_voids(
        dsn: str, gw: Gw, tmp_path: Path) -> None:
    _, key = await gw.account(credit=10**9)
    await gw.mock.faults(**{"up-official": {"chunk_delay_ms": 200}})
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    victim = GatewayProcess(catalog, dsn=dsn, env={"TOKENSFORGE_RESERVATION_TTL_S": "1", "TOKENSFORGE_LEASES": "0"})
    with victim:
        async with aiohttp.ClientSession() as session:
            response = await session.post(victim.url + "/v1/chat/completions", headers={
                "authorization": f"Bearer {key}"}, data=orjson.dumps({
                    "model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50, "stream": True}))
            request_id = response.headers["x-request-id"]
            async for line in response.content:
                if b"lorem" in line:
                    break  # the stream is running: content reached the client
            victim.stop(signal.SIGKILL)
            response.close()
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT status, amount_nanos FROM reservations WHERE request_id = $1", request_id)
        assert row["status"] == "open" and row["amount_nanos"] > 0
        assert (await gw.balances(key))["credit"]["reserved_nanos"] == row["amount_nanos"]
        for _ in range(60):  # the surviving gateway's sweeper voids it once the TTL passed
            status = await conn.fetchval("SELECT status FROM reservations WHERE request_id = $1", request_id)
            if status != "open":
                break
            await asyncio.sleep(0.1)
        assert status == "expired"
        usage = await conn.fetchrow("SELECT status, charge_nanos FROM usage_records WHERE request_id = $1",
                                    request_id)
        assert usage["status"] == "failed" and usage["charge_nanos"] == 0
        await assert_ledger_invariants(conn)
    finally:
        await conn.close()
    balances = await gw.balances(key)
    assert balances["credit"]["reserved_nanos"] == 0 and balances["credit"]["balance_nanos"] == 10**9




async def test_client_leaving_while_its_money_is_being_held_leaves_no_reservation(gw: Gw) -> None:
    account_id, key = await gw.account(credit=10**9)
    blocker = await asyncpg.connect(gw.dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM buckets WHERE account_id = $1 FOR UPDATE", account_id)
        with pytest.raises(openai.APITimeoutError):  # tf_reserve waits on the row lock; the client gives up
            await gw.client(key, timeout=0.5).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await tx.rollback()  # now the reserve completes, after its client left
    finally:
        await blocker.close()
    record = None
    for _ in range(50):
        _, usage = await gw.get("/v1/usage", key)
        if usage["data"]:
            record = usage["data"][0]
            break
        await asyncio.sleep(0.05)
    assert record is not None and record["status"] == "client_cancelled" and record["charge_nanos"] == 0
    balances = await gw.balances(key)
    assert balances["credit"]["reserved_nanos"] == 0 and balances["credit"]["balance_nanos"] == 10**9


async def test_a_stream_delivered_during_a_ledger_outage_is_charged_when_it_returns(
        mock_upstream: Mock, tmp_path: Path) -> None:
    await mock_upstream.reset()
    cluster = EmbeddedPostgres.throwaway()
    try:
        dsn = cluster.start()
        await migrate(dsn)
        settings = gateway_settings(write_catalog(tmp_path / "c.toml", mock_upstream.url), key_cache_ttl_s=60)
        ctx, url, app = await start_gateway(settings, dsn)
        async with ctx, aiohttp.ClientSession() as session:
            gw = Gw(url, dsn, gateway_of(app), mock_upstream, session)
            _, key = await gw.account(credit=10**9)
            await mock_upstream.faults(**{"up-official": {"chunk_delay_ms": 100}})
            response = await session.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                          data=orjson.dumps({"model": "gpt-4o-mini", "messages": MESSAGES,
                                                             "max_tokens": 10, "stream": True}))
            request_id = response.headers["x-request-id"]
            lines: list[bytes] = []
            async for line in response.content:
                if b"lorem" in line and cluster.is_running():
                    await asyncio.to_thread(cluster.stop)  # the ledger goes away mid-stream
                lines.append(line)
            text = b"".join(lines)
            assert text.count(b'"content":"') >= 10 and b"ledger_unavailable" in text
            await asyncio.to_thread(cluster.start)
            receipt = None
            for _ in range(100):
                try:
                    status, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
                    if status == 200:
                        break
                except aiohttp.ContentTypeError:
                    pass
                await asyncio.sleep(0.1)
            assert receipt is not None and receipt["status"] == "succeeded" and receipt["charge_nanos"] > 0
            balances = await gw.balances(key)
            assert balances["credit"]["balance_nanos"] == 10**9 - receipt["charge_nanos"]
            assert balances["credit"]["reserved_nanos"] == 0
        await assert_ledger_invariants(dsn)
    finally:
        cluster.close()


async def test_a_stream_longer_than_the_reservation_ttl_keeps_its_reservation(
        dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    await mock_upstream.reset()
    settings = gateway_settings(write_catalog(tmp_path / "c.toml", mock_upstream.url),
                                reservation_ttl_s=0.6, sweep_interval_s=0.1)
    ctx, url, app = await start_gateway(settings, dsn)
    async with ctx, aiohttp.ClientSession() as session:
        gw = Gw(url, dsn, gateway_of(app), mock_upstream, session)
        _, key = await gw.account(credit=10**9)
        await mock_upstream.faults(**{"up-official": {"chunk_delay_ms": 150}})
        stream = await gw.client(key).chat.completions.create(  # ~1.5 s: well past the 0.6 s TTL
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        receipt = chunks[-1].model_extra["receipt"]
        assert receipt["status"] == "succeeded" and receipt["charge_nanos"] > 0  # not swept as dead
        assert (await gw.balances(key))["credit"]["balance_nanos"] == 10**9 - receipt["charge_nanos"]
        for client_ in gw.clients:
            await client_.close()


async def test_a_slow_non_streamed_answer_longer_than_the_ttl_keeps_its_reservation(
        dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    await mock_upstream.reset()
    settings = gateway_settings(write_catalog(tmp_path / "c.toml", mock_upstream.url),
                                reservation_ttl_s=0.6, sweep_interval_s=0.1)
    ctx, url, app = await start_gateway(settings, dsn)
    async with ctx, aiohttp.ClientSession() as session:
        gw = Gw(url, dsn, gateway_of(app), mock_upstream, session)
        _, key = await gw.account(credit=10**9)
        await mock_upstream.faults(**{"up-official": {"latency_ms": 1500}})
        completion = await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
        receipt = completion.model_extra["receipt"]
        assert receipt["status"] == "succeeded" and receipt["charge_nanos"] > 0
        assert (await gw.balances(key))["credit"]["balance_nanos"] == 10**9 - receipt["charge_nanos"]
        for client_ in gw.clients:
            await client_.close()
