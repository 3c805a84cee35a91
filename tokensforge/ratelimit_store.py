"""Shared rate budgets: the database side of rate leases (the pure side is `ratelimit.py`).

A request of a limited scope is admitted from permits this process already holds, with no
database round trip; when they run out, one `tf_rate_take` call (shared by every request
of the scope waiting at that moment) fetches more. Idle leases go back every second.

When the database cannot be reached, admission falls back to this process's own sliding
window at the full limit (so N processes allow up to N × the limit until it returns).
Rate limits guard capacity, not money: money stays fail-closed in the ledger, so the
fallback can never serve anything unbilled, and a database blip does not turn every limited
key into 503s while leases could still serve. Permits already held keep being spent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Sequence

import asyncpg

from . import metrics
from .errors import LedgerUnavailable, RateLimited
from .ledger.store import translated
from .ratelimit import IDLE_S, Grant, RateLimiter
from .state import Gateway

log = logging.getLogger("tokensforge.ratelimit")

TAKE_TIMEOUT_S = 2.0  # a take slower than this counts as the database being away
OFFLINE_RECHECK_S = 1.0  # after a failed take, the local window decides alone this long
MAX_TAKES = 64  # per request: a safety net; each take either grants or makes spend() refuse
_UNLIMITED = 2**62  # policies take any positive integer; beyond this a limit can never bind (bigint columns)


class RateStore:
    """The two SQL calls of rate leases (migrations/0006_rate_limits.sql)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def take(self, scope: str, rpm: int | None, tpm: int | None, need_requests: int,
                   need_tokens: int) -> Grant:
        async with translated("rate_take"), asyncio.timeout(TAKE_TIMEOUT_S):
            row = await self.pool.fetchrow("SELECT * FROM tf_rate_take($1, $2, $3, $4, $5)", scope,
                                           _capped(rpm), _capped(tpm), need_requests, min(need_tokens, _UNLIMITED))
        return Grant(window_id=row["window_id"], window_left_s=row["window_left_ms"] / 1000,
                     requests=row["requests"], tokens=row["tokens"],
                     requests_left=row["requests_left"], tokens_left=row["tokens_left"])

    async def give(self, leases: Sequence[tuple[str, int, int, int]]) -> None:
        if not leases:
            return
        scopes, windows, requests, tokens = (list(column) for column in zip(*leases, strict=True))
        async with translated("rate_give"), asyncio.timeout(TAKE_TIMEOUT_S):
            await self.pool.execute("SELECT tf_rate_give($1, $2, $3, $4)", scopes, windows, requests, tokens)


def _capped(limit: int | None) -> int | None:
    return None if limit is None else min(limit, _UNLIMITED)


def shared_rates(gw: Gateway) -> SharedRates:
    """The gateway's SharedRates, made on first use (its give-back task runs in `gw.tasks`)."""
    shared = gw.limiter.shared
    if not isinstance(shared, SharedRates):
        shared = gw.limiter.shared = SharedRates(RateStore(gw.pool), gw.limiter, gw)
    return shared


class SharedRates:
    def __init__(self, store: RateStore, limiter: RateLimiter, gw: Gateway) -> None:
        self.store, self.limiter, self.book, self._gw = store, limiter, limiter.leases, gw
        self._takes: dict[str, asyncio.Task[None]] = {}  # one take in flight per scope
        self._offline_until = -math.inf
        self._giving_back = False

    async def admit(self, limits: Sequence[tuple[str, int | None, int | None]], tokens: int) -> None:
        """Count one request of `tokens` tokens against every (scope, rpm, tpm), or raise RateLimited."""
        for scope, rpm, tpm in limits:
            await self._admit(scope, rpm, tpm, tokens)

    async def _admit(self, scope: str, rpm: int | None, tpm: int | None, tokens: int) -> None:
        for _ in range(MAX_TAKES):
            now = time.monotonic()
            if self.book.spend(scope, rpm, tpm, tokens, now):
                self.limiter.record(scope, tokens, now)
                return
            if now >= self._offline_until:
                try:
                    await self._take(scope, rpm, tpm, tokens)
                    continue
                except LedgerUnavailable:
                    self._offline_until = time.monotonic() + OFFLINE_RECHECK_S
            self.limiter.admit(scope, rpm, tpm, tokens, time.monotonic())  # the database is away
            metrics.RATE_LOCAL_ADMISSIONS.inc()
            return
        log.warning("rate scope %s: no permit after %d takes", scope.split(":", 1)[0], MAX_TAKES)
        raise RateLimited("rate limit reached; try again shortly", retry_after_s=1,
                          limit_scope=scope.split(":", 1)[0])

    async def _take(self, scope: str, rpm: int | None, tpm: int | None, tokens: int) -> None:
        """Fetch permits for `scope`; requests that find a take in flight wait for it instead."""
        task = self._takes.get(scope)
        if task is None:
            need_requests, need_tokens = self.book.need(scope, rpm, tpm, tokens)
            task = asyncio.get_running_loop().create_task(
                self._fetch(scope, rpm, tpm, need_requests, need_tokens))
            self._takes[scope] = task  # also the strong reference until it is done
            task.add_done_callback(functools.partial(self._taken, scope))
        # shielded: a client that leaves must not cancel the take others wait for
        await asyncio.shield(task)

    async def _fetch(self, scope: str, rpm: int | None, tpm: int | None, need_requests: int,
                     need_tokens: int) -> None:
        sent_at = time.monotonic()
        try:
            grant = await self.store.take(scope, rpm, tpm, need_requests, need_tokens)
        except LedgerUnavailable:
            metrics.child(metrics.RATE_LEASES, "unavailable").inc()
            raise
        self.book.add(scope, grant, sent_at, time.monotonic())
        metrics.child(metrics.RATE_LEASES, "granted" if grant.requests or grant.tokens else "exhausted").inc()
        if not self._giving_back:
            self._giving_back = True
            self._gw.spawn(self._give_back_forever())

    def _taken(self, scope: str, task: asyncio.Task[None]) -> None:
        if self._takes.get(scope) is task:
            del self._takes[scope]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have left before it failed

    async def _give_back_forever(self, interval_s: float = IDLE_S / 2) -> None:
        """Give back idle leases; at shutdown (cancelled) give back everything still held."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self._give(self.book.idle(time.monotonic()))
        except asyncio.CancelledError:
            await self._give(self.book.drain())
            raise

    async def _give(self, leases: list[tuple[str, int, int, int]]) -> None:
        try:
            await self.store.give(leases)
        except (LedgerUnavailable, asyncpg.PostgresError) as exc:
            # lost permits only lower what others can admit until the window ends
            log.debug("rate permits not given back: %s", exc)
