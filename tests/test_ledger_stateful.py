"""The ledger against a pure Python model: random top-ups, reservations, settlements, voids and expiries.

A hypothesis RuleBasedStateMachine drives a real LedgerStore on a fresh database per example
(cloned from the session's migrated template) and, after every step, checks the database
against the model and the SPEC §5 invariants. Rejected operations must change nothing.

The machine is synchronous and the store is asyncio: the machine owns a private event loop
and runs every database call to completion on it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test,
)

from tokensforge.accounts import AccountStore
from tokensforge.db import create_pool
from tokensforge.errors import (
    BudgetExceeded, IdempotencyConflict, InsufficientBalance, LedgerError, ReservationResolved,
)
from tokensforge.ledger.model import BudgetLimit
from tokensforge.ledger.store import LedgerStore

from .invariants import assert_ledger_invariants

T = TypeVar("T")

ACCOUNTS = ("acct_0", "acct_1", "acct_2")
BUCKETS = ("credit", "routed")
TOPUP_KEYS = ("k0", "k1", "k2", "k3")
TOPUP_AMOUNTS = (1, 999, 20_000, 123_457, 1_000_000)
# Budget scopes with fixed limits, all over the whole lifetime ("total" period: no clock involved).
BUDGET_LIMITS = {"key:k1": 25_000, "project:p1": 60_000, "key:zero": 0}
# What an upstream may put into a receipt that jsonb or the usage record's columns refuse; the
# store cleans it, so a settlement behaves exactly as with a clean receipt.
JUNK: tuple[dict[str, Any], ...] = (
    {}, {"error": {"message": "upstream \x00 said"}}, {"error": {"message": "half an emoji \ud83d"}},
    {"usage": {"prompt_tokens": 2**64, "completion_tokens": 1}}, {"latency_ms": 2**40}, {"reserved_nanos": 2**63},
)
BUDGET_CHOICES: tuple[tuple[str, ...], ...] = (
    (), ("key:k1",), ("project:p1",), ("key:k1", "project:p1"), ("project:p1", "key:k1"), ("key:zero",),
)


@dataclass
class Res:
    account: str
    bucket: str
    amount: int
    scopes: tuple[str, ...]
    short_ttl: bool
    receipt: bool
    status: str = "open"


@dataclass
class LeaseRow:
    account: str
    bucket: str
    scopes: tuple[str, ...]
    short_ttl: bool
    amount: int = 0
    charged: int = 0
    status: str = "open"


@dataclass
class Model:
    balance: dict[tuple[str, str], int] = field(default_factory=lambda: {(a, b): 0 for a in ACCOUNTS for b in BUCKETS})
    reserved: dict[tuple[str, str], int] = field(default_factory=lambda: {(a, b): 0 for a in ACCOUNTS for b in BUCKETS})
    budget_spent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUDGET_LIMITS, 0))
    budget_reserved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUDGET_LIMITS, 0))
    topups: dict[tuple[str, str], tuple[str, int, str]] = field(default_factory=dict)  # → (bucket, amount, entry id)
    reservations: dict[str, Res] = field(default_factory=dict)
    leases: dict[str, LeaseRow] = field(default_factory=dict)
    entries: int = 0
    usage_records: int = 0

    def available(self, account: str, bucket: str) -> int:
        return self.balance[account, bucket] - self.reserved[account, bucket]

    def leased(self, account: str, bucket: str) -> int:
        return sum(x.amount for x in self.leases.values() if x.status == "open" and (x.account, x.bucket) == (
            account, bucket))

    def open_leases(self) -> list[str]:
        return sorted(i for i, x in self.leases.items() if x.status == "open")

    def move_lease(self, lease_id: str, taken: int, charged: int) -> None:
        """A lease grows by `taken` (negative: gives back) and pays `charged` out of what it holds."""
        x = self.leases[lease_id]
        x.amount += taken - charged
        x.charged += charged
        self.reserved[x.account, x.bucket] += taken - charged
        self.balance[x.account, x.bucket] -= charged
        for scope in x.scopes:
            self.budget_reserved[scope] += taken - charged
            self.budget_spent[scope] += charged
        if charged:
            self.entries += 1

    def open(self) -> list[str]:
        return sorted(rid for rid, r in self.reservations.items() if r.status == "open")

    def resolved(self) -> list[str]:
        return sorted(rid for rid, r in self.reservations.items() if r.status != "open")

    def release(self, rid: str, charge: int, status: str) -> None:
        r = self.reservations[rid]
        assert r.status == "open"
        r.status = status
        self.reserved[r.account, r.bucket] -= r.amount
        self.balance[r.account, r.bucket] -= charge
        for scope in r.scopes:
            self.budget_reserved[scope] -= r.amount
            self.budget_spent[scope] += charge
        if charge > 0:
            self.entries += 1


async def _snapshot(conn: asyncpg.Connection) -> tuple[Any, ...]:
    """Everything a money operation could touch."""
    buckets = [tuple(r) for r in await conn.fetch(
        "SELECT account_id, bucket, balance_nanos, reserved_nanos FROM buckets ORDER BY 1, 2")]
    budgets = [tuple(r) for r in await conn.fetch(
        "SELECT scope, period, spent_nanos, reserved_nanos FROM budgets"
        " WHERE spent_nanos <> 0 OR reserved_nanos <> 0 ORDER BY 1, 2")]
    reservations = [tuple(r) for r in await conn.fetch(
        "SELECT id, status, amount_nanos FROM reservations ORDER BY id")]
    counts = tuple(await conn.fetchrow(
        "SELECT (SELECT count(*) FROM ledger_entries), (SELECT coalesce(max(seq), 0) FROM ledger_entries),"
        " (SELECT count(*) FROM usage_records), (SELECT count(*) FROM topups)"))
    return buckets, budgets, reservations, counts


class LedgerMachine(RuleBasedStateMachine):
    admin_dsn: ClassVar[str] = ""
    template: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.counter = 0
        self.loop = asyncio.new_event_loop()
        self.dbname = "sm_" + secrets.token_hex(6)
        self.pool: asyncpg.Pool | None = None
        self.conn: Any = None
        try:
            self.run(self._setup())
        except BaseException:
            self.teardown()
            raise

    # ------------------------------------------------------------ plumbing

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _setup(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"CREATE DATABASE {self.dbname} TEMPLATE {self.template}")
        finally:
            await admin.close()
        dsn = self.admin_dsn.rsplit("/", 1)[0] + "/" + self.dbname
        assert self.admin_dsn.rsplit("/", 1)[1].startswith("postgres")
        self.pool = await create_pool(dsn, min_size=1, max_size=4)
        self.ledger = LedgerStore(self.pool, reservation_ttl_s=600)
        self.short_ledger = LedgerStore(self.pool, reservation_ttl_s=0.0)  # expires at once
        accounts = AccountStore(self.pool)
        for account in ACCOUNTS:
            await accounts.create_account(account, BUCKETS, account_id=account)
        self.conn = await self.pool.acquire()

    async def _teardown(self) -> None:
        if self.pool is not None:
            if self.conn is not None:
                await self.pool.release(self.conn)
            await self.pool.close()
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)")
        finally:
            await admin.close()

    def teardown(self) -> None:
        try:
            self.run(self._teardown())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def snapshot(self) -> tuple[Any, ...]:
        return self.run(_snapshot(self.conn))

    def record(self, rid: str, account: str, status: str, bucket: str = "credit") -> dict[str, Any]:
        return {"request_id": rid, "account_id": account, "status": status, "selected_model": "m",
                "route": {"id": "m/official", "kind": "official"}, "bucket": bucket}

    def new_rid(self) -> str:
        self.counter += 1
        return f"req_{self.counter}"

    # ------------------------------------------------------------ top-ups

    @initialize(amounts=st.lists(st.integers(0, 200_000), min_size=len(ACCOUNTS) * len(BUCKETS),
                                 max_size=len(ACCOUNTS) * len(BUCKETS)))
    def fund(self, amounts: list[int]) -> None:
        """Start most buckets with some money, so reservations mostly have something to hold."""
        for (account, bucket), amount in zip([(a, b) for a in ACCOUNTS for b in BUCKETS], amounts, strict=True):
            if amount:
                entry, created = self.run(self.ledger.topup(account, bucket, amount, f"init-{bucket}", None))
                assert created and entry["balance_after_nanos"] == amount
                self.model.balance[account, bucket] += amount
                self.model.entries += 1
                self.model.topups[account, f"init-{bucket}"] = (bucket, amount, entry["id"])

    @rule(account=st.sampled_from(ACCOUNTS), bucket=st.sampled_from(BUCKETS),
          amount=st.sampled_from(TOPUP_AMOUNTS), key=st.sampled_from(TOPUP_KEYS))
    def topup(self, account: str, bucket: str, amount: int, key: str) -> None:
        """A top-up with a key from a small pool: new, replay or conflict, as the model says."""
        prior = self.model.topups.get((account, key))
        if prior is None:
            entry, created = self.run(self.ledger.topup(account, bucket, amount, key, "note"))
            assert created
            self.model.balance[account, bucket] += amount
            self.model.entries += 1
            self.model.topups[account, key] = (bucket, amount, entry["id"])
            assert entry["kind"] == "topup" and entry["amount_nanos"] == amount
            assert entry["bucket"] == bucket and entry["account_id"] == account
            assert entry["idempotency_key"] == key
            assert entry["balance_after_nanos"] == self.model.balance[account, bucket]
        elif prior[:2] == (bucket, amount):
            self._replay(account, key)
        else:
            self._conflict(account, key, bucket, amount)

    @precondition(lambda self: bool(self.model.topups))
    @rule(data=st.data())
    def replay_topup(self, data: st.DataObject) -> None:
        account, key = data.draw(st.sampled_from(sorted(self.model.topups)))
        self._replay(account, key)

    @precondition(lambda self: bool(self.model.topups))
    @rule(data=st.data(), other_bucket=st.booleans(), delta=st.integers(1, 1_000))
    def conflicting_topup(self, data: st.DataObject, other_bucket: bool, delta: int) -> None:
        account, key = data.draw(st.sampled_from(sorted(self.model.topups)))
        bucket, amount, _ = self.model.topups[account, key]
        if other_bucket:
            bucket = next(b for b in BUCKETS if b != bucket)
        else:
            amount += delta
        self._conflict(account, key, bucket, amount)

    def _replay(self, account: str, key: str) -> None:
        bucket, amount, entry_id = self.model.topups[account, key]
        before = self.snapshot()
        entry, created = self.run(self.ledger.topup(account, bucket, amount, key, "replayed note"))
        assert not created
        assert entry["id"] == entry_id and entry["amount_nanos"] == amount and entry["bucket"] == bucket
        assert self.snapshot() == before  # the same key never credits twice

    def _conflict(self, account: str, key: str, bucket: str, amount: int) -> None:
        before = self.snapshot()
        with pytest.raises(IdempotencyConflict) as info:
            self.run(self.ledger.topup(account, bucket, amount, key, "conflict"))
        assert info.value.param == "idempotency_key" and info.value.status == 409
        assert self.snapshot() == before

    # ------------------------------------------------------------ reservations

    @rule(account=st.sampled_from(ACCOUNTS), bucket=st.sampled_from(BUCKETS),
          amount=st.one_of(st.integers(0, 30_000), st.sampled_from([0, 1, 999, 5_000])),
          scopes=st.sampled_from(BUDGET_CHOICES), short_ttl=st.booleans(), receipt=st.booleans())
    def reserve(self, account: str, bucket: str, amount: int, scopes: tuple[str, ...],
                short_ttl: bool, receipt: bool) -> None:
        self._reserve(account, bucket, amount, scopes, short_ttl, receipt)

    @precondition(lambda self: any(self.model.available(a, b) > 0 for a in ACCOUNTS for b in BUCKETS))
    @rule(data=st.data(), percent=st.integers(0, 100), scopes=st.sampled_from(BUDGET_CHOICES),
          short_ttl=st.booleans(), receipt=st.booleans())
    def reserve_part_of_available(self, data: st.DataObject, percent: int, scopes: tuple[str, ...],
                                  short_ttl: bool, receipt: bool) -> None:
        """Reserve up to everything that is available in a funded bucket (often within budget)."""
        funded = [(a, b) for a in ACCOUNTS for b in BUCKETS if self.model.available(a, b) > 0]
        account, bucket = data.draw(st.sampled_from(funded))
        amount = self.model.available(account, bucket) * percent // 100
        if scopes:
            amount = min(amount, data.draw(st.integers(0, 20_000), label="budget-sized"))
        self._reserve(account, bucket, amount, scopes, short_ttl, receipt)

    def _reserve(self, account: str, bucket: str, amount: int, scopes: tuple[str, ...],
                 short_ttl: bool, receipt: bool) -> None:
        rid = self.new_rid()
        store = self.short_ledger if short_ttl else self.ledger
        budgets = [BudgetLimit(s, "total", BUDGET_LIMITS[s]) for s in scopes]
        # The database checks the budgets (in order) before the bucket.
        over = next((s for s in scopes
                     if self.model.budget_spent[s] + self.model.budget_reserved[s] + amount > BUDGET_LIMITS[s]),
                    None)
        coro = store.reserve(rid, account, bucket, amount, budgets,
                             receipt=self.record(rid, account, "failed") if receipt else None)
        if over is not None:
            before = self.snapshot()
            with pytest.raises(BudgetExceeded) as binfo:
                self.run(coro)
            used = self.model.budget_spent[over] + self.model.budget_reserved[over]
            assert binfo.value.status == 403 and binfo.value.code == "budget_exceeded"
            assert binfo.value.extra == {"budget_scope": over.split(":")[0], "needed_nanos": amount,
                                         "remaining_nanos": max(BUDGET_LIMITS[over] - used, 0)}
            assert self.snapshot() == before
            return
        if amount > self.model.available(account, bucket):
            self._insufficient(coro, account, bucket, amount)
            return
        available = self.run(coro)
        self.model.reservations[rid] = Res(account, bucket, amount, scopes, short_ttl, receipt)
        self.model.reserved[account, bucket] += amount
        for scope in scopes:
            self.model.budget_reserved[scope] += amount
        assert available == self.model.available(account, bucket)

    @rule(account=st.sampled_from(ACCOUNTS), bucket=st.sampled_from(BUCKETS), extra=st.integers(1, 10**9))
    def reserve_too_much(self, account: str, bucket: str, extra: int) -> None:
        amount = self.model.available(account, bucket) + extra
        rid = self.new_rid()
        self._insufficient(self.ledger.reserve(rid, account, bucket, amount), account, bucket, amount)

    def _insufficient(self, coro: Coroutine[Any, Any, int], account: str, bucket: str, amount: int) -> None:
        before = self.snapshot()
        with pytest.raises(InsufficientBalance) as info:
            self.run(coro)
        assert info.value.status == 402
        assert info.value.extra == {"bucket": bucket, "needed_nanos": amount,
                                    "available_nanos": self.model.available(account, bucket)}
        assert self.snapshot() == before

    @precondition(lambda self: bool(self.model.reservations))
    @rule(data=st.data())
    def reserve_with_a_used_id(self, data: st.DataObject) -> None:
        """A reservation id is used once; a second reserve under it is refused and moves nothing."""
        rid = data.draw(st.sampled_from(sorted(self.model.reservations)))
        account = ACCOUNTS[0]
        bucket = max(BUCKETS, key=lambda b: self.model.available(account, b))
        amount = min(1, self.model.available(account, bucket))
        before = self.snapshot()
        with pytest.raises(LedgerError, match="already used"):
            self.run(self.ledger.reserve(rid, account, bucket, amount))
        assert self.snapshot() == before

    # ------------------------------------------------------------ settle / void / expire

    @precondition(lambda self: bool(self.model.open()))
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.model.open()))
        r = self.model.reservations[rid]
        charge = data.draw(st.one_of(st.integers(0, r.amount), st.just(r.amount)), label="charge")
        junk = data.draw(st.sampled_from(JUNK), label="junk")
        entry_id, balance_after = self.run(
            self.ledger.finish(rid, charge, {**self.record(rid, r.account, "succeeded"), **junk}))
        self.model.release(rid, charge, "settled" if charge > 0 else "voided")
        self.model.usage_records += 1
        assert balance_after == self.model.balance[r.account, r.bucket]
        assert (entry_id is None) == (charge == 0)
        if entry_id is not None:
            entry = self.run(self.ledger.entry(entry_id))
            assert entry["kind"] == "charge" and entry["amount_nanos"] == -charge
            assert entry["request_id"] == rid and entry["balance_after_nanos"] == balance_after
        usage = self.run(self.conn.fetchrow(
            "SELECT charge_nanos, ledger_entry_id FROM usage_records WHERE request_id = $1", rid))
        assert usage["charge_nanos"] == charge and usage["ledger_entry_id"] == entry_id
        outcome = self.run(self.ledger.outcome(rid))  # what a caller that lost the reply would learn
        assert outcome is not None and outcome.status == ("settled" if charge > 0 else "voided")
        assert (outcome.ledger_entry_id, outcome.charge_nanos, outcome.balance_after_nanos) == (
            entry_id, charge, balance_after)

    @precondition(lambda self: bool(self.model.open()))
    @rule(data=st.data(), with_record=st.booleans())
    def void(self, data: st.DataObject, with_record: bool) -> None:
        rid = data.draw(st.sampled_from(self.model.open()))
        r = self.model.reservations[rid]
        record = self.record(rid, r.account, "failed") if with_record else None
        entry_id, balance_after = self.run(self.ledger.finish(rid, 0, record))
        self.model.release(rid, 0, "voided")
        self.model.usage_records += with_record
        assert entry_id is None and balance_after == self.model.balance[r.account, r.bucket]

    @precondition(lambda self: bool(self.model.open()))
    @rule(data=st.data(), extra=st.integers(1, 10**6))
    def overcharge(self, data: st.DataObject, extra: int) -> None:
        rid = data.draw(st.sampled_from(self.model.open()))
        r = self.model.reservations[rid]
        before = self.snapshot()
        with pytest.raises(LedgerError, match="outside reservation"):
            self.run(self.ledger.finish(rid, r.amount + extra, self.record(rid, r.account, "succeeded")))
        assert self.snapshot() == before  # still open, nothing charged

    @precondition(lambda self: bool(self.model.resolved()))
    @rule(data=st.data(), charge=st.integers(0, 10))
    def finish_twice(self, data: st.DataObject, charge: int) -> None:
        rid = data.draw(st.sampled_from(self.model.resolved()))
        r = self.model.reservations[rid]
        before = self.snapshot()
        with pytest.raises(ReservationResolved):
            self.run(self.ledger.finish(rid, min(charge, r.amount), self.record(rid, r.account, "succeeded")))
        assert self.snapshot() == before

    @rule()
    def finish_unknown(self) -> None:
        before = self.snapshot()
        with pytest.raises(ReservationResolved):
            self.run(self.ledger.finish("req_never_reserved", 0, None))
        assert self.snapshot() == before

    @precondition(lambda self: any(self.model.reservations[rid].short_ttl for rid in self.model.open())
                  or any(self.model.leases[i].short_ttl for i in self.model.open_leases()))
    @rule()
    def expire(self) -> None:
        """The sweeper voids exactly the reservations and leases past their TTL (the 0 s ones), never others."""
        due = [rid for rid in self.model.open() if self.model.reservations[rid].short_ttl]
        due_leases = [i for i in self.model.open_leases() if self.model.leases[i].short_ttl]
        count = self.run(self.ledger.expire())
        assert count == len(due) + len(due_leases)
        for rid in due:
            self.model.release(rid, 0, "expired")
            if self.model.reservations[rid].receipt:
                self.model.usage_records += 1
        for lease_id in due_leases:
            self.model.move_lease(lease_id, -self.model.leases[lease_id].amount, 0)
            self.model.leases[lease_id].status = "expired"

    # ------------------------------------------------------------ leases

    @rule(data=st.data(), account=st.sampled_from(ACCOUNTS), bucket=st.sampled_from(BUCKETS),
          want=st.integers(0, 120_000), need=st.integers(0, 40_000), ppm=st.sampled_from([0, 250_000, 1_000_000]),
          scopes=st.sampled_from(BUDGET_CHOICES), short_ttl=st.booleans(), reuse=st.booleans())
    def take_lease(self, data: st.DataObject, account: str, bucket: str, want: int, need: int, ppm: int,
                   scopes: tuple[str, ...], short_ttl: bool, reuse: bool) -> None:
        """Take a new lease or grow one (open or not): the grant is what the rule says, or nothing moves."""
        same = sorted(i for i, x in self.model.leases.items() if (x.account, x.bucket, x.scopes) == (
            account, bucket, scopes))
        lease_id = data.draw(st.sampled_from(same)) if reuse and same else f"lease_{self.new_rid()}"
        prior = self.model.leases.get(lease_id)
        available = self.model.available(account, bucket)
        room = min([BUDGET_LIMITS[s] - self.model.budget_spent[s] - self.model.budget_reserved[s] for s in scopes],
                   default=2**63 - 1)
        grant = min(want, available * ppm // 1_000_000, room)
        expected = ("stale" if prior is not None and prior.status != "open" else
                    "insufficient_balance" if available < need else
                    "budget_exceeded" if room < need else "small" if grant < need else "ok")
        before = self.snapshot()
        got = self.run(self.ledger.lease_grow(
            lease_id, "holder-1", account, bucket, want_nanos=want, min_nanos=need, fraction_ppm=ppm,
            ttl_s=0.0 if short_ttl else 600.0,
            budgets=[BudgetLimit(s, "total", BUDGET_LIMITS[s]) for s in scopes]))
        assert got.outcome == expected, (got, available, room, grant)
        if expected != "ok":
            assert self.snapshot() == before
            return
        if prior is None:
            self.model.leases[lease_id] = LeaseRow(account, bucket, scopes, short_ttl)
        else:
            prior.short_ttl = short_ttl  # a grow renews the lease for its TTL
        self.model.move_lease(lease_id, grant, 0)
        assert got.granted_nanos == grant and got.lease_nanos == self.model.leases[lease_id].amount
        assert got.available_nanos == self.model.available(account, bucket)

    @precondition(lambda self: bool(self.model.leases))
    @rule(data=st.data(), over=st.integers(0, 3), with_record=st.booleans())
    def settle_against_lease(self, data: st.DataObject, over: int, with_record: bool) -> None:
        """A request carved from a lease settles against it; a charge beyond the lease, or on a lease no
        longer open, moves nothing (a zero charge only needs its record)."""
        lease_id = data.draw(st.sampled_from(sorted(self.model.leases)))
        x = self.model.leases[lease_id]
        charge = data.draw(st.integers(0, x.amount)) + (over if over > 2 else 0)
        rid = self.new_rid()
        record = self.record(rid, x.account, "succeeded", x.bucket) if with_record or charge > 0 else None
        before = self.snapshot()
        if charge > 0 and (x.status != "open" or charge > x.amount):
            error = ReservationResolved if x.status != "open" else LedgerError
            with pytest.raises(error):
                self.run(self.ledger.lease_finish(lease_id, rid, charge, record))
            assert self.snapshot() == before
            return
        entry_id, balance_after = self.run(self.ledger.lease_finish(lease_id, rid, charge, record))
        self.model.move_lease(lease_id, 0, charge)
        self.model.usage_records += record is not None
        assert balance_after == self.model.balance[x.account, x.bucket]
        assert (entry_id is None) == (charge == 0)
        if record is not None:  # a replay of the same settlement moves nothing
            replay_before = self.snapshot()
            with pytest.raises(ReservationResolved):
                self.run(self.ledger.lease_finish(lease_id, rid, charge, record))
            assert self.snapshot() == replay_before

    @precondition(lambda self: bool(self.model.leases))
    @rule(data=st.data(), amount=st.integers(-5, 150_000), close=st.booleans())
    def return_lease(self, data: st.DataObject, amount: int, close: bool) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.model.leases)))
        x = self.model.leases[lease_id]
        left = self.run(self.ledger.lease_return({lease_id: amount}, close=close))
        if x.status != "open":
            assert left == {lease_id: None}
            return
        give = min(max(amount, 0), x.amount)
        self.model.move_lease(lease_id, -give, 0)
        if close and x.amount == 0:
            x.status = "voided"
        assert left == {lease_id: x.amount}

    # ------------------------------------------------------------ after every step

    @invariant()
    def database_matches_model(self) -> None:
        buckets, budgets, reservations, counts = self.snapshot()
        got = {(a, b): (bal, res) for a, b, bal, res in buckets}
        want = {k: (self.model.balance[k], self.model.reserved[k]) for k in self.model.balance}
        assert got == want
        for (a, b), (bal, res) in got.items():
            assert bal - res >= 0, (a, b)
            assert self.run(self.ledger.available(a, b)) == bal - res + self.model.leased(a, b)
        want_budgets = sorted(
            (s, "total", self.model.budget_spent[s], self.model.budget_reserved[s]) for s in BUDGET_LIMITS
            if self.model.budget_spent[s] or self.model.budget_reserved[s])
        assert budgets == want_budgets
        assert [(rid, status) for rid, status, _ in reservations] == sorted(
            [(rid, r.status) for rid, r in self.model.reservations.items()]
            + [(i, x.status) for i, x in self.model.leases.items()])
        amounts = {rid: amount for rid, _, amount in reservations}
        assert all(amounts[i] == x.amount for i, x in self.model.leases.items() if x.status == "open")
        entries, _, usage, topups = counts
        assert (entries, usage, topups) == (self.model.entries, self.model.usage_records, len(self.model.topups))

    @invariant()
    def budgets_are_never_exceeded(self) -> None:
        for scope, limit in BUDGET_LIMITS.items():
            assert self.model.budget_spent[scope] + self.model.budget_reserved[scope] <= limit

    @invariant()
    def spec_invariants_hold(self) -> None:
        self.run(assert_ledger_invariants(self.conn))


def test_ledger_state_machine(pg: Any, template_db: str) -> None:
    LedgerMachine.admin_dsn = pg.admin_dsn("postgres")
    LedgerMachine.template = template_db
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
