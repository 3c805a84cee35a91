"""The database side of rate leases (migrations/0006_rate_limits.sql, ratelimit_store.py), on a real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tokensforge.db import create_pool
from tokensforge.errors import RateLimited
from tokensforge.ratelimit import RateLimiter
from tokensforge.ratelimit_store import RateStore, SharedRates

from .harness import Gw


async def test_concurrent_takes_never_hand_out_more_than_the_limit(dsn: str) -> None:
    pool = await create_pool(dsn, max_size=8)
    try:
        store = RateStore(pool)
        grants = await asyncio.gather(*(store.take("key:k", 50, None, 1, 0) for _ in range(120)))
        assert sum(g.requests for g in grants) == 50  # all of the window, and not one more
        assert all(g.requests <= 50 // 20 for g in grants)  # small chunks: nobody hoards the window
        assert {g.window_id for g in grants} == {grants[0].window_id}
        assert 55_000 < grants[0].window_left_s * 1000 <= 60_000
        refused = [g for g in grants if g.requests == 0]
        assert len(refused) >= 70 and all(g.requests_left == 0 for g in refused)

        tokens = await asyncio.gather(*(store.take("project:p", None, 1000, 0, 30) for _ in range(60)))
        assert sum(g.tokens for g in tokens) <= 1000
        assert all(g.tokens == 0 or g.tokens >= 30 for g in tokens)  # a request's need whole, or nothing
        assert 1000 - sum(g.tokens for g in tokens) < 30  # what is left could not serve one more request
    finally:
        await pool.close()


async def test_permits_given_back_count_again_in_their_window_only(dsn: str) -> None:
    pool = await create_pool(dsn, max_size=2)
    try:
        store = RateStore(pool)
        first = await store.take("key:k", 100, 1000, 1, 10)
        assert (first.requests, first.tokens) == (5, 50)  # a twentieth of the limit while the window is empty
        await store.give([("key:k", first.window_id, 4, 40)])
        again = await store.take("key:k", 100, 1000, 1, 10)
        assert (again.requests_left, again.tokens_left) == (100 - 1 - again.requests, 1000 - 10 - again.tokens)
        await pool.execute("UPDATE rate_windows SET window_start = window_start - interval '61 seconds'")
        fresh = await store.take("key:k", 100, 1000, 1, 10)  # the window ended: a new one starts now
        assert fresh.window_id != again.window_id and fresh.requests_left == 95
        await store.give([("key:k", again.window_id, 5, 50)])  # permits of the old window: worth nothing
        assert await pool.fetchval("SELECT requests_granted FROM rate_windows") == 5
        huge = await store.take("key:huge", 10**15, 10**30, 1, 5)  # any positive limit a policy accepts
        assert huge.requests == 10**15 // 20 and huge.tokens == 2**62 // 20
    finally:
        await pool.close()


async def test_with_the_database_away_the_process_window_decides_alone(dsn: str, gw: Gw) -> None:
    pool = await create_pool(dsn, max_size=1)
    await pool.close()  # every take fails as if the database were unreachable
    limiter = RateLimiter()
    shared = SharedRates(RateStore(pool), limiter, gw.gateway)
    local = _local_admissions()
    for _ in range(3):
        await shared.admit([("key:k", 3, None)], 10)
    with pytest.raises(RateLimited) as info:
        await shared.admit([("key:k", 3, None)], 10)
    assert 1 <= int(info.value.headers["retry-after"]) <= 60
    assert _local_admissions() == local + 3  # the refusal is not an admission


def _local_admissions() -> float:
    return REGISTRY.get_sample_value("tokensforge_rate_local_admissions_total") or 0.0


async def test_the_gateway_admits_from_leases_and_refuses_with_the_windows_end(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9, policy={"rpm": 3})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for _ in range(3):
        status, _, _ = await gw.post("/v1/chat/completions", key, body)
        assert status == 200
    status, error, headers = await gw.post("/v1/chat/completions", key, body)
    assert status == 429 and error["error"]["code"] == "rate_limited"
    conn = await asyncpg.connect(gw.dsn)
    try:
        left_s = await conn.fetchval("SELECT extract(epoch FROM window_start + interval '1 minute' - now())"
                                     " FROM rate_windows")
    finally:
        await conn.close()
    retry_after = next(v for k, v in headers.items() if k.lower() == "retry-after")
    assert abs(int(retry_after) - float(left_s)) <= 1.5  # when the window ends, not "60"
