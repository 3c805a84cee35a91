"""Data-growth benchmark: the account views, the CSV export and settlement throughput on an empty
database and again after N usage records (with their charge entries) over many accounts.

    python -m benchmarks.growth_bench --quick            # 200,000 records (~2 min)
    python -m benchmarks.growth_bench --records 1500000  # medium
    python -m benchmarks.growth_bench --records 10000000 --big 1000000   # the full size

A durable throwaway PostgreSQL (fsync, synchronous_commit and full_page_writes on, unlike the other
benchmarks' throwaway clusters) is started and stopped. History is generated inside the database
(generate_series; benchmarks/history_data.py for the one big account, whose books balance; plain bulk
rows for the others), not through HTTP. The views are measured through the gateway's own `LedgerStore`
and pool (the SQL and generic-plan behaviour /v1/usage, /v1/ledger, /v1/receipts and the spend summary
run; no HTTP or JSON encoding), each at 1 and 8 concurrent clients after a warm-up that moves the pooled
connections to generic plans. The export is `history.stream_usage_csv` of the big account (paced as in
the gateway, and unpaced). Settlements: benchmarks/ledger_bench.py's lease path, on an empty
database and on the grown one in alternating rounds (the best of each), after a CHECKPOINT. The plans are also
checked with `plan_cache_mode = force_generic_plan` (no sequential scans). Results print as a Markdown
table and one JSON line (GROWTH_JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import uvloop

from benchmarks.history_data import ensure_months, generate_history
from benchmarks.ledger_bench import bench as settle_bench
from tokensforge import history
from tokensforge.db import create_pool, migrate
from tokensforge.embedded_pg import EmbeddedPostgres
from tokensforge.ledger.store import LedgerStore, usage_query

BIG = "acct_big"

_BULK = """
WITH g AS (
    SELECT i, 'acct_' || (i % $1) AS account_id, $2::timestamptz + $3::interval * i AS t,
           (1000 + (i * 7919) % 50000)::bigint AS c, 'rq_' || $4 || '_' || i AS rid,
           (ARRAY['gpt-4o-mini', 'gpt-4o', 'claude-haiku'])[1 + i % 3] AS model,
           (ARRAY['official', 'routed'])[1 + i % 2] AS kind
    FROM generate_series($5::bigint, $6::bigint) AS i
), l AS (
    INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note,
                                created_at)
    SELECT account_id, 'credit', 'charge', -c, 0, rid, model, t FROM g
    RETURNING id, request_id
)
INSERT INTO usage_records (request_id, account_id, status, model, route_id, route_kind, bucket, reserved_nanos,
                           charge_nanos, ledger_entry_id, latency_ms, receipt, created_at)
SELECT g.rid, g.account_id, 'succeeded', g.model, g.model || '/' || g.kind, g.kind, 'credit', 2 * g.c, g.c, l.id,
       20 + g.i % 400,
       jsonb_build_object('object', 'receipt', 'request_id', g.rid, 'account_id', g.account_id, 'status', 'succeeded',
           'selected_model', g.model, 'route', jsonb_build_object('id', g.model || '/' || g.kind, 'kind', g.kind),
           'bucket', 'credit', 'usage', jsonb_build_object('prompt_tokens', 100 + g.i % 900,
           'completion_tokens', 10 + g.i % 200), 'reserved_nanos', 2 * g.c, 'charge_nanos', g.c,
           'ledger_entry_id', l.id, 'attempts', jsonb_build_array(jsonb_build_object('note', repeat('x', 600)))),
       g.t
