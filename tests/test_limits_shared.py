"""Limits across processes (issue #10): rpm/tpm budgets shared through the database by rate
leases, and circuit openings shared over NOTIFY. Real PostgreSQL, real gateway processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import asyncpg

from tokensforge.dialects.openai_chat import decode
from tokensforge.pricing import request_input_tokens

from .harness import Gw, write_catalog
from .procs import GatewayProcess

MESSAGES = [{"role": "user", "content": "hello from many processes"}]
MAX_TOKENS = 10
BODY = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": MAX_TOKENS}


def started(stack: contextlib.ExitStack, procs: list[GatewayProcess]) -> list[GatewayProcess]:
    """Gateways that start side by side, not one after the other; each is stopped when `stack` closes,
    also when another one failed to start."""
    for proc in procs:
        stack.callback(proc.stop)
    for proc in procs:
        proc.wait_ready()
    return procs


async def _both_workers_answer(url: str, timeout_s: float = 30) -> None:
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s  # the second worker may still be starting
    while len(pids) < 2:
        assert time.monotonic() < deadline, "the second worker did not start"
        async with aiohttp.ClientSession() as session:  # a new connection each time
            async with session.get(url + "/healthz") as r:
                pids.add((await r.json())["pid"])
        await asyncio.sleep(0.02)


async def _burst(urls: list[str], key: str, n: int, concurrency: int = 48) -> dict[int, int]:
    """`n` chat requests spread over `urls`, `concurrency` at a time; how many got each status."""
    statuses: dict[int, int] = {}
    queue = iter(range(n))
    headers = {"authorization": f"Bearer {key}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            async with session.post(urls[i % len(urls)] + "/v1/chat/completions", json=BODY, headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 429:
                    assert 1 <= int(r.headers["retry-after"]) <= 60

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return statuses


async def test_rpm_and_tpm_hold_across_two_instances_of_two_workers(dsn: str, gw: Gw, tmp_path: Path) -> None:
    rpm = 100
    per_request = request_input_tokens(decode(BODY)) + MAX_TOKENS  # what admission counts for one request
    tpm_requests = 100
    _, rpm_key = await gw.account(credit=10**10, policy={"rpm": rpm})
    _, tpm_key = await gw.account(credit=10**10, policy={"tpm": tpm_requests * per_request})
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    with contextlib.ExitStack() as stack:
        urls = [u.url for u in started(stack, [GatewayProcess(catalog, dsn=dsn, workers=2) for _ in range(2)])]
        for url in urls:
            await _both_workers_answer(url)
        statuses = await _burst(urls, rpm_key, rpm * 8 // 5)
        assert set(statuses) <= {200, 429}, statuses
        admitted_rpm = statuses[200]
        assert 0.95 * rpm <= admitted_rpm <= rpm, statuses  # not N × the limit, and little left unused

        statuses = await _burst(urls, tpm_key, tpm_requests * 8 // 5)
        assert set(statuses) <= {200, 429}, statuses
        assert 0.95 * tpm_requests <= statuses[200] <= tpm_requests, statuses

        # idle leases go back to the window they came from: what the database handed out is then what
        # was admitted, nothing stranded in an idle process
        expected = [admitted_rpm, statuses[200] * per_request]
        deadline = time.monotonic() + 5
        while (granted := await _granted(dsn)) != expected:
            assert time.monotonic() < deadline, (granted, expected)
            await asyncio.sleep(0.1)


async def _granted(dsn: str) -> list[int]:
    """[requests granted to the rpm key, tokens granted to the tpm key] in their current windows."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT * FROM rate_windows WHERE scope LIKE 'key:%' ORDER BY requests_granted DESC")
    finally:
        await conn.close()
    return [rows[0]["requests_granted"], rows[1]["tokens_granted"]]
