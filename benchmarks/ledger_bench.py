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

from benchmarks.common import cpu_seconds
from tokensforge.accounts import AccountStore
from tokensforge.db import create_pool, migrate
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ledger_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-dsn", required=True, help="DSN of an existing database of the cluster")
    parser.add_argument("--ops", type=int, default=20_000, help="timed reserve+settle operations")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent tasks")
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--pool-size", type=int, default=20, help="asyncpg pool (the gateway's default)")
    parser.add_argument("--pg-pid", type=int, default=None, help="postmaster pid: report PostgreSQL CPU")
    args = parser.parse_args(argv)
    result = uvloop.run(bench_fresh_database(
        args.admin_dsn, ops=args.ops, concurrency=args.concurrency, accounts=args.accounts,
        pool_size=args.pool_size, warmup=args.warmup, pg_pid=args.pg_pid))
    print("LEDGER_JSON " + json.dumps(result), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
