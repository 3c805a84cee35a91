"""Limits across processes (issue #10): rpm/tpm budgets shared through the database by rate
leases, and circuit openings shared over NOTIFY. Real PostgreSQL, real gateway processes."""

from __future__ import annotations

import asyncio
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
    with GatewayProcess(catalog, dsn=dsn, workers=2) as a, GatewayProcess(catalog, dsn=dsn, workers=2) as b:
        urls = [a.url, b.url]
        statuses = await _burst(urls, rpm_key, rpm * 8 // 5)
        assert set(statuses) <= {200, 429}, statuses
        admitted_rpm = statuses[200]
        assert 0.95 * rpm <= admitted_rpm <= rpm, statuses  # not N × the limit, and little left unused

        statuses = await _burst(urls, tpm_key, tpm_requests * 8 // 5)
        assert set(statuses) <= {200, 429}, statuses
        assert 0.95 * tpm_requests <= statuses[200] <= tpm_requests, statuses

        await asyncio.sleep(1.5)  # idle leases go back to the window they came from
        conn = await asyncpg.connect(dsn)
        try:
            rpm_row, tpm_row = await conn.fetch(
                "SELECT * FROM rate_windows WHERE scope LIKE 'key:%' ORDER BY requests_granted DESC")
        finally:
            await conn.close()
        # what the database handed out is what was admitted: nothing stranded in an idle process
        assert rpm_row["requests_granted"] == admitted_rpm
        assert tpm_row["tokens_granted"] == statuses[200] * per_request
