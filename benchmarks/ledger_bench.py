"""Ledger-only benchmark: settled requests per second of the gateway's money path on a real PostgreSQL.

Many concurrent tasks each hold money for a request and settle it (a charge with a small usage
record), across many accounts, through the gateway's own `Wallet` and pool settings (`create_pool`,
20 connections by default) — so holds are carved from per-process leases and only the settlement
goes to the database, as in the gateway. The same is measured with leases off (a reservation round
trip before every settlement), and the rate at which one process can take leases (`tf_lease_grow`).
Nothing HTTP is involved: this is the ceiling the ledger puts on the gateway's request rate.

    python -m benchmarks.ledger_bench --admin-dsn postgresql://postgres@127.0.0.1:PORT/postgres

creates a fresh database in that cluster, migrates it, runs, drops it and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import resource
import secrets
import sys
import time
from typing import Any

import asyncpg
import uvloop

from benchmarks import pgstats
from benchmarks.common import cpu_seconds, durable_throwaway, statements_module_available
from tokensforge.accounts import AccountStore
from tokensforge.db import create_pool, migrate, migration_files
from tokensforge.ledger.leases import LeaseConfig, Wallet
from tokensforge.ledger.store import LedgerStore

BUCKETS = ("credit", "routed")
FUND_NANOS = 10**15
RESERVE_NANOS = 12_000
CHARGE_NANOS = 7_321


def _record(request_id: str, account_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "account_id": account_id, "status": "succeeded",
            "selected_model": "gpt-4o-mini", "route": {"id": "gpt-4o-mini/official", "kind": "official"},
            "bucket": "credit", "reserved_nanos": RESERVE_NANOS, "latency_ms": 3,
            "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32}}


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


async def bench(dsn: str, *, ops: int, concurrency: int, accounts: int, pool_size: int,
                warmup: int, pg_pid: int | None = None, leases: bool = True) -> dict[str, Any]:
    pool = await create_pool(dsn, max_size=pool_size, min_size=pool_size)
    try:
        ledger = LedgerStore(pool, reservation_ttl_s=600)
        wallet = Wallet(ledger, LeaseConfig(enabled=leases))
        store = AccountStore(pool)
        ids = []
        for i in range(accounts):
            acct = (await store.create_account(f"bench-{i}", BUCKETS))["id"]
            await ledger.topup(acct, "credit", FUND_NANOS, "fund", "bench")
            ids.append(acct)
        prefix = "lb_" + secrets.token_hex(4)
        errors: list[str] = []

        async def run(n: int, latencies: list[float] | None) -> None:
            counter = itertools.count()

            async def worker() -> None:
                while (i := next(counter)) < n:
                    rid = f"{prefix}_{'w' if latencies is None else 'm'}_{i}"
                    acct = ids[i % len(ids)]
                    started = time.perf_counter()
                    try:
                        record = _record(rid, acct)
                        hold = await wallet.reserve(rid, rid, acct, "credit", RESERVE_NANOS, (),
                                                    functools.partial(dict, record), leasable=True)
                        await wallet.finish(hold, CHARGE_NANOS, record)
                    except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                        errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    if latencies is not None:
                        latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        await run(warmup, None)
        latencies: list[float] = []
        pg0 = cpu_seconds(pg_pid, tree=True) if pg_pid else 0.0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await run(ops, latencies)
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        pg1 = cpu_seconds(pg_pid, tree=True) if pg_pid else 0.0
        await wallet.close()
        # the books must balance: every settle moved exactly CHARGE_NANOS
        spent = await pool.fetchval(
            "SELECT sum($1::bigint - balance_nanos) FROM buckets WHERE bucket = 'credit'", FUND_NANOS)
        open_left = await pool.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'")
        latencies.sort()
        settled = len(latencies)
        return {
            "mode": "leases" if leases else "reservation per request",
            "ops": ops, "settled": settled, "errors": len(errors), "error_samples": errors[:5],
            "concurrency": concurrency, "accounts": accounts, "pool_size": pool_size,
            "elapsed_s": round(elapsed, 3),
            "settles_per_s": round(settled / elapsed, 1) if elapsed > 0 else 0.0,
            "latency_ms": {"p50": round(_pct(latencies, 50) * 1000, 2),
                           "p90": round(_pct(latencies, 90) * 1000, 2),
                           "p99": round(_pct(latencies, 99) * 1000, 2)},
            "client_cpu_s": round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 3),
            "postgres_cpu_s": round(pg1 - pg0, 3) if pg_pid else None,
            "postgres_cpu_ms_per_settle": round((pg1 - pg0) / settled * 1000, 3) if pg_pid and settled else None,
            "books_balance": int(spent or 0) == (settled + warmup) * CHARGE_NANOS if not errors else None,
            "open_reservations_left": int(open_left or 0),
        }
    finally:
        await pool.close()


async def lease_grants(dsn: str, *, grants: int, concurrency: int, accounts: int, pool_size: int) -> dict[str, Any]:
    """How many leases one process can take per second: each call a new lease on one of `accounts`
    accounts (`tf_lease_grow`: lock the bucket, insert the lease row, one commit)."""
    pool = await create_pool(dsn, max_size=pool_size, min_size=pool_size)
    try:
        ledger = LedgerStore(pool, reservation_ttl_s=600)
        store = AccountStore(pool)
        ids = []
        for i in range(accounts):
            acct = (await store.create_account(f"lease-{i}", BUCKETS))["id"]
            await ledger.topup(acct, "credit", FUND_NANOS, "fund", "bench")
            ids.append(acct)
        counter = itertools.count()
        refused: list[str] = []

        async def worker() -> None:
            while (i := next(counter)) < grants:
                grant = await ledger.lease_grow(f"lg_{i}", "bench", ids[i % len(ids)], "credit", want_nanos=10**6,
                                                min_nanos=1, fraction_ppm=250_000, ttl_s=600)
                if grant.outcome != "ok":
                    refused.append(grant.outcome)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        return {"grants": grants, "refused": len(refused), "elapsed_s": round(elapsed, 3),
                "grants_per_s": round(grants / elapsed, 1)}
    finally:
        await pool.close()


async def _function_stats(dsn: str) -> dict[str, Any]:
    """Server-side time per call of the ledger's SQL functions (track_functions; backends have exited)."""
    conn = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(0.2)
        rows = await conn.fetch(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions"
            " WHERE funcname LIKE 'tf\\_%' ORDER BY total_time DESC")
    finally:
        await conn.close()
    return {r["funcname"]: {"calls": r["calls"], "mean_ms": round(r["total_time"] / r["calls"], 3),
                            "self_mean_ms": round(r["self_time"] / r["calls"], 3)}
            for r in rows if r["calls"]}


