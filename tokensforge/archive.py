"""Retention: a closed month of history leaves the database for a file, books intact.

For each table (ledger_entries, then usage_records) and each closed UTC month older than the kept
ones: every row of the month's partition is written as JSON lines, gzip-compressed, to
`<dir>/<table>-<YYYY-MM>.jsonl.gz`, with `<…>.manifest.json` beside it (the file's SHA-256, its rows
and, for the ledger, per-bucket totals); the same facts go into `history_archives`; then the partition
is detached (CONCURRENTLY: inserts and reads go on) and dropped, with its months' guard rows.
Balances stay checkable: balance = Σ archived per-bucket totals + Σ live entries
(`tf_ledger_bucket_totals()`, `verify_books`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

TABLES = ("ledger_entries", "usage_records")
_GUARDS = {"ledger_entries": ("ledger_charge_requests", "ledger_pool_grants"), "usage_records": ("usage_request_ids",)}


@dataclass(frozen=True)
class Archived:
    table: str
    month: dt.date
    file: Path
    sha256: str
    rows: int
    bucket_totals: dict[str, dict[str, int]]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def closed_months(conn: asyncpg.Connection, keep_months: int) -> list[dt.date]:
    """Months that have partitions and end before the kept ones (the current month always counts as kept)."""
    rows = await conn.fetch("""
        SELECT DISTINCT to_date(substring(c.relname from '_p([0-9]{4}_[0-9]{2})$'), 'YYYY_MM') AS month
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent IN ('usage_records'::regclass, 'ledger_entries'::regclass)
          AND c.relname ~ '_p[0-9]{4}_[0-9]{2}$'
        ORDER BY 1""")
    current = await conn.fetchval("SELECT (tf_month_start(now()) AT TIME ZONE 'UTC')::date")
    limit = _add_months(current, -keep_months)
    return [r["month"] for r in rows if r["month"] < limit]


def _add_months(day: dt.date, n: int) -> dt.date:
    index = day.year * 12 + day.month - 1 + n
    return dt.date(index // 12, index % 12 + 1, 1)


def _durable(tmp: Path, path: Path) -> None:
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


async def archive_month(conn: asyncpg.Connection, table: str, month: dt.date, directory: Path) -> Archived | None:
    """Archive one table's month (None if it has no partition); see the module's doc for the steps."""
    part = f"{table}_p{month:%Y_%m}"
    if await conn.fetchval("SELECT to_regclass($1)", part) is None:
        return None
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    path = directory / f"{table}-{month:%Y-%m}.jsonl.gz"
    totals: dict[str, dict[str, int]] = {}
    rows = 0
    # the month is closed (nothing is written to it any more); one snapshot reads rows and totals alike
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if table == "ledger_entries":
            for r in await conn.fetch(f"SELECT account_id, bucket, count(*) AS n, sum(amount_nanos) AS total"
                                      f" FROM {part} GROUP BY 1, 2 ORDER BY 1, 2"):
                totals[f"{r['account_id']}\t{r['bucket']}"] = {"entries": int(r["n"]), "amount_nanos": int(r["total"])}
        tmp = path.with_suffix(".tmp")
        with gzip.open(tmp, "wb", compresslevel=6) as out:
            async for r in conn.cursor(f"SELECT row_to_json(t)::text AS line FROM {part} t ORDER BY seq",
                                       prefetch=5000):
                out.write(r["line"].encode() + b"\n")
                rows += 1
        await asyncio.to_thread(_durable, tmp, path)
    digest = await asyncio.to_thread(sha256_of, path)
    manifest = {"table": table, "month": f"{month:%Y-%m}", "file": path.name, "sha256": digest, "rows": rows,
                "bucket_totals": totals}
    await asyncio.to_thread(path.with_name(path.name.removesuffix(".jsonl.gz") + ".manifest.json").write_text,
                            json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    # the partition leaves the parent without blocking inserts or reads (two transactions of its own)
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = $1::regclass)", part):
        await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {part} CONCURRENTLY")
    start = dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC)
    end = start.replace(year=month.year + (month.month == 12), month=month.month % 12 + 1)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO history_archives (table_name, month, file, sha256, rows, bucket_totals)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb)", table, month, str(path), digest, rows, json.dumps(totals))
        for guard in _GUARDS[table]:
            await conn.execute(f"DELETE FROM {guard} WHERE created_at >= $1 AND created_at < $2", start, end)
        await conn.execute(f"DROP TABLE {part}")
    return Archived(table, month, path, digest, rows, totals)


async def archive(dsn: str, *, keep_months: int, directory: Path) -> list[Archived]:
    """Archive every closed month older than the `keep_months` months before the current one."""
    if keep_months < 1:
        raise ValueError("keep at least one closed month (--keep-months ≥ 1)")
    conn = await asyncpg.connect(dsn)
    try:
        done: list[Archived] = []
        for month in await closed_months(conn, keep_months):
            for table in TABLES:
                found = await archive_month(conn, table, month, directory)
                if found is not None:
                    done.append(found)
        return done
    finally:
        await conn.close()


def verify_file(manifest_path: Path) -> dict[str, Any]:
    """Check an archive against its manifest (checksum, rows, and for the ledger the per-bucket totals
    recomputed from its lines); returns the manifest, raises ValueError on any difference."""
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    path = manifest_path.with_name(manifest["file"])
    if sha256_of(path) != manifest["sha256"]:
        raise ValueError(f"{path}: SHA-256 differs from its manifest")
    rows, totals = 0, dict[str, dict[str, int]]()
    with gzip.open(path, "rb") as f:
        for line in f:
            row = json.loads(line)
            rows += 1
            if manifest["table"] == "ledger_entries":
                t = totals.setdefault(f"{row['account_id']}\t{row['bucket']}", {"entries": 0, "amount_nanos": 0})
                t["entries"] += 1
                t["amount_nanos"] += int(row["amount_nanos"])
    if rows != manifest["rows"] or (manifest["table"] == "ledger_entries" and totals != manifest["bucket_totals"]):
        raise ValueError(f"{path}: rows or per-bucket totals differ from its manifest")
    return manifest


async def verify_books(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Buckets whose balance is not Σ archived totals + Σ live entries (empty when the books hold)."""
    bad: list[asyncpg.Record] = await conn.fetch("""
        SELECT b.account_id, b.bucket, b.balance_nanos, coalesce(t.amount_nanos, 0) AS total
        FROM buckets b LEFT JOIN tf_ledger_bucket_totals() t USING (account_id, bucket)
        WHERE b.balance_nanos <> coalesce(t.amount_nanos, 0)""")
    return bad
