"""The ledger core on a real PostgreSQL: reservations, settlement, idempotency, expiry."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

import pytest

from tokensforge import metrics
from tokensforge.accounts import AccountStore
from tokensforge.db import create_pool
from tokensforge.errors import (
    BudgetExceeded, IdempotencyConflict, LedgerError, InsufficientBalance, NotFound, ReservationResolved,
)
from tokensforge.ledger.model import BudgetLimit
from tokensforge.ledger.store import LedgerStore

from .invariants import assert_ledger_invariants

BUCKETS = ("credit", "routed")


@pytest.fixture
async def stores(dsn: str):
    pool = await create_pool(dsn, max_size=20)
    try:
        yield LedgerStore(pool, reservation_ttl_s=60), AccountStore(pool)
    finally:
        await pool.close()


async def _account(accounts: AccountStore) -> str:
    return (await accounts.create_account("acme", BUCKETS))["id"]


def _record(request_id: str, account_id: str, status: str = "succeeded") -> dict:
    return {"request_id": request_id, "account_id": account_id, "status": status,
            "selected_model": "m", "route": {"id": "m/official", "kind": "official"}, "bucket": "credit"}


async def test_reserve_settle_moves_exactly_the_charge(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    entry, created = await ledger.topup(acct, "credit", 1_000_000, "t1", "first")
    assert created and entry["balance_after_nanos"] == 1_000_000
    available = await ledger.reserve("req_a", acct, "credit", 400_000)
    assert available == 600_000
    entry_id, balance = await ledger.finish("req_a", 123_456, _record("req_a", acct))
    assert entry_id is not None and balance == 1_000_000 - 123_456
    rows = {r["bucket"]: r for r in await ledger.balances(acct)}
    assert rows["credit"]["balance_nanos"] == 876_544 and rows["credit"]["reserved_nanos"] == 0
    assert rows["routed"]["balance_nanos"] == 0  # the other bucket never moves
    charge = await ledger.entry(entry_id)
    assert charge["amount_nanos"] == -123_456 and charge["request_id"] == "req_a"


async def test_void_releases_everything_and_writes_no_entry(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    await ledger.topup(acct, "routed", 500, "t", None)
    await ledger.reserve("req_v", acct, "routed", 500)
    assert await ledger.available(acct, "routed") == 0
    entry_id, balance = await ledger.finish("req_v", 0, _record("req_v", acct, "failed"))
    assert entry_id is None and balance == 500
    assert await ledger.available(acct, "routed") == 500


async def test_a_reservation_resolves_exactly_once(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    await ledger.topup(acct, "credit", 1000, "t", None)
    await ledger.reserve("req_1", acct, "credit", 100)
    await ledger.finish("req_1", 50, _record("req_1", acct))
    with pytest.raises(ReservationResolved):
        await ledger.finish("req_1", 50, _record("req_1", acct))
    with pytest.raises(ReservationResolved):
        await ledger.finish("req_unknown", 0, None)


async def test_charge_above_the_reservation_is_refused_by_the_database(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    await ledger.topup(acct, "credit", 1000, "t", None)
    await ledger.reserve("req_x", acct, "credit", 100)
    with pytest.raises(LedgerError, match="outside reservation"):
        await ledger.finish("req_x", 101, _record("req_x", acct))
    assert await ledger.available(acct, "credit") == 900  # nothing moved


async def test_insufficient_balance_names_bucket_needed_available(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    await ledger.topup(acct, "credit", 70, "t", None)
    with pytest.raises(InsufficientBalance) as info:
        await ledger.reserve("req_big", acct, "credit", 71)
    assert info.value.extra == {"bucket": "credit", "needed_nanos": 71, "available_nanos": 70}
    assert info.value.status == 402


async def test_500_concurrent_reservations_exactly_50_fit(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    await ledger.topup(acct, "credit", 50 * 1000, "t", None)

    async def one(i: int) -> bool:
        try:
            await ledger.reserve(f"req_{i}", acct, "credit", 1000)
            return True
        except InsufficientBalance:
            return False

    calls = _ledger_calls("reserve")
    results = await asyncio.gather(*(one(i) for i in range(500)))
    assert sum(results) == 50
    assert _ledger_calls("reserve") - calls < 500  # group commit: several reservations per transaction
    assert await ledger.available(acct, "credit") == 0
    async with ledger.pool.acquire() as conn:
        await assert_ledger_invariants(conn)


async def test_idempotent_topup_under_concurrency_credits_once(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    results = await asyncio.gather(*(ledger.topup(acct, "credit", 5_000, "same-key", "x") for _ in range(20)))
    assert sum(created for _, created in results) == 1
    assert len({entry["id"] for entry, _ in results}) == 1
    assert await ledger.available(acct, "credit") == 5_000
    with pytest.raises(IdempotencyConflict):
        await ledger.topup(acct, "credit", 6_000, "same-key", "x")
    with pytest.raises(IdempotencyConflict):
        await ledger.topup(acct, "routed", 5_000, "same-key", "x")
    assert await ledger.available(acct, "credit") == 5_000


async def test_topup_of_unknown_account_is_not_found(stores) -> None:
    ledger, _ = stores
    with pytest.raises(NotFound):
        await ledger.topup("acct_nope", "credit", 5, "k", None)


async def test_budget_is_never_exceeded_under_concurrency(stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    await ledger.topup(acct, "credit", 10**9, "t", None)
    budget = [BudgetLimit("key:k1", "day", 10_000)]

    async def one(i: int) -> int:
        try:
            await ledger.reserve(f"req_{i}", acct, "credit", 1_500, budget)
        except BudgetExceeded:
            return 0
        await ledger.finish(f"req_{i}", 1_000, _record(f"req_{i}", acct))
        return 1_000

    spent = sum(await asyncio.gather(*(one(i) for i in range(60))))
    row = await ledger.pool.fetchrow("SELECT * FROM budgets WHERE scope = 'key:k1'")
    assert row["spent_nanos"] == spent <= 10_000 and row["reserved_nanos"] == 0
    assert spent >= 6_000  # the budget was really used, not refused wholesale


async def test_sweeper_voids_reservation_of_a_killed_process(dsn: str, stores) -> None:
    ledger, accounts = stores
    acct = await _account(accounts)
    await ledger.topup(acct, "credit", 10_000, "t", None)
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from tokensforge.db import create_pool
        from tokensforge.ledger.store import LedgerStore
        async def main():
            pool = await create_pool({dsn!r}, min_size=1, max_size=1)
            store = LedgerStore(pool, reservation_ttl_s=0.5)
            await store.reserve("req_orphan", {acct!r}, "credit", 4_000,
                                receipt={{"request_id": "req_orphan", "account_id": {acct!r},
                                          "status": "failed", "selected_model": "m"}})
            print("reserved", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "reserved" in proc.stdout
    assert await ledger.available(acct, "credit") == 6_000
    assert await ledger.expire() == 0  # not before its TTL
    await asyncio.sleep(0.6)
    assert await ledger.expire() == 1
    assert await ledger.available(acct, "credit") == 10_000
    status = await ledger.pool.fetchval("SELECT status FROM reservations WHERE id = 'req_orphan'")
    usage = await ledger.pool.fetchrow("SELECT status, charge_nanos FROM usage_records WHERE request_id = 'req_orphan'")
    assert status == "expired" and usage["status"] == "failed" and usage["charge_nanos"] == 0


def _ledger_calls(op: str) -> float:
    return sum(s.value for m in metrics.LEDGER_OP_DURATION.collect() for s in m.samples
               if s.name.endswith("_count") and s.labels.get("op") == op)


def _settle_batches() -> float:
    return _ledger_calls("settle")


async def test_concurrent_settlements_share_transactions_and_stay_exact(stores) -> None:
    ledger, accounts = stores
    accts = [await _account(accounts) for _ in range(5)]
    for acct in accts:
        await ledger.topup(acct, "credit", 10**9, "t", None)
    for i in range(200):
        await ledger.reserve(f"req_g{i}", accts[i % 5], "credit", 1_000)
    before = _settle_batches()
    results = await asyncio.gather(*(
        ledger.finish(f"req_g{i}", i % 7 * 100, _record(f"req_g{i}", accts[i % 5])) for i in range(200)))
    batches = _settle_batches() - before
    assert batches < 200  # group commit: several settlements per transaction
    assert sum(1 for entry, _ in results if entry is not None) == sum(1 for i in range(200) if i % 7)
    for n, acct in enumerate(accts):
        expected = 10**9 - sum(i % 7 * 100 for i in range(n, 200, 5))
        assert await ledger.available(acct, "credit") == expected
    with pytest.raises(ReservationResolved):  # a settled reservation in a batch is refused alone
        await asyncio.gather(ledger.finish("req_g0", 0, None), ledger.reserve("req_h", accts[0], "credit", 5))