async def bench_fresh_database(admin_dsn: str, **kwargs: Any) -> dict[str, Any]:
    """Create a migrated database next to `admin_dsn`'s, run bench() on it, drop it."""
    name = "ledger_bench_" + secrets.token_hex(4)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        await admin.execute(f"ALTER DATABASE {name} SET track_functions = 'pl'")
        dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
        try:
            await migrate(dsn)
            result = await bench(dsn, **kwargs)
            result["functions"] = await _function_stats(dsn)
            per_request = {**kwargs, "ops": max(kwargs["ops"] // 4, 100), "leases": False, "pg_pid": None}
            result["per_request_reservations"] = await bench(dsn, **per_request)
            result["lease_grants"] = await lease_grants(dsn, grants=max(kwargs["ops"] // 4, 100),
                                                        concurrency=kwargs["concurrency"],
                                                        accounts=kwargs["accounts"], pool_size=kwargs["pool_size"])
            return result
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


# --------------------------------------------------------------------------- the settlement, statement by statement


def receipt(request_id: str, account_id: str, charge_nanos: int) -> dict[str, Any]:
    """A receipt shaped like the gateway's (receipts.build_receipt) for a routed chat completion:
    ~1 KB of JSON, as a real settlement stores it."""
    return {
        "object": "receipt", "request_id": request_id, "status": "succeeded", "endpoint": "chat.completions",
        "selected_model": "gpt-4o-mini", "upstream_model": "gpt-4o-mini-2024-07-18",
        "route": {"id": "gpt-4o-mini/official", "kind": "official"}, "bucket": "credit",
        "bucket_kind": "prepaid", "pool_period_end": None,
        "price": {"input_per_mtok_usd": "0.150000", "output_per_mtok_usd": "0.600000",
                  "cached_input_per_mtok_usd": "0.075000"},
        "account_id": account_id, "project_id": "prj_" + account_id[-12:], "key_id": "key_" + account_id[-12:],
        "channels": {"primary": "openai-main", "backups": ["openai-backup"], "served_by": "openai-main"},
        "attempts": [{"channel": "openai-main", "status": 200, "latency_ms": 3, "error": None, "skipped": None,
                      "retry_after_s": None}],
        "fallback": {"used": False, "cross_route": False, "from_route": None},
        "on_failure": "fallback", "relay": "native",
        "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32,
                  "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
        "usage_source": "upstream",
        "cost_lines": [{"class": "input", "tokens": 12, "per_mtok_usd": "0.150000", "nanos": 1800},
                       {"class": "output", "tokens": 20, "per_mtok_usd": "0.600000", "nanos": 12000}],
        "reserved_nanos": RESERVE_NANOS, "charge_nanos": charge_nanos, "charge_usd": f"{charge_nanos / 1e9:.9f}",
        "price_nanos": charge_nanos, "ledger_entry_id": None, "balance_after_nanos": None, "latency_ms": 3,
    }


_AUTO_EXPLAIN = ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0", "SET auto_explain.log_analyze = on",
                 "SET auto_explain.log_buffers = on", "SET auto_explain.log_wal = on",
                 "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_timing = on",
                 "SET auto_explain.log_level = notice", "SET client_min_messages = notice")


async def _explain_batch(conn: asyncpg.Connection[Any], sql: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS, WAL) of one settlement batch (it commits: a real settlement), and the
    plan of every statement it ran inside (auto_explain with nested statements, sent as notices)."""
    nested: list[str] = []

    def listen(_conn: Any, message: Any) -> None:
        text = str(getattr(message, "message", message))
        if "plan:" in text or "Query Text" in text:
            nested.append(text)

    for stmt in _AUTO_EXPLAIN:
        await conn.execute(stmt)
    conn.add_log_listener(listen)
    try:
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, WAL, VERBOSE OFF) " + sql, *args)
        await asyncio.sleep(0.05)  # notices arrive with the result; let the listener run
    finally:
        conn.remove_log_listener(listen)
        await conn.execute("SET auto_explain.log_min_duration = -1")
    top = "\n".join(r[0] for r in rows)
    # the top-level statement's own auto_explain entry repeats the EXPLAIN: keep the nested ones
    return {"plan": top, "nested": [n for n in nested if "EXPLAIN (ANALYZE" not in n]}


class _SettleDb:
    """A migrated database of the profile cluster with `accounts` funded accounts, each holding a lease,
    and a source of settlement batches against those leases (~1 KB receipts)."""

    def __init__(self, admin_dsn: str, name: str) -> None:
        self.name = name
        self.dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
        self.ids: list[tuple[str, str]] = []
        self._seq = itertools.count()

    async def create(self, admin: asyncpg.Connection[Any], *, accounts: int, upto: int | None) -> None:
        await admin.execute(f"CREATE DATABASE {self.name}")
        await _migrate_upto(self.dsn, upto)
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        finally:
            await conn.close()
        pool = await create_pool(self.dsn, max_size=2, min_size=1)
        try:
            ledger = LedgerStore(pool, reservation_ttl_s=3600)
            for i in range(accounts):
                acct = (await AccountStore(pool).create_account(f"profile-{i}", BUCKETS))["id"]
                await ledger.topup(acct, "credit", FUND_NANOS, "fund", "bench")
                lease = f"lease_{self.name}_{i}"
                grant = await ledger.lease_grow(lease, "bench", acct, "credit", want_nanos=FUND_NANOS // 2,
                                                min_nanos=1, fraction_ppm=1_000_000, ttl_s=3600)
                if grant.outcome != "ok":
                    raise RuntimeError(f"lease for the profile refused: {grant}")
                self.ids.append((acct, lease))
        finally:
            await pool.close()

    def batch(self, size: int) -> list[tuple[str, str, int, dict[str, Any]]]:
        items = []
        for _ in range(size):
            i = next(self._seq)
            acct, lease = self.ids[i % len(self.ids)]
            rid = f"req_{self.name}_{i}"
            items.append((lease, rid, CHARGE_NANOS, receipt(rid, acct, CHARGE_NANOS)))
        return items

    async def drive(self, ledger: LedgerStore, size: int, batches: int, inflight: int,
                    pg_pid: int) -> tuple[int, float, float, float, list[str]]:
        """`batches` batches of `size` through `LedgerStore._lease_finish_many`, `inflight` at a time:
        (settles, seconds, PostgreSQL CPU seconds, of them the pool's backends', errors). The backends'
        share leaves out the background processes (WAL writer, checkpointer, autovacuum), whose work
        is partly the settlements' and partly the machine's: the steadier figure to compare."""
        todo = itertools.count()
        errors: list[str] = []
        pids = await _backend_pids(ledger.pool, inflight)

        async def worker() -> None:
            while next(todo) < batches:
                results = await ledger._lease_finish_many(self.batch(size))
                errors.extend(str(r) for r in results if isinstance(r, Exception))

        cpu0, own0 = cpu_seconds(pg_pid, tree=True), sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - t0
        cpu1, own1 = cpu_seconds(pg_pid, tree=True), sum(cpu_seconds(p) for p in pids)
        return batches * size, elapsed, cpu1 - cpu0, own1 - own0, errors


async def _backend_pids(pool: asyncpg.Pool, n: int) -> list[int]:
    """The server pids of the pool's `n` connections (all held at once, so each is asked)."""
    conns = [await pool.acquire() for _ in range(n)]
    try:
        return [int(await c.fetchval("SELECT pg_backend_pid()")) for c in conns]
    finally:
        for c in conns:
            await pool.release(c)


async def _migrate_upto(dsn: str, upto: int | None) -> None:
    """migrate(), or only the migrations numbered ≤ `upto` (the schema before a change, to compare)."""
    if upto is None:
        await migrate(dsn)
        return
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        for version, name, sql in migration_files():
            if version <= upto:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
    finally:
        await conn.close()


async def settle_profile(admin_dsn: str, *, pg_pid: int, batch_sizes: tuple[int, ...] = (1, 16),
                         settles: int = 2000, accounts: int = 1, inflight: int = 1,
                         compare_upto: int | None = None, rounds: int = 6) -> dict[str, Any]:
    """The lease settlement (`LedgerStore._lease_finish_many`, the statement the gateway sends per batch) at
    fixed batch sizes — 1 is what c=4 sends, ~8–16 what c=32 sends — with `inflight` batches in the database
    at once (1: what the store's batcher sends for one lease, its shard's one batch in flight); ~1 KB
    receipts; `accounts` accounts (1: the HTTP scenarios' one hot account), each settling against its lease.
    For each size: settles/s and PostgreSQL CPU per settle with statement tracking off; then the same with
    pg_stat_statements counting every statement, nested ones included (track = all): the top statements per
    settlement; then EXPLAIN (ANALYZE, BUFFERS, WAL) of one batch with the plans of the statements it ran.
    Needs a cluster from durable_throwaway(statements=True).

    With `compare_upto`, a second database migrated only up to that migration settles too, in `rounds`
    alternating slices with the first (same cluster, same moments of a shared machine's load): the
    before/after of a migration in one run."""
    admin = await asyncpg.connect(admin_dsn)
    tag = secrets.token_hex(4)
    main = _SettleDb(admin_dsn, f"settle_profile_{tag}")
    before = _SettleDb(admin_dsn, f"settle_before_{tag}") if compare_upto is not None else None
    out: dict[str, Any] = {"accounts": accounts, "inflight": inflight, "settles": settles, "sizes": {}}
    try:
        await main.create(admin, accounts=accounts, upto=None)
        if before is not None:
            await before.create(admin, accounts=accounts, upto=compare_upto)
            out["compare_upto"] = compare_upto
        for size in batch_sizes:
            row = await _rate(main, before, size=size, settles=settles, inflight=inflight, pg_pid=pg_pid,
                              rounds=rounds if before is not None else 1)
            row["tracked"] = await _tracked(admin, main, size=size, settles=max(settles // 2, size * 20),
                                            inflight=inflight, pg_pid=pg_pid)
            out["sizes"][str(size)] = row
        return out
    finally:
        for db in (main, before):
            if db is not None:
                await admin.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")
        await admin.close()


async def _rate(main: _SettleDb, before: _SettleDb | None, *, size: int, settles: int, inflight: int,
                pg_pid: int, rounds: int) -> dict[str, Any]:
    pools = {}
    try:
        for key, db in (("after", main), ("before", before)):
            if db is not None:
                pools[key] = await create_pool(db.dsn, max_size=inflight, min_size=inflight)
        ledgers = {key: LedgerStore(pool, reservation_ttl_s=3600) for key, pool in pools.items()}
        dbs = {"after": main, "before": before}
        totals = {key: [0, 0.0, 0.0, 0.0] for key in ledgers}
        errors: list[str] = []
        for key, ledger in ledgers.items():  # warm each connection's plans
            await dbs[key].drive(ledger, size, inflight * 6, inflight, pg_pid)  # type: ignore[union-attr]
        batches = max(1, settles // size // rounds)
        for _ in range(rounds):
            for key, ledger in ledgers.items():
                n, elapsed, cpu, own, errs = await dbs[key].drive(  # type: ignore[union-attr]
                    ledger, size, batches, inflight, pg_pid)
                for i, value in enumerate((n, elapsed, cpu, own)):
                    totals[key][i] += value
                errors += errs

        def summary(n: float, elapsed: float, cpu: float, own: float) -> dict[str, Any]:
            return {"settles": int(n), "elapsed_s": round(elapsed, 3), "settles_per_s": round(n / elapsed, 1),
                    "postgres_cpu_ms_per_settle": round(cpu / n * 1000, 4),
                    "backend_cpu_ms_per_settle": round(own / n * 1000, 4)}

        row = {**summary(*totals["after"]), "errors": len(errors), "error_samples": errors[:3]}
        if "before" in totals:
            row["before"] = summary(*totals["before"])
        return row
    finally:
        for pool in pools.values():
            await pool.close()


async def _tracked(admin: asyncpg.Connection[Any], db: _SettleDb, *, size: int, settles: int, inflight: int,
                   pg_pid: int) -> dict[str, Any]:
    """The same settlements with pg_stat_statements counting every statement, and one batch explained."""
    from tokensforge.ledger import store as store_module

    settings = {"compute_query_id": "on", "pg_stat_statements.track": "all"}
    for key, value in settings.items():
        await admin.execute(f"ALTER DATABASE {db.name} SET {key} = '{value}'")
    pool = await create_pool(db.dsn, max_size=inflight, min_size=inflight)  # new sessions: the settings apply
    try:
        ledger = LedgerStore(pool, reservation_ttl_s=3600)
        await db.drive(ledger, size, inflight * 6, inflight, pg_pid)  # warm the plans
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_stat_statements_reset()")
        n, elapsed, cpu, _own, errors = await db.drive(ledger, size, max(1, settles // size), inflight, pg_pid)
        result: dict[str, Any] = {"settles": n, "errors": len(errors), "elapsed_s": round(elapsed, 3),
                                  "settles_per_s": round(n / elapsed, 1),
                                  "postgres_cpu_ms_per_settle": round(cpu / n * 1000, 4)}
        async with pool.acquire() as conn:
            await conn.execute("SET pg_stat_statements.track = 'none'")
            result["statements"] = await pgstats.top_statements(conn, per=n)
            sql_of = getattr(store_module, "lease_finish_sql", None)
            if sql_of is not None:
                items = db.batch(size)
                result["explain"] = await _explain_batch(conn, sql_of(size),
                                                         tuple([i[k] for i in items] for k in range(4)))
        return result
    finally:
        await pool.close()
        for key in settings:
            await admin.execute(f"ALTER DATABASE {db.name} RESET {key}")


def profile_on_own_cluster(**kwargs: Any) -> dict[str, Any]:
    """settle_profile() on a durable throwaway cluster of its own (pg_stat_statements preloaded), so
    the harness's cluster never runs with it."""
    if not statements_module_available():
        return {"error": "pg_stat_statements is not installed (Debian: postgresql-15 ships it; "
                         "/usr/lib/postgresql/15/lib/pg_stat_statements.so)"}
    pg = durable_throwaway(statements=True)
    try:
        pg.start()
        pid = int((pg.cluster_dir / "postmaster.pid").read_text().split()[0])
        return dict(uvloop.run(settle_profile(pg.admin_dsn("postgres"), pg_pid=pid, **kwargs)))
    finally:
        pg.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ledger_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-dsn", help="DSN of an existing database of the cluster")
    parser.add_argument("--ops", type=int, default=20_000, help="timed reserve+settle operations")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent tasks")
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--pool-size", type=int, default=20, help="asyncpg pool (the gateway's default)")
    parser.add_argument("--pg-pid", type=int, default=None, help="postmaster pid: report PostgreSQL CPU")
    parser.add_argument("--settle-profile", action="store_true",
                        help="also profile the settlement statement by statement on a cluster of its own "
                             "(pg_stat_statements, EXPLAIN ANALYZE) at batch sizes 1 and 16")
    parser.add_argument("--profile-only", action="store_true", help="only the settlement profile (no --admin-dsn)")
    parser.add_argument("--profile-settles", type=int, default=2000, help="settles per batch size in the profile")
    parser.add_argument("--compare-upto", type=int, default=None,
                        help="profile: also settle, in alternating slices, on a database migrated only up to this "
                             "migration number (before/after of the later ones in one run)")
    parser.add_argument("--profile-inflight", type=int, default=1, help="profile: batches in the database at once")
    parser.add_argument("--profile-accounts", type=int, default=1, help="profile: accounts settling (one lease each)")
    args = parser.parse_args(argv)
    if args.profile_only:
        profile = profile_on_own_cluster(settles=args.profile_settles, compare_upto=args.compare_upto,
                                         inflight=args.profile_inflight, accounts=args.profile_accounts)
        print("LEDGER_JSON " + json.dumps({"settle_profile": profile}), flush=True)
        return 0 if "error" not in profile else 1
    if not args.admin_dsn:
        parser.error("--admin-dsn is required (unless --profile-only)")
    result = uvloop.run(bench_fresh_database(
        args.admin_dsn, ops=args.ops, concurrency=args.concurrency, accounts=args.accounts,
        pool_size=args.pool_size, warmup=args.warmup, pg_pid=args.pg_pid))
    if args.settle_profile:
        result["settle_profile"] = profile_on_own_cluster(settles=args.profile_settles)
    print("LEDGER_JSON " + json.dumps(result), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
