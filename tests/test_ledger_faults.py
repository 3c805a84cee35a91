"""The ledger under adversity, on a real PostgreSQL: poisoned receipts inside a group commit,
connections that drop after COMMIT (a TCP proxy really cuts them), an exhausted pool."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import orjson
import pytest

from tokensforge.accounts import AccountStore
from tokensforge.db import create_pool
from tokensforge.errors import (
    LedgerError, LedgerOutcomeUnknown, LedgerRejected, LedgerUnavailable, ReservationResolved,
)
from tokensforge.ledger.model import INT64_MAX, INT64_MIN, MAX_TEXT_CHARS, clean_record
from tokensforge.ledger.store import LedgerStore, _Hold

from .pgproxy import PgProxy

BUCKETS = ("credit", "routed")

# ---------------------------------------------------------------- clean_record (pure)

LONG = "x" * (MAX_TEXT_CHARS + 10)
CLEAN_CASES: list[tuple[str, Any, Any]] = [
    ("plain values pass unchanged", {"a": "b", "n": 5, "f": 1.5, "t": True, "z": None, "l": [1, "x"]},
     {"a": "b", "n": 5, "f": 1.5, "t": True, "z": None, "l": [1, "x"]}),
    ("NUL is stripped, nested too", {"error": {"message": "bad\x00 byte", "list": ["\x00"]}},
     {"error": {"message": "bad byte", "list": [""]}}),
    ("a lone surrogate becomes U+FFFD", {"m": "a\ud800b"}, {"m": "a\ufffdb"}),
    ("a split surrogate pair is joined", {"m": "\ud83d\ude00"}, {"m": "\U0001F600"}),
    ("keys are cleaned and made text", {"k\x00": 1, 7: 2}, {"k": 1, "7": 2}),
    ("bigint bounds are kept", {"a": INT64_MAX, "b": INT64_MIN}, {"a": INT64_MAX, "b": INT64_MIN}),
    ("integers beyond bigint become null", {"usage": {"prompt_tokens": 2**63, "completion_tokens": -(2**63) - 1,
                                                      "total_tokens": 10**40}},
     {"usage": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}}),
    ("bools are not integers", {"used": False}, {"used": False}),
    ("non-finite floats become null", {"a": math.nan, "b": math.inf}, {"a": None, "b": None}),
    ("absurd strings are capped", {"m": LONG}, {"m": LONG[:MAX_TEXT_CHARS - 1] + "…"}),
    ("latency_ms must fit PostgreSQL integer", {"latency_ms": 2**31}, {"latency_ms": None}),
    ("latency_ms float is truncated", {"latency_ms": 12.9}, {"latency_ms": 12}),
    ("reserved_nanos that is not a number is null", {"reserved_nanos": "lots"}, {"reserved_nanos": None}),
    ("tuples become lists, other types text", {"t": (1, 2), "d": Decimal("0.15")}, {"t": [1, 2], "d": "0.15"}),
    ("a float where the SQL casts to integer", {"reserved_nanos": 5.0}, {"reserved_nanos": 5}),
]


@pytest.mark.parametrize(("case", "record", "expected"), CLEAN_CASES, ids=[c[0] for c in CLEAN_CASES])
def test_clean_record(case: str, record: Any, expected: Any) -> None:
    assert orjson.loads(orjson.dumps(clean_record(record))) == expected  # what the jsonb codec sends


def test_a_storable_record_is_returned_as_it_is_and_inputs_are_never_changed() -> None:
    receipt = _record("req_1", "acct_1", usage={"prompt_tokens": 12, "completion_tokens": 30},
                      attempts=[{"channel": "a", "outcome": "ok", "status": 200, "latency_ms": 41}],
                      reserved_nanos=5_000_000, charge_nanos=0, price={"input_per_mtok": "0.15"}, error=None)
    assert clean_record(receipt) is receipt  # the hot path pays one orjson pass, no copy
    big = {**receipt, "balance_after_nanos": 2**62}  # past orjson's strict 53 bits: walked, kept
    assert clean_record(big) == big and clean_record(big) is not big
    record = {"m": "a\x00", "latency_ms": 7.0}
    assert clean_record(record) == {"m": "a", "latency_ms": 7} and record == {"m": "a\x00", "latency_ms": 7.0}


def test_clean_record_cuts_nesting_orjson_cannot_serialise() -> None:
    deep: Any = "leaf"
    for _ in range(300):
        deep = [deep]
    cleaned = clean_record({"deep": deep})
    depth, node = 1, cleaned["deep"]
    while isinstance(node, list):
        depth, node = depth + 1, node[0]
    assert depth == 254 and node is None
    orjson.dumps(cleaned)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
async def stores(dsn: str) -> AsyncIterator[tuple[LedgerStore, AccountStore]]:
    pool = await create_pool(dsn, max_size=8)
    try:
        # one batch in flight: everything submitted meanwhile shares the next transaction
        yield LedgerStore(pool, reservation_ttl_s=60, max_inflight_batches=1), AccountStore(pool)
    finally:
        await pool.close()


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[PgProxy]:
    proxy = PgProxy(dsn)
    try:
        yield proxy
    finally:
        await proxy.close()


async def _funded(accounts: AccountStore, ledger: LedgerStore, amount_nanos: int = 10**9) -> str:
    acct: str = (await accounts.create_account("acme", BUCKETS))["id"]
    await ledger.topup(acct, "credit", amount_nanos, "t", None)
    return acct


def _record(request_id: str, account_id: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "account_id": account_id, "status": "succeeded", "selected_model": "m",
            "route": {"id": "m/official", "kind": "official"}, "bucket": "credit", "latency_ms": 12, **extra}


POISONS: dict[str, dict[str, Any]] = {
    "nul": {"status": "failed", "error": {"code": "upstream_error", "message": "upstream said \x00 oops"}},
    "surrogate": {"error": {"message": "half an emoji \ud83d"}},
    "huge_usage": {"usage": {"prompt_tokens": 2**64 + 5, "completion_tokens": 1, "total_tokens": 2**64 + 6}},
    "bigint_cast": {"reserved_nanos": 2**63 + 1},
    "int_cast": {"latency_ms": 2**40},
}


async def _reserve_all(ledger: LedgerStore, acct: str, ids: list[str], amount_nanos: int = 1_000) -> None:
    for rid in ids:
        await ledger.reserve(rid, acct, "credit", amount_nanos)


# ---------------------------------------------------------------- 1. one bad settlement never fails its batch


async def test_poisoned_receipts_are_cleaned_and_settle_with_their_batch(stores) -> None:
    ledger, accounts = stores
    acct = await _funded(accounts, ledger)
    good = [f"req_ok{i}" for i in range(12)]
    bad = [f"req_{name}" for name in POISONS]
    await _reserve_all(ledger, acct, good + bad)
    order = good[:6] + bad + good[6:]
    poison = dict(zip(bad, POISONS.values(), strict=True))
    results = await asyncio.gather(*(
        ledger.finish(rid, 300, _record(rid, acct, **poison.get(rid, {}))) for rid in order))
    assert all(entry is not None for entry, _ in results)
    assert await ledger.balance(acct, "credit") == 10**9 - 300 * len(order)
    rows = {r["request_id"]: r for r in await ledger.pool.fetch("SELECT * FROM usage_records")}
    assert set(rows) == set(order)
    assert rows["req_nul"]["receipt"]["error"]["message"] == "upstream said  oops"
    assert rows["req_surrogate"]["receipt"]["error"]["message"] == "half an emoji \ufffd"
    assert rows["req_huge_usage"]["receipt"]["usage"]["prompt_tokens"] is None
    assert rows["req_bigint_cast"]["reserved_nanos"] == 0 and rows["req_int_cast"]["latency_ms"] is None


async def test_a_poisoned_settlement_past_the_cleaner_fails_alone(stores) -> None:
    ledger, accounts = stores
    acct = await _funded(accounts, ledger)
    good = [f"req_ok{i}" for i in range(10)]
    await _reserve_all(ledger, acct, good + ["req_nul", "req_sur", "req_check"])
    raw = ledger._settles.submit  # past the cleaner, straight into the group commit
    calls = [ledger.finish(rid, 250, _record(rid, acct)) for rid in good[:5]]
    calls += [raw(("req_nul", 250, _record("req_nul", acct, error={"message": "a\x00b"}))),
              raw(("req_sur", 250, _record("req_sur", acct, error={"message": "a\udfffb"}))),
              ledger.finish("req_check", 250, _record("req_check", acct, status="not-a-status"))]
    calls += [ledger.finish(rid, 250, _record(rid, acct)) for rid in good[5:]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 3 and all(isinstance(r, LedgerRejected) for r in failed), results
    assert await ledger.balance(acct, "credit") == 10**9 - 250 * len(good)
    statuses = dict(await ledger.pool.fetch("SELECT id, status FROM reservations"))
    assert all(statuses[rid] == "settled" for rid in good)
    assert statuses["req_nul"] == statuses["req_sur"] == statuses["req_check"] == "open"  # nothing moved
    for rid in ("req_nul", "req_sur", "req_check"):  # the cleaned retry goes through
        await ledger.finish(rid, 0, _record(rid, acct, status="failed"))


async def test_a_poisoned_reservation_fails_alone(stores) -> None:
    ledger, accounts = stores
    acct = await _funded(accounts, ledger, 100_000)
    calls: list[Any] = [ledger.reserve(f"req_g{i}", acct, "credit", 1_000) for i in range(6)]
    poisoned = _record("req_clean", acct, **POISONS["nul"])
    calls.append(ledger.reserve("req_clean", acct, "credit", 1_000, receipt=poisoned))
    calls.append(ledger._holds.submit(_Hold("req_raw", "req_raw", acct, "credit", 1_000, (),
                                            _record("req_raw", acct, **POISONS["nul"]))))
    calls += [ledger.reserve(f"req_h{i}", acct, "credit", 1_000) for i in range(6)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r) for r in results].count(LedgerRejected) == 1 and isinstance(results[7], LedgerRejected)
    assert await ledger.available(acct, "credit") == 100_000 - 13 * 1_000
    receipt = await ledger.pool.fetchval("SELECT receipt FROM reservations WHERE id = 'req_clean'")
    assert receipt["error"]["message"] == "upstream said  oops"


# ---------------------------------------------------------------- 2. ambiguous outcomes resolved by id


async def _through(proxy: PgProxy, **kwargs: Any) -> LedgerStore:
    pool = await create_pool(await proxy.start(), min_size=1, max_size=1)
    return LedgerStore(pool, reservation_ttl_s=60, **kwargs)


async def _warm(ledger: LedgerStore) -> None:
    """Prepare the settle statement (and asyncpg's type introspection) on the pool's one
    connection, so the next settle sends exactly one statement: the one the proxy cuts."""
    with pytest.raises(ReservationResolved):
        await ledger.finish("req_warmup", 0, None)


async def test_a_settlement_committed_before_the_connection_dropped_returns_its_real_result(stores, proxy) -> None:
    ledger, accounts = stores
    acct = await _funded(accounts, ledger)
    await _reserve_all(ledger, acct, ["req_s", "req_v"])
    faulty = await _through(proxy)
    try:
        await _warm(faulty)
        proxy.drop_next_reply()
        entry_id, balance = await faulty.finish("req_s", 700, _record("req_s", acct))
        assert proxy.drops == 1  # the reply really was lost
        charge = await ledger.entry(entry_id)
        assert charge["amount_nanos"] == -700 and charge["balance_after_nanos"] == balance == 10**9 - 700
        await _warm(faulty)
        proxy.drop_next_reply()
        entry_id, balance = await faulty.finish("req_v", 0, _record("req_v", acct, status="failed"))
        assert proxy.drops == 2 and entry_id is None and balance == 10**9 - 700
        outcome = await faulty.outcome("req_s")
        assert outcome is not None and outcome.status == "settled" and outcome.ledger_entry_id == charge["id"]
        assert outcome.charge_nanos == 700 and outcome.balance_after_nanos == 10**9 - 700
        assert outcome.receipt is not None and outcome.receipt["ledger_entry_id"] == charge["id"]
    finally:
        await faulty.pool.close()


async def test_a_settlement_lost_before_the_server_leaves_the_reservation_open(stores, proxy) -> None:
    ledger, accounts = stores
    acct = await _funded(accounts, ledger)
    await _reserve_all(ledger, acct, ["req_o"])
    faulty = await _through(proxy)
    try:
        await _warm(faulty)
        proxy.drop_next_request()
        with pytest.raises(LedgerUnavailable) as info:
            await faulty.finish("req_o", 700, _record("req_o", acct))
        assert proxy.drops == 1 and not isinstance(info.value, LedgerOutcomeUnknown)
        outcome = await faulty.outcome("req_o")
        assert outcome is not None and outcome.status == "open" and outcome.ledger_entry_id is None
        assert await ledger.balance(acct, "credit") == 10**9  # nothing was charged
        entry_id, _ = await faulty.finish("req_o", 700, _record("req_o", acct))  # a later retry settles it
        assert entry_id is not None
    finally:
        await faulty.pool.close()


async def test_an_outcome_that_cannot_be_looked_up_is_unknown_not_uncharged(stores, proxy) -> None:
    ledger, accounts = stores
    acct = await _funded(accounts, ledger)
    await _reserve_all(ledger, acct, ["req_u"])
    faulty = await _through(proxy, resolve_window_s=0.3)
    try:
        proxy.refuse_after_drop = True
        await _warm(faulty)
        proxy.drop_next_reply()
        started = time.monotonic()
        with pytest.raises(LedgerOutcomeUnknown):
            await faulty.finish("req_u", 700, _record("req_u", acct))
        assert time.monotonic() - started < 3.0
        proxy.refuse = False
        outcome = await faulty.outcome("req_u")
        assert outcome is not None and outcome.status == "settled" and outcome.charge_nanos == 700
    finally:
        await faulty.pool.close()


async def test_outcome_of_open_and_unknown_reservations(stores) -> None:
    ledger, accounts = stores
    acct = await _funded(accounts, ledger)
    assert await ledger.outcome("req_nope") is None
    await ledger.reserve("req_1", acct, "credit", 500)
    outcome = await ledger.outcome("req_1")
    assert outcome is not None and (outcome.status, outcome.charge_nanos, outcome.receipt) == ("open", 0, None)
    await ledger.finish("req_1", 0, None)
    outcome = await ledger.outcome("req_1")
    assert outcome is not None and outcome.status == "voided" and outcome.balance_after_nanos == 10**9


# ---------------------------------------------------------------- 3. pool acquire timeout


async def test_an_exhausted_pool_fails_closed_after_the_acquire_timeout(dsn: str) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    ledger = LedgerStore(pool, acquire_timeout_s=0.2, resolve_window_s=5.0)
    try:
        async with pool.acquire():  # someone holds the only connection
            for call in (ledger.balances("acct_x"), ledger.available("acct_x", "credit"),
                         ledger.reserve("req_p", "acct_x", "credit", 1), ledger.finish("req_p", 0, None),
                         ledger.outcome("req_p")):
                started = time.monotonic()
                with pytest.raises(LedgerUnavailable) as info:
                    await call
                # an acquire that timed out sent nothing: no lookup of an ambiguous outcome
                assert time.monotonic() - started < 2.0 and not isinstance(info.value, LedgerOutcomeUnknown)
        assert await ledger.balances("acct_x") == []  # the pool works again once released
    finally:
        await pool.close()


def test_an_unknown_outcome_is_still_ledger_unavailable_to_callers() -> None:
    assert issubclass(LedgerRejected, LedgerError) and issubclass(LedgerOutcomeUnknown, LedgerUnavailable)


async def test_a_leased_settlement_whose_reply_was_lost_is_resolved_through_its_usage_record(stores, proxy) -> None:
    """A leased request has no reservation row: a lost reply is looked up by its usage record."""
    ledger, accounts = stores
    acct = await _funded(accounts, ledger)
    grant = await ledger.lease_grow("lease_x", "h", acct, "credit", want_nanos=100_000, min_nanos=1,
                                    fraction_ppm=1_000_000, ttl_s=60)
    assert grant.outcome == "ok"
    faulty = await _through(proxy)
    try:
        with pytest.raises(ReservationResolved):  # warm: the settle statement is prepared on the one connection
            await faulty.lease_finish("lease_gone", "req_warm", 5, None)
        proxy.drop_next_reply()
        entry_id, balance = await faulty.lease_finish("lease_x", "req_l", 700, _record("req_l", acct))
        assert proxy.drops == 1
        charge = await ledger.entry(entry_id)
        assert charge["amount_nanos"] == -700 and charge["balance_after_nanos"] == balance == 10**9 - 700
        with pytest.raises(ReservationResolved):  # a replay moves nothing (and warms the connection again)
            await faulty.lease_finish("lease_x", "req_l", 700, _record("req_l", acct))
        proxy.drop_next_request()
        with pytest.raises(LedgerUnavailable) as info:  # lost before the server: not posted, not unknown
            await faulty.lease_finish("lease_x", "req_m", 300, _record("req_m", acct))
        assert proxy.drops == 2 and not isinstance(info.value, LedgerOutcomeUnknown)
        assert await ledger.balance(acct, "credit") == 10**9 - 700
    finally:
        await faulty.pool.close()
    await ledger.lease_return({"lease_x": 10**9}, close=True)