FROM g JOIN l ON l.request_id = g.rid"""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else 0.0


async def measure(op: Callable[[], Awaitable[Any]], *, clients: int, calls: int) -> dict[str, float]:
    for _ in range(8):  # past asyncpg's 5 custom plans: the pooled connections run the generic one
        await op()
    times: list[float] = []

    async def client() -> None:
        for _ in range(calls):
            began = time.perf_counter()
            await op()
            times.append((time.perf_counter() - began) * 1000)

    await asyncio.gather(*(client() for _ in range(clients)))
    return {"p50_ms": round(pct(times, 50), 2), "p99_ms": round(pct(times, 99), 2)}


async def views(pool: asyncpg.Pool, *, calls: int) -> dict[str, dict[str, dict[str, float]]]:
    store = LedgerStore(pool)
    seqs = [r["seq"] for r in await pool.fetch(
        "SELECT seq FROM usage_records WHERE account_id = $1 ORDER BY seq DESC", BIG)]
    lseqs = [r["seq"] for r in await pool.fetch(
        "SELECT seq FROM ledger_entries WHERE account_id = $1 ORDER BY seq DESC", BIG)]
    rids = [r["request_id"] for r in await pool.fetch(
        "SELECT request_id FROM usage_records WHERE account_id = $1 ORDER BY random() LIMIT 500", BIG)]
    deep = seqs[int(len(seqs) * 0.9)] if seqs else None
    ldeep = lseqs[int(len(lseqs) * 0.9)] if lseqs else None
    nofilter: dict[str, str | None] = {}
    ops: dict[str, Callable[[], Awaitable[Any]]] = {
        "usage first page": lambda: store.usage(BIG, limit=21, after=None, filters=nofilter),
        "usage deep page": lambda: store.usage(BIG, limit=21, after=deep, filters=nofilter),
        "usage model=": lambda: store.usage(BIG, limit=21, after=None, filters={"model": "gpt-4o"}),
        "usage route_kind=": lambda: store.usage(BIG, limit=21, after=None, filters={"route_kind": "routed"}),
        "usage bucket=": lambda: store.usage(BIG, limit=21, after=None, filters={"bucket": "credit"}),
        "usage status=succeeded": lambda: store.usage(BIG, limit=21, after=None, filters={"status": "succeeded"}),
        "usage status=failed (none)": lambda: store.usage(BIG, limit=21, after=None, filters={"status": "failed"}),
        "usage deep page + model=": lambda: store.usage(BIG, limit=21, after=deep, filters={"model": "gpt-4o"}),
        "ledger first page": lambda: store.ledger(BIG, limit=21, after=None),
        "ledger deep page": lambda: store.ledger(BIG, limit=21, after=ldeep),
        "ledger bucket=credit": lambda: store.ledger(BIG, limit=21, after=None, bucket="credit"),
        "ledger bucket=research-free (none)": lambda: store.ledger(BIG, limit=21, after=None, bucket="research-free"),
        "receipt": lambda: store.receipt(BIG, random.choice(rids)),
        "spend summary 24h": lambda: store.spend_summary(BIG, bin_s=3600, bins=24),
        "spend summary 30d": lambda: store.spend_summary(BIG, bin_s=86400, bins=30),
    }
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, op in ops.items():
        out[name] = {f"c{c}": await measure(op, clients=c, calls=calls if c == 1 else max(calls // 2, 10))
                     for c in (1, 8)}
    return out


async def generic_plans(pool: asyncpg.Pool) -> list[str]:
    """Every view's statement under force_generic_plan: the ones that scan a table sequentially."""
    bad = []
    async with pool.acquire() as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        shapes = [usage_query(BIG, after=None, filters={}), usage_query(BIG, after=1, filters={"status": "failed"}),
                  usage_query(BIG, after=None, filters={"model": "m"}),
                  usage_query(BIG, after=None, filters={"route_kind": "routed", "bucket": "credit"})]
        for sql, args in shapes:
            await conn.execute(f"PREPARE q AS {sql} LIMIT 21")
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN EXECUTE q(" + ", ".join("NULL" if a is None else repr(a) for a in args) + ")"))
            await conn.execute("DEALLOCATE q")
            for name in re.findall(r"Seq Scan on (\w+)", plan):  # an empty (future) month may be scanned
                if await conn.fetchval("SELECT reltuples FROM pg_class WHERE relname = $1", name) > 1000:
                    bad.append(f"{sql} (on {name})")
        await conn.execute("RESET plan_cache_mode")
    return bad


async def export(pool: asyncpg.Pool, *, paced: bool) -> dict[str, float]:
    sent = 0
    rows = 0

    async def sink(chunk: bytes) -> None:
        nonlocal sent, rows
        sent += len(chunk)
        rows += chunk.count(b"\n")

    saved = history.EXPORT_BYTES_PER_S
    history.EXPORT_BYTES_PER_S = saved if paced else 10**12
    began = time.perf_counter()
    try:
        await history.stream_usage_csv(pool, "key_bench_" + secrets.token_hex(3), BIG, sink, filters={})
    finally:
        history.EXPORT_BYTES_PER_S = saved
    took = time.perf_counter() - began
    return {"rows": rows - 1, "mb": round(sent / 1e6, 1), "s": round(took, 2), "rows_per_s": round((rows - 1) / took)}


async def settles(dsn: str, ops: int) -> float:
    result = await settle_bench(dsn, ops=ops, concurrency=64, accounts=50, pool_size=20, warmup=300)
    return float(result["settles_per_s"])


async def fill(conn: asyncpg.Connection, *, records: int, big: int, accounts: int) -> float:
    began = time.perf_counter()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=60)
    await ensure_months(conn, start, dt.datetime.now(dt.UTC))
    step = dt.timedelta(days=60) / max(records, 1)
    await generate_history(conn, BIG, big, start=start, step=step * (records / max(big, 1)), tag="big")
    rest = records - big
    await conn.execute("INSERT INTO accounts (id, name) SELECT 'acct_' || i, 'g' FROM generate_series(0, $1 - 1) i"
                       " ON CONFLICT DO NOTHING", accounts)
    await conn.execute("INSERT INTO buckets (account_id, bucket) SELECT 'acct_' || i, 'credit'"
                       " FROM generate_series(0, $1 - 1) i ON CONFLICT DO NOTHING", accounts)
    batch = 100_000
    for lo in range(1, rest + 1, batch):
        await conn.execute(_BULK, accounts, start, step, "b", lo, min(lo + batch - 1, rest))
    await conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - began


