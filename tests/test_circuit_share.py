"""Circuit openings shared between processes (issue #10): one gateway's failures protect the others."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp

from tokensforge.circuit_share import notice, parse
from tokensforge.upstream.health import CLOSED, HALF_OPEN, OPEN, BreakerConfig, ChannelHealth

from .harness import ADMIN_TOKEN, Gw, write_catalog
from .procs import GatewayProcess
from .test_limits_shared import started

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_a_breaker_says_when_its_own_failures_opened_it() -> None:
    health = ChannelHealth("c", BreakerConfig(failure_threshold=2, cooldown_s=5.0))
    assert health.record(False, 1.0, now=0.0) is False
    assert health.record(False, 1.0, now=0.1) is True and health.state == OPEN
    assert health.record(False, 1.0, now=0.2) is False  # a straggler into an open circuit opens nothing new
    assert health.allow(now=5.3) and health.state == HALF_OPEN
    assert health.record(False, 1.0, now=5.4) is True  # the probe failed: opened again, announced again


def test_a_peer_opening_opens_here_for_this_breakers_cooldown_then_the_probe_decides() -> None:
    health = ChannelHealth("c", BreakerConfig(cooldown_s=2.0))
    assert health.open_from_peer(now=10.0) is True and health.state == OPEN
    assert health.consecutive_failures == 0 and health.last_error == "opened by another gateway process"
    assert health.open_from_peer(now=11.0) is False and health.opened_at == 10.0  # no extension
    assert not health.allow(now=11.9)
    assert health.allow(now=12.0) and health.state == HALF_OPEN  # our own cooldown, then one probe
    assert health.open_from_peer(now=12.1) is False  # the probe out decides, not the notice
    assert health.record(True, 1.0, now=12.2) is False and health.state == CLOSED


def test_notices_round_trip_channel_ids_with_colons_and_refuse_others() -> None:
    assert notice("meta:relay", 5.0) == "circuit:meta:relay:5000"
    assert parse("circuit:meta:relay:5000") == ("meta:relay", 5000)
    for payload in ("keys", "catalog", "circuit:", "circuit:x", "circuit::5", "circuit:x:-1", "circuit:x:soon"):
        assert parse(payload) is None, payload


async def _chat(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, dict[str, Any], str]:
    async with session.post(url + "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json(), r.headers["x-request-id"]


async def _channel_health(session: aiohttp.ClientSession, url: str, channel: str) -> dict[str, Any]:
    async with session.get(url + "/admin/routes/health", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        return next(c for c in (await r.json())["data"] if c["channel"] == channel)


async def test_one_gateways_failures_make_another_skip_the_channel(dsn: str, gw: Gw, tmp_path: Path) -> None:
    _, key = await gw.account(credit=10**10)
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    with contextlib.ExitStack() as stack:
        a, b = started(stack, [GatewayProcess(catalog, dsn=dsn),
                               GatewayProcess(catalog, dsn=dsn, env={"TOKENSFORGE_BREAKER_COOLDOWN_S": "1"})])
        async with aiohttp.ClientSession() as session:
            await _share(gw, key, a, b, session)


async def _share(gw: Gw, key: str, a: GatewayProcess, b: GatewayProcess, session: aiohttp.ClientSession) -> None:
    assert (await _chat(session, b.url, key))[0] == 200  # B knows the channel works
    await gw.mock.faults(**{"up-official": {"error_status": 503}})
    for _ in range(3):  # 2 attempts each: A's breaker opens at its 5th consecutive failure
        assert (await _chat(session, a.url, key))[0] == 502
    opened_at = time.monotonic()
    assert (await _channel_health(session, a.url, "official-a"))["state"] == "open"
    await gw.mock.faults()  # the upstream is well again: only the notice can make B skip it

    while True:
        status, body, request_id = await _chat(session, b.url, key)
        if status == 503:
            break
        assert status == 200 and time.monotonic() - opened_at < 1.0, "B did not hear of A's opening"
    assert body["error"]["code"] == "no_healthy_channel"
    _, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
    assert {(x["outcome"], x.get("skipped")) for x in receipt["attempts"]} == {("skipped", "circuit_open")}
    b_view = await _channel_health(session, b.url, "official-a")
    assert b_view["state"] == "open" and b_view["consecutive_failures"] == 0  # B never failed itself

    deadline = time.monotonic() + 5  # B's own 1 s cooldown, then its probe finds the channel well
    while (status := (await _chat(session, b.url, key))[0]) != 200:
        assert status == 503 and time.monotonic() < deadline, status
        await asyncio.sleep(0.1)
    assert (await _channel_health(session, b.url, "official-a"))["state"] == "closed"
    assert (await _channel_health(session, a.url, "official-a"))["state"] == "open"  # A's 5 s cooldown

