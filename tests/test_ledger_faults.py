"""The ledger under adversity, on a real PostgreSQL: an exhausted pool."""

from __future__ import annotations

import time

import pytest

from tokensforge.db import create_pool
from tokensforge.errors import LedgerUnavailable
from tokensforge.ledger.store import LedgerStore

# ---------------------------------------------------------------- pool acquire timeout


async def test_an_exhausted_pool_fails_closed_after_the_acquire_timeout(dsn: str) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    ledger = LedgerStore(pool, acquire_timeout_s=0.2)
    try:
        async with pool.acquire():  # someone holds the only connection
            for call in (ledger.balances("acct_x"), ledger.available("acct_x", "credit"),
                         ledger.reserve("req_p", "acct_x", "credit", 1), ledger.finish("req_p", 0, None)):
                started = time.monotonic()
                with pytest.raises(LedgerUnavailable):
                    await call
                assert time.monotonic() - started < 2.0
        assert await ledger.balances("acct_x") == []  # the pool works again once released
    finally:
        await pool.close()
