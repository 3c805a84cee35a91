"""0011_settle_cost.sql: the lease settlements write the usage guard, the charge guard and the hourly
rollup themselves (the triggers step aside while they do); every other writer still goes through the
triggers. Same rows, same refusals, whichever function (item by item or set-based) settles."""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
import pytest

from tokensforge.accounts import AccountStore
from tokensforge.errors import ReservationResolved
from tokensforge.ledger.store import LedgerStore, lease_finish_sql

from .invariants import assert_ledger_invariants

_ids = itertools.count()


def _record(request_id: str, account: str, model: str) -> dict[str, Any]:
    return {"request_id": request_id, "account_id": account, "status": "succeeded", "selected_model": model,
            "route": {"id": f"{model}/official", "kind": "official"}, "bucket": "credit", "latency_ms": 2}


async def _leased(store: LedgerStore, accounts: AccountStore) -> tuple[str, str]:
    account = str((await accounts.create_account("acme", ("credit", "routed")))["id"])
    await store.topup(account, "credit", 10**12, f"fund-{account}", None)
    lease = f"lease_{next(_ids)}"
    grant = await store.lease_grow(lease, "test", account, "credit", want_nanos=10**9, min_nanos=1,
                                   fraction_ppm=1_000_000, ttl_s=600)
    assert grant.outcome == "ok"
    return account, lease


async def _derived_rows_match(conn: asyncpg.Connection) -> None:
    """What the triggers would have written is there, exactly once per record or charge."""
    assert await conn.fetch(
        "SELECT request_id FROM usage_records EXCEPT SELECT request_id FROM usage_request_ids") == []
    assert await conn.fetchval("SELECT count(*) FROM usage_records") == await conn.fetchval(
        "SELECT count(*) FROM usage_request_ids")
    charged = await conn.fetch("SELECT request_id FROM ledger_entries WHERE kind = 'charge' ORDER BY 1")
    guarded = await conn.fetch("SELECT request_id FROM ledger_charge_requests ORDER BY 1")
    assert [r[0] for r in charged] == [r[0] for r in guarded]
    rollup = await conn.fetch(
        "SELECT account_id, hour, bucket, model, route_id, route_kind, charge_nanos, requests FROM usage_hourly"
        " ORDER BY 1, 2, 3, 4, 5, 6")
    records = await conn.fetch(
        "SELECT account_id, date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,"
        " coalesce(bucket, '') AS bucket, coalesce(model, '') AS model, coalesce(route_id, '') AS route_id,"
        " coalesce(route_kind, '') AS route_kind, sum(charge_nanos)::bigint AS charge_nanos,"
        " count(*)::bigint AS requests FROM usage_records GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6")
    assert [tuple(r) for r in rollup] == [tuple(r) for r in records]


@pytest.mark.parametrize("size", [1, 3, 16])
async def test_settlements_write_guards_and_rollup_themselves(ledger, size: int) -> None:
    store, accounts, dsn = ledger
    account, lease = await _leased(store, accounts)
    assert ("each" if size <= 3 else "many") in lease_finish_sql(size)
    settled: list[str] = []
    for round_ in range(3):
        items = []
        for k in range(size):
            rid = f"req_{next(_ids)}"
            charge = 0 if k == 1 else 1_000 + k  # a zero charge writes only the record
            items.append((lease, rid, charge, _record(rid, account, f"m{k % 2}")))
            settled.append(rid)
        if round_ == 2:  # a replay of an earlier request: resolved, nothing moves
            items[-1] = (lease, settled[0], 5_000, _record(settled[0], account, "m0"))
            settled.pop()
        results = await store._lease_finish_many(items)
        assert all(not isinstance(r, Exception) for r in results[:-1]), results
        assert isinstance(results[-1], ReservationResolved) if round_ == 2 else not isinstance(results[-1], Exception)
    # other writers still go through the triggers: a request with no reservation, and a replay of it
    await store.record(_record("req_plain", account, "m9"))
    await store.record(_record("req_plain", account, "m9"))
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM usage_records") == len(settled) + 1
        await _derived_rows_match(conn)
    await assert_ledger_invariants(dsn)


@pytest.mark.parametrize("size", [1, 16])
async def test_a_second_charge_of_a_request_is_still_refused(ledger, size: int) -> None:
    """A charge entry with no usage record (what a settlement with no receipt leaves), then the same requests
    settled again: the charge guard refuses them as before, by its constraint's name. Rolled back after."""
    store, accounts, _dsn = ledger
    account, lease = await _leased(store, accounts)
    rids = [f"req_{next(_ids)}" for _ in range(size)]
    async with store.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.fetch(lease_finish_sql(size), [lease] * size, rids, [1_000] * size, [None] * size)
            with pytest.raises(asyncpg.UniqueViolationError) as refused:
                await conn.fetch(lease_finish_sql(size), [lease] * size, rids, [1_000] * size,
                                 [_record(rid, account, "m") for rid in rids])
            assert refused.value.constraint_name == "ledger_one_charge_per_request"
        finally:
            await tx.rollback()


async def test_the_triggers_are_back_once_a_settlement_returns(ledger) -> None:
    """The setting that makes the triggers step aside is off again after each settlement, even later in
    the same transaction: a usage record written next goes through usage_once and usage_rollup."""
    store, accounts, _dsn = ledger
    account, lease = await _leased(store, accounts)
    async with store.pool.acquire() as conn, conn.transaction():
        for size in (1, 16):
            items = [(lease, f"req_{next(_ids)}", 700, _record(f"req_t{size}_{k}", account, "m")) for k in range(size)]
            items = [(lz, rec["request_id"], c, rec) for lz, _rid, c, rec in items]
            await conn.fetch(lease_finish_sql(size), *([i[k] for i in items] for k in range(4)))
            assert await conn.fetchval("SELECT current_setting('tokensforge.settling', true)") == "off"
            # a second record of a settled request is skipped by usage_once, not written
            await conn.execute("SELECT tf_record($1)", _record(items[0][1], account, "other"))
        await conn.execute("SELECT tf_record($1)", _record("req_after", account, "m"))
        await _derived_rows_match(conn)
        assert await conn.fetchval("SELECT count(*) FROM usage_records") == 1 + 16 + 1
