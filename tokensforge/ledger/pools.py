"""Pools (SPEC §1, §5.8): subscriptions, the free research allowance, and the schedule tick.

The schedule itself (grant at period start, lapse at period end, exactly once, catching up
across gaps, holds settling against their own period) lives in the database functions of
`migrations/0003_pools.sql`; this module only calls them and reads the pool views.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

import asyncpg

from ..errors import InvalidRequest, NotFound, TokensForgeError
from .store import LedgerStore, translated


class SubscriptionConflict(TokensForgeError):
    status, code, type, final = 409, "subscription_conflict", "invalid_request_error", True


#: due subscriptions one tick takes per transaction (the rest go in the next round at once)
TICK_BATCH = 200

# A pool's current period (if it has one) with the charges made in it so far.
_POOLS_SQL = """
SELECT s.bucket, s.plan, s.period, s.period_start, s.period_end, s.period_allowance_nanos,
       coalesce((SELECT -sum(l.amount_nanos) FROM ledger_entries l
                 WHERE l.account_id = s.account_id AND l.bucket = s.bucket AND l.kind = 'charge'
                   AND l.pool_period_end = s.period_end), 0)::bigint AS used_nanos
FROM subscriptions s
WHERE s.account_id = $1 AND s.status <> 'ended' AND s.period_end IS NOT NULL"""


class PoolStore:
    """Subscriptions and pool views over the ledger's connection pool."""

    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger

    async def tick(self, free_allowance_nanos: int, limit: int = TICK_BATCH) -> int:
        """Grant and lapse every due period (this process's share: SKIP LOCKED); returns how many
        subscriptions were brought up to date. Also records the free research allowance."""
        rows = await self.ledger._call("pool_tick", "SELECT tf_pool_tick($1, $2) AS n", free_allowance_nanos, limit)
        count: int = rows[0]["n"]
        return count

    async def pools(self, account_id: str) -> dict[str, asyncpg.Record]:
        """The current period of each live pool of the account, caught up to the database clock first
        (so a view never shows an allowance whose period has ended)."""
        async with translated("pool"), self.ledger._connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT tf_pool_catch_up_due(array_agg(account_id), array_agg(bucket)) FROM subscriptions"
                " WHERE account_id = $1 AND status <> 'ended'", account_id)
            rows = await conn.fetch(_POOLS_SQL, account_id)
        return {r["bucket"]: r for r in rows}

    async def create(self, account_id: str, bucket: str, plan: str, allowance_nanos: int, period: str,
                     starts_at: datetime | None) -> asyncpg.Record:
        """A subscription into a pool bucket; its first period is granted at once if it has started."""
        sub_id = "sub_" + secrets.token_hex(8)
        async with translated("pool"), self.ledger._connection() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id) is None:
                raise NotFound(f"account {account_id!r} does not exist", param="account_id")
            if starts_at is not None and await conn.fetchval(
                    "SELECT $1::timestamptz < tf_now() - interval '5 minutes'", starts_at):
                raise InvalidRequest("'starts_at' must not be in the past", param="starts_at")
            await conn.execute("INSERT INTO buckets (account_id, bucket) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                               account_id, bucket)
            try:
                await conn.execute(
                    "INSERT INTO subscriptions (id, account_id, bucket, plan, allowance_nanos, period, starts_at,"
                    " due_at) VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, tf_now()), coalesce($7, tf_now()))",
                    sub_id, account_id, bucket, plan, allowance_nanos, period, starts_at)
            except asyncpg.UniqueViolationError:
                raise SubscriptionConflict(
                    f"bucket {bucket!r} of account {account_id!r} already has a live subscription; cancel it and "
                    "wait for its period to end first", param="bucket") from None
            await conn.execute("SELECT tf_pool_catch_up($1)", sub_id)
            return await conn.fetchrow("SELECT * FROM subscriptions WHERE id = $1", sub_id)

    async def cancel(self, subscription_id: str) -> asyncpg.Record:
        """End a subscription at the end of its current period (no grant after it)."""
        async with translated("pool"), self.ledger._connection() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM subscriptions WHERE id = $1 AND plan IS NOT NULL",
                                   subscription_id) is None:
                raise NotFound(f"subscription {subscription_id!r} does not exist", param="subscription_id")
            await conn.execute("SELECT tf_pool_cancel($1)", subscription_id)
            return await conn.fetchrow("SELECT * FROM subscriptions WHERE id = $1", subscription_id)

    async def subscriptions(self, account_id: str) -> list[asyncpg.Record]:
        """The account's paid subscriptions, oldest first (the implicit free research one is not listed)."""
        return await self.ledger._read(
            "SELECT * FROM subscriptions WHERE account_id = $1 AND plan IS NOT NULL ORDER BY created_at, id",
            account_id)


def parse_subscription(body: dict[str, Any], pool_buckets: set[str]) -> tuple[str, str, int, str, datetime | None]:
    """(plan, bucket, allowance_nanos, period, starts_at) from an admin request; 400 if wrong."""
    plan = body.get("plan")
    if not isinstance(plan, str) or not plan.strip() or len(plan) > 200 or "\x00" in plan:
        raise InvalidRequest("'plan' must be a non-empty name", param="plan")
    bucket = body.get("bucket")
    if not isinstance(bucket, str) or bucket not in pool_buckets:
        pools = ", ".join(sorted(pool_buckets)) or "none"
        raise InvalidRequest(f"'bucket' must be a pool bucket of the catalog (pools: {pools})", param="bucket")
    allowance = body.get("allowance_nanos")
    if isinstance(allowance, bool) or not isinstance(allowance, int) or not 0 < allowance <= 10**15:
        raise InvalidRequest("'allowance_nanos' must be a positive integer (nano-USD, at most 10^15)",
                             param="allowance_nanos")
    period = body.get("period")
    if period not in ("day", "month"):
        raise InvalidRequest("'period' must be \"day\" or \"month\"", param="period")
    raw_start = body.get("starts_at")
    starts_at = None
    if raw_start is not None:
        try:
            starts_at = datetime.fromisoformat(raw_start) if isinstance(raw_start, str) else None
        except ValueError:
            starts_at = None
        if starts_at is None or starts_at.tzinfo is None:
            raise InvalidRequest("'starts_at' must be an ISO 8601 time with a UTC offset", param="starts_at")
    return plan.strip(), bucket, allowance, period, starts_at
