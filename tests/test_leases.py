"""Leases on a real PostgreSQL: holds carved in memory, settlements against the lease, giving back,
small balances, budgets, crashes. Several `Wallet`s on one database stand for several processes."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from tokensforge.accounts import AccountStore
from tokensforge.errors import BudgetExceeded, InsufficientBalance, ReservationResolved
from tokensforge.ledger.leases import PRESSURE_PREFIX, Hold, LeaseConfig, Wallet
from tokensforge.ledger.model import BudgetLimit
from tokensforge.ledger.store import LedgerStore

from .invariants import assert_ledger_invariants

_ids = itertools.count()


async def _funded(ledger: LedgerStore, accounts: AccountStore, credit: int) -> str:
    account = (await accounts.create_account("acme", ("credit", "routed")))["id"]
    await ledger.topup(account, "credit", credit, f"fund-{account}", None)
    return str(account)


def _record(request_id: str, account: str) -> dict[str, Any]:
    return {"request_id": request_id, "account_id": account, "status": "succeeded", "selected_model": "m",
            "route": {"id": "m/official", "kind": "official"}, "bucket": "credit"}


async def _hold(wallet: Wallet, account: str, amount: int, budgets: tuple[BudgetLimit, ...] = ()) -> Hold:
    request_id = f"req_{next(_ids)}"
    return await wallet.reserve(request_id, request_id, account, "credit", amount, budgets,
                                lambda: _record(request_id, account), leasable=True)


async def _settle(wallet: Wallet, hold: Hold, charge: int, account: str) -> tuple[str | None, int]:
    return await wallet.finish(hold, charge, _record(hold.request_id, account))


async def _row(ledger: LedgerStore, account: str) -> dict[str, int]:
    rows = await ledger.pool.fetch(
        "SELECT balance_nanos, reserved_nanos FROM buckets WHERE account_id = $1 AND bucket = 'credit'", account)
    return dict(rows[0])


async def test_holds_are_carved_in_memory_and_settle_against_one_lease(ledger) -> None:
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 10_000_000)
    wallet = Wallet(store, LeaseConfig(min_requests=8))
    first = await _hold(wallet, account, 10_000)
    assert first.lease is not None and first.lease.held == 80_000  # 8 holds' worth, 1 round trip
    queries = store.pool.acquired
    more = [await _hold(wallet, account, 10_000) for _ in range(7)]
    assert store.pool.acquired == queries, "carving from a lease must not touch the database"
    assert {h.lease.id for h in more if h.lease} == {first.lease.id}
    # the database holds the lease: nobody else can spend it
    assert (await _row(store, account))["reserved_nanos"] == 80_000
    entry, balance = await _settle(wallet, first, 4_000, account)
    assert entry is not None and balance == 10_000_000 - 4_000
    for hold in more:
        await _settle(wallet, hold, 1_000, account)
    lease_row = await store.pool.fetchrow("SELECT * FROM reservations WHERE id = $1", first.lease.id)
    assert lease_row["kind"] == "lease" and lease_row["charged_nanos"] == 11_000
    assert lease_row["amount_nanos"] == 80_000 - 11_000 and first.lease.carved == 0
    # receipts are stored once: the usage records, none with the (absent) reservation rows
    assert await store.pool.fetchval("SELECT count(*) FROM reservations WHERE kind = 'request'") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM usage_records WHERE lease_id = $1", first.lease.id) == 8
    await assert_ledger_invariants(dsn)
    await wallet.close()
    assert (await _row(store, account))["reserved_nanos"] == 0
    await assert_ledger_invariants(dsn)


async def test_a_lease_takes_at_most_a_fraction_and_small_balances_reserve_per_request(ledger) -> None:
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 100_000)
    wallet = Wallet(store, LeaseConfig(fraction=0.25, min_requests=100))
    hold = await _hold(wallet, account, 10_000)
    assert hold.lease is not None and hold.lease.held == 25_000  # a quarter of what was available
    await _settle(wallet, hold, 10_000, account)
    # a hold of 60,000 needs 45,000 more than the lease's 15,000, but a quarter of the 75,000 available
    # is 18,750: the bucket is small for leasing at that size, so it is a per-request reservation
    big = [await _hold(wallet, account, 60_000)]
    assert [h.lease for h in big] == [None]
    rows = await store.pool.fetch("SELECT kind, amount_nanos FROM reservations WHERE status = 'open' ORDER BY kind")
    assert [(r["kind"], r["amount_nanos"]) for r in rows] == [("lease", 15_000), ("request", 60_000)]
    for h in big:
        await _settle(wallet, h, 1, account)
    await wallet.close()
    await assert_ledger_invariants(dsn)


async def test_a_refusal_comes_only_after_the_own_lease_is_returned(ledger) -> None:
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 100_000)
    wallet = Wallet(store, LeaseConfig(fraction=1.0, min_requests=10))
    hold = await _hold(wallet, account, 9_000)  # the lease takes 90,000 of 100,000
    assert hold.lease is not None and hold.lease.held == 90_000
    # a request under a budget holds money apart from that lease (its own lease key): 50,000 fits only
    # if the first lease gives back its unused 81,000 first
    big = await _hold(wallet, account, 50_000, (BudgetLimit("key:k1", "total", 10**9),))
    assert big.lease is None
    row = await _row(store, account)
    assert row["reserved_nanos"] == 9_000 + 50_000  # the carved hold stays; the rest went back
    with pytest.raises(InsufficientBalance) as refused:
        await _hold(wallet, account, 50_000)
    assert refused.value.extra["available_nanos"] < 50_000  # genuine: the database said so after the give-back
    # while the bucket is under pressure, the next refusal is one query (no give-back round, no NOTIFY)
    queries = store.pool.acquired
    with pytest.raises(InsufficientBalance):
        await _hold(wallet, account, 50_000)
    assert store.pool.acquired - queries == 1
    await _settle(wallet, hold, 9_000, account)
    await _settle(wallet, big, 50_000, account)
    await asyncio.sleep(0)  # the drained, retired lease closes in the background
    await wallet.close()
    assert await _row(store, account) == {"balance_nanos": 41_000, "reserved_nanos": 0}
    await assert_ledger_invariants(dsn)


async def test_other_processes_give_back_on_pressure(ledger) -> None:
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 100_000)
    a = Wallet(store, LeaseConfig(fraction=0.5, min_requests=10, giveback_wait_s=1.0))
    b = Wallet(store, LeaseConfig(fraction=0.5, min_requests=10, giveback_wait_s=1.0))
    held_a = await _hold(a, account, 4_000)
    assert held_a.lease is not None and held_a.lease.held == 40_000
    # B needs 70,000: only if A gives back its unused 36,000. A hears of it by NOTIFY (here: by hand,
    # as notify.handle would call it) while B waits.
    sent: list[str] = []
    real_notify = store.notify

    async def notify(payload: str) -> None:
        sent.append(payload)
        await real_notify(payload)
        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(
            a.on_pressure(payload[len(PRESSURE_PREFIX):])))

    store.notify = notify  # type: ignore[method-assign]
    held_b = await _hold(b, account, 70_000)
    assert sent == [f"{PRESSURE_PREFIX}{account}\tcredit"] and held_b.lease is None
    assert not a.leases() or all(lease.free == 0 for lease in a.leases())
    # A, under pressure, now reserves per request too (no new lease for a while)
    again = await _hold(a, account, 1_000)
    assert again.lease is None
    for wallet, hold in ((a, held_a), (b, held_b), (a, again)):
        await _settle(wallet, hold, hold.amount_nanos, account)
    await a.close()
    await b.close()
    assert await _row(store, account) == {"balance_nanos": 100_000 - 75_000, "reserved_nanos": 0}
    await assert_ledger_invariants(dsn)


async def test_budgets_are_held_by_the_lease_and_never_exceeded(ledger) -> None:
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 10_000_000)
    budget = (BudgetLimit("key:k1", "total", 50_000),)
    wallet = Wallet(store, LeaseConfig(fraction=1.0, min_requests=100))
    hold = await _hold(wallet, account, 10_000, budget)
    assert hold.lease is not None and hold.lease.held == 50_000  # capped by the budget, not the balance
    holds = [hold] + [await _hold(wallet, account, 10_000, budget) for _ in range(4)]
    with pytest.raises(BudgetExceeded):
        await _hold(wallet, account, 10_000, budget)
    for h in holds:
        await _settle(wallet, h, 10_000, account)
    spent = await store.pool.fetchval("SELECT spent_nanos FROM budgets WHERE scope = 'key:k1'")
    assert spent == 50_000
    with pytest.raises(BudgetExceeded):
        await _hold(wallet, account, 1, budget)
    await wallet.close()
    await assert_ledger_invariants(dsn)


async def test_idle_leases_go_back_and_a_dead_holders_lease_expires(ledger) -> None:
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 1_000_000)
    idle = Wallet(store, LeaseConfig(idle_s=0.2, tick_s=0.1))
    hold = await _hold(idle, account, 1_000)
    await _settle(idle, hold, 500, account)
    task = asyncio.create_task(idle.run())
    try:
        for _ in range(50):
            await asyncio.sleep(0.05)
            if not idle.leases():
                break
        assert not idle.leases()
        assert await _row(store, account) == {"balance_nanos": 999_500, "reserved_nanos": 0}
    finally:
        task.cancel()
    # a process that dies holding a lease (and a request carved from it): nothing is charged for the
    # request in flight, its lease is voided by the sweeper after the TTL, and the account gets it all back
    dead = Wallet(store, LeaseConfig(ttl_s=0.5))
    doomed = await _hold(dead, account, 2_000)
    assert doomed.lease is not None and (await _row(store, account))["reserved_nanos"] == 16_000
    await asyncio.sleep(0.6)
    assert await store.expire() == 1
    assert await _row(store, account) == {"balance_nanos": 999_500, "reserved_nanos": 0}
    status = await store.pool.fetchval("SELECT status FROM reservations WHERE id = $1", doomed.lease.id)
    assert status == "expired"
    # the request carved from it never left a usage record; settling it now is refused, nothing moves
    assert await store.pool.fetchval("SELECT count(*) FROM usage_records WHERE request_id = $1",
                                     doomed.request_id) == 0
    await assert_ledger_invariants(dsn)


async def test_concurrent_wallets_never_overspend_a_tight_account(ledger) -> None:
    store, accounts, dsn = ledger
    funded = 200_000
    account = await _funded(store, accounts, funded)
    wallets = [Wallet(store, LeaseConfig(fraction=0.25, min_requests=4, giveback_wait_s=0.2)) for _ in range(4)]
    outcomes: list[int] = []

    async def client(wallet: Wallet) -> None:
        for _ in range(15):
            try:
                hold = await _hold(wallet, account, 5_000)
            except InsufficientBalance:
                outcomes.append(-1)
                continue
            await asyncio.sleep(0.001)
            await _settle(wallet, hold, 4_000, account)
            outcomes.append(4_000)

    await asyncio.gather(*(client(w) for w in wallets for _ in range(4)))
    spent = sum(o for o in outcomes if o > 0)
    assert spent <= funded
    for wallet in wallets:
        await wallet.close()
    row = await _row(store, account)
    assert row == {"balance_nanos": funded - spent, "reserved_nanos": 0}
    assert funded - spent < 5_000 + 4 * 5_000, "refusals while money was still spendable"
    await assert_ledger_invariants(dsn)


async def test_a_lease_given_up_while_its_grant_is_on_the_way_is_still_handed_back(ledger) -> None:
    """A grant slower than the idle time (a loaded database) must not leave a lease nobody holds."""
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 1_000_000)
    wallet = Wallet(store, LeaseConfig(idle_s=0.0, tick_s=0.01))
    real_grow = store.lease_grow

    async def slow_grow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)
        return await real_grow(*args, **kwargs)

    store.lease_grow = slow_grow  # type: ignore[method-assign]
    holding = asyncio.create_task(_hold(wallet, account, 1_000))
    await asyncio.sleep(0.01)
    await wallet._tick()  # the upkeep runs while the first grant is on its way
    hold = await holding
    await _settle(wallet, hold, 1_000, account)
    for _ in range(5):  # idle now: every tick may give back
        await wallet._tick()
        await asyncio.sleep(0.06)
    assert not wallet.leases()
    assert await _row(store, account) == {"balance_nanos": 999_000, "reserved_nanos": 0}
    await assert_ledger_invariants(dsn)


async def test_a_charge_whose_lease_was_swept_is_posted_from_what_is_left_or_recorded_unbilled(ledger) -> None:
    """A process cut off from the database for longer than the lease TTL finds its lease voided: the
    charge comes from the bucket's available balance if it is still there; else the request is recorded
    with no charge (never lost, never charged twice)."""
    store, accounts, dsn = ledger
    account = await _funded(store, accounts, 100_000)
    wallet = Wallet(store, LeaseConfig(ttl_s=0.2, fraction=1.0, min_requests=2))
    first, second = await _hold(wallet, account, 20_000), await _hold(wallet, account, 20_000)
    assert first.lease is second.lease is not None
    await asyncio.sleep(0.3)
    assert await store.expire() == 1  # the sweeper voids the lease: its 40,000 are available again
    entry, balance = await _settle(wallet, first, 15_000, account)
    assert entry is not None and balance == 85_000
    lease_row = await store.pool.fetchrow("SELECT status, charged_nanos FROM reservations WHERE id = $1",
                                          first.lease.id)
    assert (lease_row["status"], lease_row["charged_nanos"]) == ("expired", 15_000)
    # the account spends the rest elsewhere; the second request can no longer be charged
    await store.reserve("elsewhere", account, "credit", 80_000)
    with pytest.raises(ReservationResolved):
        await _settle(wallet, second, 10_000, account)
    record = await store.pool.fetchrow("SELECT charge_nanos, ledger_entry_id FROM usage_records"
                                       " WHERE request_id = $1", second.request_id)
    assert record["charge_nanos"] == 0 and record["ledger_entry_id"] is None
    with pytest.raises(ReservationResolved):  # a replay moves nothing
        await store.lease_charge_late(first.lease.id, first.request_id, 15_000, _record(first.request_id, account), ())
    await store.finish("elsewhere", 0, None)
    await wallet.close()
    assert await _row(store, account) == {"balance_nanos": 85_000, "reserved_nanos": 0}
    await assert_ledger_invariants(dsn)


async def test_small_and_large_settlement_batches_agree(ledger) -> None:
    """Batches of up to 3 go item by item (tf_lease_finish_each), larger ones set-based
    (tf_lease_finish_many): one mixed batch through each, on twin accounts, gives the same answers
    and the same books."""
    store, accounts, dsn = ledger
    outcomes, books = [], []
    for function in ("tf_lease_finish_each", "tf_lease_finish_many"):
        account = await _funded(store, accounts, 1_000_000)
        open_lease, closed_lease = f"lease_open_{function}", f"lease_closed_{function}"
        for lease_id in (open_lease, closed_lease):
            grant = await store.lease_grow(lease_id, "h", account, "credit", want_nanos=100_000, min_nanos=1,
                                           fraction_ppm=1_000_000, ttl_s=60)
            assert grant.outcome == "ok"
        await store.lease_return({closed_lease: 100_000}, close=True)
        done = f"{function}_done"
        await store.lease_finish(open_lease, done, 1_000, _record(done, account))
        items = [(open_lease, "a", 5_000, True), (open_lease, "b", 0, True), (open_lease, "c", 0, False),
                 (open_lease, "a", 7_000, True), (open_lease, "done", 3_000, True),
                 (closed_lease, "d", 2_000, True), (closed_lease, "e", 0, True), (open_lease, "f", 1_000, True),
                 (open_lease, "g", 500_000, True)]
        request_ids = [f"{function}_{r}" for _, r, _, _ in items]
        rows = await store.pool.fetch(
            f"SELECT * FROM {function}($1, $2, $3, $4) ORDER BY idx", [i[0] for i in items], request_ids,
            [i[2] for i in items],
            [_record(rid, account) if i[3] else None for rid, i in zip(request_ids, items, strict=True)])
        outcomes.append([(r["outcome"], r["ledger_entry_id"] is not None, r["balance_after_nanos"]) for r in rows])
        books.append((
            tuple(await store.pool.fetchrow("SELECT balance_nanos, reserved_nanos FROM buckets"
                                            " WHERE account_id = $1 AND bucket = 'credit'", account)),
            tuple(await store.pool.fetchrow("SELECT amount_nanos, charged_nanos FROM reservations WHERE id = $1",
                                            open_lease)),
            await store.pool.fetchval("SELECT count(*) FROM usage_records WHERE account_id = $1", account),
            await store.pool.fetchval("SELECT count(*) FROM ledger_entries WHERE account_id = $1", account)))
    assert outcomes[0] == outcomes[1]
    assert [o[0] for o in outcomes[0]] == ["ok", "ok", "ok", "resolved", "resolved", "resolved", "ok", "ok",
                                           "charge_out_of_range"]
    assert books[0] == books[1] == ((1_000_000 - 7_000, 100_000 - 7_000), (100_000 - 7_000, 7_000), 5, 4)
    await assert_ledger_invariants(dsn)