async def settle_rounds(empty_dsn: str, grown_dsn: str, ops: int, rounds: int = 2) -> tuple[float, float]:
    """Settlement throughput of each database, alternating (a shared machine drifts): the best round of each."""
    empty, grown = [], []
    for _ in range(rounds):
        empty.append(await settles(empty_dsn, ops))
        grown.append(await settles(grown_dsn, ops))
    return max(empty), max(grown)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pg = EmbeddedPostgres.throwaway()
    pg.durable = True  # fsync, synchronous_commit, full_page_writes on: what a production ledger runs
    try:
        pg.start()
        base = pg.admin_dsn("postgres").rsplit("/", 1)[0]
        dsn, empty_dsn = base + "/growth", base + "/growth_empty"
        admin = await asyncpg.connect(pg.admin_dsn("postgres"))
        await admin.execute("CREATE DATABASE growth")
        await admin.execute("CREATE DATABASE growth_empty")
        await admin.close()
        await migrate(dsn)
        await migrate(empty_dsn)
        pool = await create_pool(dsn, max_size=20, min_size=10)
        result: dict[str, Any] = {"records": args.records, "big_account_records": args.big, "accounts": args.accounts}
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await generate_history(conn, BIG, 200, start=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
                                       step=dt.timedelta(minutes=10), tag="empty")
                await conn.execute("VACUUM ANALYZE")
                result["empty"] = {"views": await views(pool, calls=args.calls)}
                result["fill_s"] = round(await fill(conn, records=args.records, big=args.big,
                                                    accounts=args.accounts), 1)
                result["db_size_mb"] = round(await conn.fetchval("SELECT pg_database_size('growth')") / 1e6)
                await conn.execute("CHECKPOINT")
            finally:
                await conn.close()
            empty_rate, grown_rate = await settle_rounds(empty_dsn, dsn, args.settles)
            result["empty"]["settles_per_s"] = empty_rate
            result["grown"] = {"settles_per_s": grown_rate,
                               "views": await views(pool, calls=args.calls),
                               "seq_scans_with_generic_plans": await generic_plans(pool),
                               "export_unpaced": await export(pool, paced=False)}
            if args.paced_export:
                result["grown"]["export_paced"] = await export(pool, paced=True)
        finally:
            await pool.close()
        return result
    finally:
        pg.close()


def table(result: dict[str, Any]) -> str:
    lines = [f"records {result['records']:,} (big account {result['big_account_records']:,}) over "
             f"{result['accounts']:,} accounts; fill {result['fill_s']} s; database {result['db_size_mb']:,} MB", "",
             "| view | empty c1 p50/p99 | empty c8 p50/p99 | grown c1 p50/p99 | grown c8 p50/p99 |",
             "|---|---|---|---|---|"]
    for name, grown in result["grown"]["views"].items():
        empty = result["empty"]["views"][name]
        cells = [f"{v['p50_ms']} / {v['p99_ms']}" for v in (empty["c1"], empty["c8"], grown["c1"], grown["c8"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    e, g = result["empty"]["settles_per_s"], result["grown"]["settles_per_s"]
    lines += ["", f"settlements/s: empty {e}, grown {g} ({(g - e) / e * 100:+.1f} %)",
              f"export (unpaced): {result['grown']['export_unpaced']}"]
    if "export_paced" in result["grown"]:
        lines.append(f"export (paced as served): {result['grown']['export_paced']}")
    seq_scans = result["grown"]["seq_scans_with_generic_plans"]
    lines.append(f"statements with a seq scan under force_generic_plan: {seq_scans or 'none'}")
    worst = max(v["c8"]["p99_ms"] for v in result["grown"]["views"].values())
    lines.append(f"targets: every view p99 < 50 ms at c8: {'yes' if worst < 50 else 'NO'} (worst {worst} ms); "
                 f"settlements within 10 %: {'yes' if g >= 0.9 * e else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200,000 records, 20,000 in the big account")
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--big", type=int, default=None, help="records of the one big account (default records/10,"
                        " at most 1,000,000)")
    parser.add_argument("--accounts", type=int, default=50_000)
    parser.add_argument("--calls", type=int, default=200, help="calls per view and client count")
    parser.add_argument("--settles", type=int, default=10_000)
    parser.add_argument("--paced-export", action="store_true", help="also time the export at the served pace")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.accounts, args.calls, args.settles = 200_000, 2_000, 100, 3_000
        args.big = args.big or 20_000
    args.big = args.big or min(args.records // 10, 1_000_000)
    result = uvloop.run(run(args))
    print(table(result))
    print("GROWTH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
