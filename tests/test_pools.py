"""Pools (SPEC §1, §5.8): subscriptions and the free research allowance, on a database clock the tests move.

The schedule runs in the database (migrations/0003_pools.sql); `tf_clock` shifts `tf_now()`, so a
test can stand at any instant: a grant at period start, a lapse at period end, a gap of many periods.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tokensforge.catalog import RESEARCH_FREE_BUCKET
from tokensforge.db import create_pool
from tokensforge.ledger.pools import PoolStore
from tokensforge.ledger.store import LedgerStore

from .harness import CATALOG, Gw, Mock, free_port, gateway_of, gateway_settings, start_gateway

POOL_CATALOG = CATALOG + """
[[buckets]]
id = "plan"
name = "Pro plan allowance"
kind = "pool"

[research]
free_daily_allowance_usd = "0.00026"

[[models]]
id = "plan-mini"
max_output_tokens = 200

  [[models.routes]]
  id = "plan-mini/subscription"
  kind = "subscription"
  bucket = "plan"
  input_price_per_mtok = "0.06"
  output_price_per_mtok = "0.24"
  channels = [{{ channel = "relay-a", upstream_model = "up-plan" }}]
"""
FREE_DAILY_NANOS = 260_000
DAY = timedelta(days=1)


@pytest.fixture
async def pgw(dsn: str, mock_upstream: Mock, tmp_path: Path) -> AsyncIterator[Gw]:
    """A gateway whose catalog has a pool bucket, a subscription route and a free research allowance."""
    await mock_upstream.reset()
    path = tmp_path / "catalog.toml"
    path.write_text(POOL_CATALOG.format(mock=mock_upstream.url, dead=f"http://127.0.0.1:{free_port()}/v1",
                                        timeout_s=5), encoding="utf-8")
    ctx, url, app = await start_gateway(gateway_settings(path), dsn)
    async with ctx, aiohttp.ClientSession() as session:
        harness = Gw(url, dsn, gateway_of(app), mock_upstream, session)
        try:
            yield harness
        finally:
            for client in harness.clients:
                await client.close()


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def set_clock(conn: asyncpg.Connection, at: datetime) -> None:
    """Move the database clock (tf_now) to `at`."""
    await conn.execute("UPDATE tf_clock SET offset_interval = $1::timestamptz - now()", at)


async def tick(conn: asyncpg.Connection, free_nanos: int = 0) -> int:
    return int(await conn.fetchval("SELECT tf_pool_tick($1, 1000)", free_nanos))


async def entries(conn: asyncpg.Connection, account: str, bucket: str) -> list[tuple[str, int, datetime]]:
    rows = await conn.fetch("SELECT kind, amount_nanos, pool_period_end FROM ledger_entries"
                            " WHERE account_id = $1 AND bucket = $2 ORDER BY seq", account, bucket)
    return [(r["kind"], r["amount_nanos"], r["pool_period_end"]) for r in rows]


async def account(conn: asyncpg.Connection, name: str, buckets: tuple[str, ...] = ("plan",)) -> str:
    await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, $1)", name)
    await conn.executemany("INSERT INTO buckets (account_id, bucket) VALUES ($1, $2)", [(name, b) for b in buckets])
    return name


async def subscribe(conn: asyncpg.Connection, acct: str, starts_at: datetime, period: str = "day",
                    allowance: int = 1_000, sub_id: str = "sub_1") -> str:
    await conn.execute(
        "INSERT INTO subscriptions (id, account_id, bucket, plan, allowance_nanos, period, starts_at, due_at)"
        " VALUES ($1, $2, 'plan', 'pro', $3, $4, $5, $5)", sub_id, acct, allowance, period, starts_at)
    return sub_id


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text)


def record(request_id: str, acct: str) -> dict[str, Any]:
    """The usage record a subscription request leaves (what the gateway's receipt would carry)."""
    return {"request_id": request_id, "account_id": acct, "key_id": "key_t", "status": "succeeded",
            "selected_model": "plan-mini", "route": {"id": "plan-mini/subscription", "kind": "subscription"},
            "bucket": "plan"}


@pytest.fixture
async def ledger(dsn: str) -> AsyncIterator[LedgerStore]:
    pool = await create_pool(dsn, min_size=1, max_size=8)
    try:
        yield LedgerStore(pool)
    finally:
        await pool.close()


# ------------------------------------------------------------------ end to end through the gateway


async def test_subscription_grants_at_start_pays_a_subscription_route_and_quote_receipt_ledger_agree(pgw: Gw) -> None:
    status, acct = await pgw.admin("POST", "/admin/accounts", {"name": "subscriber"})
    assert status == 201
    status, sub = await pgw.admin("POST", f"/admin/accounts/{acct['id']}/subscriptions", {
        "plan": "pro", "bucket": "plan", "allowance_nanos": 5_000_000, "period": "month"})
    assert status == 201, sub
    assert sub["status"] == "active" and sub["periods_granted"] == 1 and sub["current_period_end"] is not None
    status, key = await pgw.admin("POST", f"/admin/accounts/{acct['id']}/keys", {"name": "k", "policy": {}})
    assert status == 201
    plan = (await pgw.balances(key["key"]))["plan"]
    assert plan["kind"] == "pool" and plan["balance_nanos"] == 5_000_000
    assert plan["pool"]["allowance_nanos"] == 5_000_000 and plan["pool"]["used_nanos"] == 0
    assert plan["pool"]["lapses_nanos"] == 5_000_000 and plan["pool"]["lapses_usd"] == "0.005000000"
    assert plan["pool"]["plan"] == "pro" and plan["pool"]["period"] == "month"
    assert plan["pool"]["period_end"] == plan["pool"]["lapses_at"] == sub["current_period_end"]
    assert (await pgw.balances(key["key"]))["routed"]["kind"] == "prepaid"

    body = {"model": "plan-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    status, quote, _ = await pgw.post("/v1/quote", key["key"], body)
    assert status == 200 and quote["allowed"] is True
    assert quote["bucket"] == "plan" and quote["bucket_kind"] == "pool"
    assert quote["route"] == {"id": "plan-mini/subscription", "kind": "subscription"}
    assert quote["pool"]["period_end"] == sub["current_period_end"]

    completion = await pgw.client(key["key"]).chat.completions.create(
        model="plan-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    receipt = completion.model_extra["receipt"]  # type: ignore[index]
    assert receipt["bucket"] == "plan" and receipt["bucket_kind"] == "pool"
    assert receipt["pool_period_end"] is not None
    assert datetime.fromisoformat(receipt["pool_period_end"]) == datetime.fromisoformat(sub["current_period_end"])
    assert receipt["charge_nanos"] > 0
    async with pgw.session.get(pgw.url + "/v1/ledger?bucket=plan",
                               headers={"authorization": f"Bearer {key['key']}"}) as r:
        ledger = (await r.json())["data"]
    assert [e["kind"] for e in ledger] == ["charge", "grant"]
    assert ledger[0]["id"] == receipt["ledger_entry_id"] and -ledger[0]["amount_nanos"] == receipt["charge_nanos"]
    assert ledger[0]["balance_after_nanos"] == receipt["balance_after_nanos"] == 5_000_000 - receipt["charge_nanos"]
    status, stored = await pgw.get(f"/v1/receipts/{receipt['request_id']}", key["key"])
    assert status == 200 and stored["bucket_kind"] == "pool" and stored["pool_period_end"] == receipt["pool_period_end"]
    plan = (await pgw.balances(key["key"]))["plan"]
    assert plan["pool"]["used_nanos"] == receipt["charge_nanos"]

    # a prepaid route's receipt says so and names no period
    status, routed = await pgw.admin("POST", f"/admin/accounts/{acct['id']}/topups", {
        "bucket": "routed", "amount_nanos": 10**8, "idempotency_key": "r"})
    assert status == 201
    other = await pgw.client(key["key"]).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5, extra_body={"route": "routed"})
    assert other.model_extra["receipt"]["bucket_kind"] == "prepaid"  # type: ignore[index]
    assert other.model_extra["receipt"]["pool_period_end"] is None  # type: ignore[index]

    status, shown = await pgw.admin("GET", f"/admin/accounts/{acct['id']}")
    assert status == 200 and [s["id"] for s in shown["subscriptions"]] == [sub["id"]]


async def test_admin_refuses_top_ups_into_pools_and_bad_subscriptions(pgw: Gw) -> None:
    _, acct = await pgw.admin("POST", "/admin/accounts", {"name": "a"})
    path = f"/admin/accounts/{acct['id']}"
    status, err = await pgw.admin("POST", path + "/topups",
                                  {"bucket": "plan", "amount_nanos": 5, "idempotency_key": "x"})
    assert status == 400 and err["error"]["param"] == "bucket" and "pool" in err["error"]["message"]
    good = {"plan": "pro", "bucket": "plan", "allowance_nanos": 1_000, "period": "day"}
    for bad, param in ((dict(good, bucket="routed"), "bucket"), (dict(good, bucket=RESEARCH_FREE_BUCKET), "bucket"),
                       (dict(good, period="week"), "period"), (dict(good, allowance_nanos=0), "allowance_nanos"),
                       (dict(good, allowance_nanos=1.5), "allowance_nanos"), (dict(good, plan=""), "plan"),
                       (dict(good, starts_at="tomorrow"), "starts_at"),
                       (dict(good, starts_at="2001-01-01T00:00:00+00:00"), "starts_at")):
        status, err = await pgw.admin("POST", path + "/subscriptions", bad)
        assert status == 400 and err["error"]["param"] == param, (bad, err)
    status, _ = await pgw.admin("POST", "/admin/accounts/acct_nope/subscriptions", good)
    assert status == 404
    status, sub = await pgw.admin("POST", path + "/subscriptions", good)
    assert status == 201
    status, err = await pgw.admin("POST", path + "/subscriptions", good)
    assert status == 409, err  # one live subscription per pool
    status, _ = await pgw.admin("POST", "/admin/subscriptions/sub_nope/cancel")
    assert status == 404
    status, cancelled = await pgw.admin("POST", f"/admin/subscriptions/{sub['id']}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled"
    assert cancelled["ends_at"] == cancelled["current_period_end"]


async def test_free_research_allowance_pays_sections_then_the_route_bucket(pgw: Gw) -> None:
    _, key = await pgw.account(routed=10**9)
    free = (await pgw.balances(key))[RESEARCH_FREE_BUCKET]
    assert free["kind"] == "pool" and free["pool"]["allowance_nanos"] == FREE_DAILY_NANOS
    assert free["pool"]["plan"] is None and free["pool"]["period"] == "day"
    assert free["pool"]["period_start"].endswith("T00:00:00+00:00")
    request = {"topic": "Copper", "model": "gpt-4o-mini", "max_charge_nanos": 10**8, "route": "routed"}
    status, body, _ = await pgw.post("/v1/research/reports", key, dict(request, dry_run=True))
    assert status == 200
    estimate = body["estimate"]
    assert estimate["free_allowance"]["bucket"] == RESEARCH_FREE_BUCKET
    assert estimate["free_allowance"]["available_nanos"] == FREE_DAILY_NANOS
    covers = estimate["free_allowance"]["covers_sections"]
    assert 1 <= covers < len(estimate["sections"])

    status, report, _ = await pgw.post("/v1/research/reports", key, request)
    assert status == 200 and report["status"] == "completed", report
    receipts = [s["receipt"] for s in report["sections"]]
    payers = [r["bucket"] for r in receipts]
    # the estimate sizes each section at its longest prompt, so the real (smaller) reservations let the
    # allowance cover at least as many sections as it promised; later sections read more, so it is a prefix
    paid = payers.count(RESEARCH_FREE_BUCKET)
    assert covers <= paid < len(payers)
    assert payers == [RESEARCH_FREE_BUCKET] * paid + ["routed"] * (len(payers) - paid)
    assert [r["bucket_kind"] for r in receipts] == ["pool"] * paid + ["prepaid"] * (len(payers) - paid)
    covers = paid
    assert all(r["route"]["kind"] == "routed" and r["charge_nanos"] > 0 for r in receipts)
    balances = await pgw.balances(key)
    spent_free = sum(r["charge_nanos"] for r in receipts[:covers])
    assert balances[RESEARCH_FREE_BUCKET]["balance_nanos"] == FREE_DAILY_NANOS - spent_free
    assert balances[RESEARCH_FREE_BUCKET]["available_nanos"] < receipts[covers]["reserved_nanos"]
    assert balances["routed"]["balance_nanos"] == 10**9 - sum(r["charge_nanos"] for r in receipts[covers:])

    # the next UTC day: yesterday's rest lapses, a fresh allowance pays again
    conn = await asyncpg.connect(pgw.dsn)
    try:
        end = await conn.fetchval("SELECT period_end FROM subscriptions WHERE bucket = $1", RESEARCH_FREE_BUCKET)
        await set_clock(conn, end + timedelta(minutes=1))
    finally:
        await conn.close()
    status, again, _ = await pgw.post("/v1/research/reports", key, dict(request, sections=["Summary"]))
    assert status == 200 and again["sections"][0]["receipt"]["bucket"] == RESEARCH_FREE_BUCKET
    async with pgw.session.get(pgw.url + f"/v1/ledger?bucket={RESEARCH_FREE_BUCKET}",
                               headers={"authorization": f"Bearer {key}"}) as r:
        kinds = [e["kind"] for e in (await r.json())["data"]]
    assert kinds[:3] == ["charge", "grant", "expiry"] and kinds.count("grant") == 2


# ------------------------------------------------------------------ the schedule in the database


async def test_grant_at_start_lapse_at_end_and_day_boundaries(db: asyncpg.Connection, ledger: LedgerStore) -> None:
    acct = await account(db, "a1")
    start = utc("2030-03-10T00:00:00+00:00")
    await subscribe(db, acct, start, "day", 1_000)
    assert await tick(db) == 0  # not started yet
    await set_clock(db, start + timedelta(hours=1))
    assert await tick(db) == 1
    assert await entries(db, acct, "plan") == [("grant", 1_000, start + DAY)]
    await ledger.reserve("r0", acct, "plan", 500)
    await ledger.finish("r0", 400, record("r0", acct))
    await set_clock(db, start + DAY - timedelta(seconds=5))
    assert await tick(db) == 0  # still the first day
    await set_clock(db, start + DAY + timedelta(seconds=5))
    assert await tick(db) == 1
    assert await entries(db, acct, "plan") == [
        ("grant", 1_000, start + DAY), ("charge", -400, start + DAY),
        ("expiry", -600, start + DAY), ("grant", 1_000, start + 2 * DAY)]
    assert await db.fetchval("SELECT balance_nanos FROM buckets WHERE account_id = $1", acct) == 1_000


async def test_month_periods_follow_the_calendar_from_the_anchor(db: asyncpg.Connection) -> None:
    acct = await account(db, "m1")
    start = utc("2030-01-31T00:00:00+00:00")
    await subscribe(db, acct, start, "month", 7)
    expected = ["2030-02-28", "2030-03-31", "2030-04-30", "2030-05-31"]
    for end in expected:
        await set_clock(db, utc(end + "T00:00:00+00:00") - timedelta(hours=1))
        await tick(db)
    grants = [e[2].date().isoformat() for e in await entries(db, acct, "plan") if e[0] == "grant"]
    assert grants == expected  # Jan 31 → Feb 28 → Mar 31 (not Mar 28) → Apr 30 → May 31
    row = await db.fetchrow("SELECT period_start, period_end, periods FROM subscriptions WHERE id = 'sub_1'")
    assert (row["period_start"], row["period_end"], row["periods"]) == (
        utc("2030-04-30T00:00:00+00:00"), utc("2030-05-31T00:00:00+00:00"), 4)
    leap = await db.fetchval("SELECT tf_period_bound('2028-01-31T00:00:00+00', 'month', 1)")
    assert leap == utc("2028-02-29T00:00:00+00:00")


async def test_a_gap_of_several_periods_is_caught_up_in_order(db: asyncpg.Connection) -> None:
    acct = await account(db, "g1")
    start = utc("2030-06-01T00:00:00+00:00")
    await subscribe(db, acct, start, "day", 500)
    await set_clock(db, start + timedelta(days=4, hours=12))  # the gateways were down for four boundaries
    assert await tick(db) == 1
    got = await entries(db, acct, "plan")
    want: list[tuple[str, int, datetime]] = []
    for day in range(1, 5):
        want += [("grant", 500, start + day * DAY), ("expiry", -500, start + day * DAY)]
    want.append(("grant", 500, start + 5 * DAY))
    assert got == want
    assert await tick(db) == 0  # nothing left to do: exactly once


async def test_cancel_takes_effect_at_period_end_and_nothing_is_granted_after(db: asyncpg.Connection) -> None:
    acct = await account(db, "c1")
    start = utc("2030-07-01T00:00:00+00:00")
    await subscribe(db, acct, start, "day", 300)
    await set_clock(db, start + timedelta(hours=2))
    await tick(db)
    await db.execute("SELECT tf_pool_cancel('sub_1')")
    row = await db.fetchrow("SELECT status, ends_at FROM subscriptions WHERE id = 'sub_1'")
    assert row["status"] == "cancelled" and row["ends_at"] == start + DAY
    assert await db.fetchval("SELECT balance_nanos FROM buckets WHERE account_id = $1 AND bucket = 'plan'", acct) == 300
    await set_clock(db, start + timedelta(days=3))
    await tick(db)
    assert await entries(db, acct, "plan") == [("grant", 300, start + DAY), ("expiry", -300, start + DAY)]
    assert await db.fetchval("SELECT status FROM subscriptions WHERE id = 'sub_1'") == "ended"
    # a new plan may start in the same pool once the old one ended
    await subscribe(db, acct, start + timedelta(days=3), "day", 200, sub_id="sub_2")
    await tick(db)
    assert (await entries(db, acct, "plan"))[-1] == ("grant", 200, start + timedelta(days=4))


async def test_many_ticks_at_once_grant_and_lapse_exactly_once(dsn: str, db: asyncpg.Connection) -> None:
    start = utc("2030-08-01T00:00:00+00:00")
    for i in range(20):
        await subscribe(db, await account(db, f"t{i}"), start, "day", 1_000 + i, sub_id=f"sub_{i}")
    await set_clock(db, start + timedelta(days=2, hours=1))
    conns = [await asyncpg.connect(dsn) for _ in range(12)]
    try:  # eight processes' ticks and four reservations' catch-ups of one pool, all at once
        await asyncio.gather(*(tick(c) for c in conns[:8]),
                             *(c.execute("SELECT tf_pool_catch_up('sub_3')") for c in conns[8:]))
    finally:
        for c in conns:
            await c.close()
    counts = await db.fetch("SELECT kind, count(*) AS n FROM ledger_entries GROUP BY kind ORDER BY kind")
    assert {r["kind"]: r["n"] for r in counts} == {"expiry": 40, "grant": 60}
    assert await db.fetchval("SELECT count(DISTINCT periods) FROM subscriptions") == 1


async def test_reservations_racing_the_boundary_never_spend_an_ended_period(db: asyncpg.Connection,
                                                                            ledger: LedgerStore) -> None:
    """Holds made just before the boundary settle against their own period: the released rest lapses,
    the new grant is untouched; holds made after it are served from the new period only."""
    acct = await account(db, "r1")
    start = utc("2030-09-01T00:00:00+00:00")
    await subscribe(db, acct, start, "day", 10_000)
    await set_clock(db, start + timedelta(hours=1))
    old = await asyncio.gather(*(ledger.reserve(f"old{i}", acct, "plan", 2_000) for i in range(4)))
    assert all(h.pool_period_end == start + DAY for h in old)
    assert [h.available_nanos for h in old] and min(h.available_nanos for h in old) == 2_000
    await set_clock(db, start + DAY + timedelta(seconds=1))
    # the new period's reservations race the old holds' settlements and the background ticks
    new, *_ = await asyncio.gather(
        asyncio.gather(*(ledger.reserve(f"new{i}", acct, "plan", 3_000) for i in range(5)),
                       return_exceptions=True),
        *(ledger.finish(f"old{i}", 500 * i, record(f"old{i}", acct)) for i in range(4)),
        *(PoolStore(ledger).tick(0) for _ in range(3)))
    granted = [h for h in new if not isinstance(h, Exception)]
    assert len(granted) == 3  # 10_000 of the new period covers three holds of 3_000, not a fourth
    assert all(h.pool_period_end == start + 2 * DAY for h in granted)
    for i, h in enumerate(new):
        if not isinstance(h, Exception):
            await ledger.finish(f"new{i}", 1_000, record(f"new{i}", acct))
    got = await entries(db, acct, "plan")
    first = [e for e in got if e[2] == start + DAY]
    # period 1: granted 10_000, charged 0+500+1000+1500, the 2_000 unheld lapsed at the boundary,
    # each hold's released rest lapsed when it settled
    assert sum(e[1] for e in first) == 0
    assert sorted(e[1] for e in first if e[0] == "expiry") == [-2_000, -2_000, -1_500, -1_000, -500]
    second = [e for e in got if e[2] == start + 2 * DAY]
    assert sum(e[1] for e in second) == 10_000 - 3 * 1_000
    assert await db.fetchval(
        "SELECT balance_nanos - reserved_nanos FROM buckets WHERE account_id = $1 AND bucket = 'plan'", acct) == 7_000


async def test_settling_after_the_lapse_returns_nothing_to_the_new_period(db: asyncpg.Connection,
                                                                         ledger: LedgerStore) -> None:
    acct = await account(db, "s1")
    start = utc("2030-10-01T00:00:00+00:00")
    await subscribe(db, acct, start, "day", 1_000)
    await set_clock(db, start + timedelta(hours=1))
    await ledger.reserve("h", acct, "plan", 800)
    await set_clock(db, start + timedelta(days=1, hours=1))
    await tick(db)
    # the lapse took only the unheld 200; the hold is still covered
    assert await db.fetchval("SELECT balance_nanos FROM buckets WHERE account_id = $1", acct) == 1_800
    assert await ledger.available(acct, "plan") == 1_000
    await ledger.finish("h", 0, None)  # a void: all 800 released, and they lapse
    assert await ledger.available(acct, "plan") == 1_000
    assert (await entries(db, acct, "plan"))[-1] == ("expiry", -800, start + DAY)


async def test_the_reserve_path_catches_up_before_spending(db: asyncpg.Connection, ledger: LedgerStore) -> None:
    acct = await account(db, "p1")
    start = utc("2030-11-01T00:00:00+00:00")
    await subscribe(db, acct, start, "day", 1_000)
    await set_clock(db, start + timedelta(hours=1))
    await tick(db)
    await set_clock(db, start + timedelta(days=1, hours=1))  # no tick ran since the boundary
    held = await ledger.reserve("x", acct, "plan", 1_000)
    assert held.pool_period_end == start + 2 * DAY and held.available_nanos == 0
    await ledger.finish("x", 1_000, record("x", acct))
    got = await entries(db, acct, "plan")
    assert got[:2] == [("grant", 1_000, start + DAY), ("expiry", -1_000, start + DAY)]
    assert got[2:] == [("grant", 1_000, start + 2 * DAY), ("charge", -1_000, start + 2 * DAY)]


async def test_free_research_pool_is_created_with_every_account_and_granted_from_the_setting(
        db: asyncpg.Connection) -> None:
    acct = await account(db, "f1", buckets=("routed", RESEARCH_FREE_BUCKET))
    row = await db.fetchrow("SELECT * FROM subscriptions WHERE account_id = $1", acct)
    assert row["plan"] is None and row["period"] == "day" and row["starts_at"].hour == 0
    assert await tick(db, free_nanos=50_000_000) == 1
    assert await entries(db, acct, RESEARCH_FREE_BUCKET) == [("grant", 50_000_000, row["starts_at"] + DAY)]
    await set_clock(db, row["starts_at"] + 2 * DAY + timedelta(hours=1))
    await tick(db, free_nanos=0)  # turned off: yesterday's rest lapses, nothing new is granted
    assert [e[0] for e in await entries(db, acct, RESEARCH_FREE_BUCKET)] == ["grant", "expiry"]

