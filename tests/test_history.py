"""History that grows (migration 0010): monthly partitions made ahead and on demand, the ledger's
uniqueness rules kept across partitions, existing history converted, the views' plans on indexes even
as generic plans, and retention that archives a closed month with the books still checkable."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from benchmarks.history_data import generate_history
from tokensforge import archive
from tokensforge.db import migrate, migration_files
from tokensforge.embedded_pg import EmbeddedPostgres
from tokensforge.ledger.store import usage_query

from .invariants import assert_ledger_invariants

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
async def own_db(pg: EmbeddedPostgres) -> AsyncIterator[str]:
    """An empty database (no migrations) that this file's tests check themselves."""
    name = "h_" + secrets.token_hex(6)
    admin = await asyncpg.connect(pg.admin_dsn("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield pg.admin_dsn(name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def partitions(conn: asyncpg.Connection, table: str) -> list[str]:
    return [r["relname"] for r in await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::regclass ORDER BY 1", table)]


async def settle(conn: asyncpg.Connection, account: str, request_id: str, charge: int) -> None:
    """A reservation and its settlement through the ledger's own functions."""
    row = await conn.fetchrow("SELECT * FROM tf_reserve($1, $1, $2, 'credit', $3, 60, '{}', '{}', '{}', NULL)",
                              request_id, account, 2 * charge)
    assert row["outcome"] == "ok", row
    record = {"request_id": request_id, "account_id": account, "status": "succeeded", "bucket": "credit",
              "selected_model": "m", "route": {"id": "m/official", "kind": "official"}, "reserved_nanos": 2 * charge}
    row = await conn.fetchrow("SELECT * FROM tf_finish_item($1, $2, 'settled', $3::jsonb)", request_id, charge,
                              json.dumps(record))
    assert row["outcome"] == "ok", row


async def test_migration_converts_existing_history_and_keeps_every_rule(own_db: str) -> None:
    conn = await asyncpg.connect(own_db)
    try:
        # a database at 0001–0009 with history in it, one entry from four months ago
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        for version, name, sql in migration_files():
            if version < 10:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
        await conn.execute("INSERT INTO accounts (id, name) VALUES ('acct_a', 'a')")
        await conn.fetch("SELECT * FROM tf_topup('acct_a', 'credit', 1000000, 'k1', NULL)")
        old = NOW - dt.timedelta(days=120)
        await conn.execute(  # an old top-up, as it was posted then (append-only: inserted, never moved)
            "INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, note, created_at)"
            " VALUES ('acct_a', 'credit', 'adjustment', 5, 1000005, 'old', $1)", old)
        await conn.execute("UPDATE buckets SET balance_nanos = balance_nanos + 5 WHERE account_id = 'acct_a'")
        for i in range(3):
            await settle(conn, "acct_a", f"req_{i}", 1000 + i)
        before = {t: await conn.fetch(f"SELECT * FROM {t} ORDER BY seq") for t in ("ledger_entries", "usage_records")}
        assert await migrate(conn) == [n for v, n, _ in migration_files() if v >= 10]
        for table, rows in before.items():  # every row, every column, same seq and id
            assert [dict(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY seq")] == [dict(r) for r in rows]
            names = await partitions(conn, table)
            assert f"{table}_p{NOW:%Y_%m}" in names and len(names) >= 3
        assert f"ledger_entries_p{old:%Y_%m}" in await partitions(conn, "ledger_entries")  # back to the oldest row
        assert await conn.fetchval("SELECT relkind FROM pg_class WHERE relname = 'usage_records'") == b"p"
        # writers keep working: the sequence goes on, a request is charged once and recorded once
        await settle(conn, "acct_a", "req_3", 7)
        assert await conn.fetchval("SELECT max(seq) FROM ledger_entries") > before["ledger_entries"][-1]["seq"]
        with pytest.raises(asyncpg.UniqueViolationError, match="ledger_one_charge_per_request"):
            await conn.execute(  # a second charge for req_0, even in another month's partition
                "INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id,"
                " created_at) VALUES ('acct_a', 'credit', 'charge', -1, 0, 'req_0', $1)", old)
        await conn.execute("SELECT tf_record($1::jsonb)", json.dumps(
            {"request_id": "req_1", "account_id": "acct_a", "status": "failed"}))
        assert await conn.fetchval("SELECT count(*) FROM usage_records WHERE request_id = 'req_1'") == 1
        assert await conn.fetchval("SELECT status FROM usage_records WHERE request_id = 'req_1'") == "succeeded"
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE ledger_entries SET note = 'x' WHERE request_id = 'req_0'")
        await assert_ledger_invariants(conn)
        # the spend summary's hourly rollup holds exactly what the records say (converted rows and new ones)
        assert await conn.fetch("""
            SELECT account_id, hour, bucket, model, route_id, route_kind, charge_nanos, requests FROM usage_hourly
            EXCEPT
            SELECT account_id, date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                   coalesce(bucket, ''), coalesce(model, ''), coalesce(route_id, ''), coalesce(route_kind, ''),
                   sum(charge_nanos), count(*) FROM usage_records GROUP BY 1, 2, 3, 4, 5, 6""") == []
        assert await conn.fetchval("SELECT sum(requests) FROM usage_hourly") == 4
    finally:
        await conn.close()


async def test_partitions_are_made_ahead_and_on_demand(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        months = [f"{NOW.year + (NOW.month + i - 1) // 12}_{(NOW.month + i - 1) % 12 + 1:02d}" for i in range(3)]
        for table in ("usage_records", "ledger_entries"):
            assert {f"{table}_p{m}" for m in months} <= set(await partitions(conn, table))
        assert await conn.fetchval("SELECT tf_history_ensure_partitions(2)") == 0  # idempotent
        assert await conn.fetchval("SELECT tf_history_ensure_partitions(4)") == 4  # two more months, two tables
        far = NOW + dt.timedelta(days=100)
        await conn.execute("INSERT INTO accounts (id, name) VALUES ('a', 'a')")
        await conn.execute("INSERT INTO buckets (account_id, bucket) VALUES ('a', 'credit')")
        await conn.execute(  # a row lands in its month's partition (0 net: the books stay balanced)
            "INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, created_at)"
            " VALUES ('a', 'credit', 'adjustment', 1, 1, $1), ('a', 'credit', 'adjustment', -1, 0, $1)", far)
        assert await conn.fetchval(f"SELECT count(*) FROM ledger_entries_p{far:%Y_%m}") == 2
        # the CHECK that let ATTACH skip its scan is gone once attached: the bound says the same (0012)
        checks = await conn.fetch(
            "SELECT c.conname FROM pg_constraint c JOIN pg_inherits i ON i.inhrelid = c.conrelid"
            " WHERE c.contype = 'c' AND i.inhparent IN ('usage_records'::regclass, 'ledger_entries'::regclass)"
            " AND c.conname LIKE '%\\_range'")
        assert checks == []
        with pytest.raises(asyncpg.CheckViolationError):  # the table's own CHECKs stay on every partition
            await conn.execute(
                "INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, created_at)"
                " VALUES ('a', 'credit', 'adjustment', 0, 0, $1)", far)
    finally:
        await conn.close()


async def test_views_plan_on_indexes_even_as_generic_plans(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for i in range(4):
            await generate_history(conn, f"acct_{i}", 5000, start=NOW - dt.timedelta(days=40),
                                   step=dt.timedelta(minutes=10))
        await conn.execute("ANALYZE")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        shapes = [usage_query("acct_1", after=None, filters={}),
                  usage_query("acct_1", after=123, filters={"status": "failed"}),
                  usage_query("acct_1", after=None, filters={"model": "gpt-4o", "bucket": "credit"}),
                  usage_query("acct_1", after=None, filters={"route_kind": "routed"})]
        for sql, args in shapes:
            await conn.execute(f"PREPARE q AS {sql} LIMIT 21")
            plan = "\n".join(r[0] for r in await conn.fetch(
                f"EXPLAIN EXECUTE q({', '.join(_literal(a) for a in args)})"))
            await conn.execute("DEALLOCATE q")
            assert "Seq Scan" not in plan and "Index" in plan, (sql, plan)
        for sql in ("SELECT * FROM ledger_entries WHERE account_id = $1 AND seq < coalesce($2::bigint,"
                    " 9223372036854775807) ORDER BY seq DESC LIMIT 21",
                    "SELECT * FROM ledger_entries WHERE account_id = $1 AND bucket = $3 AND seq < coalesce($2::bigint,"
                    " 9223372036854775807) ORDER BY seq DESC LIMIT 21"):
            await conn.execute(f"PREPARE q AS {sql}")
            args = "'acct_1', NULL" + (", 'research-free'" if "$3" in sql else "")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE q({args})"))
            await conn.execute("DEALLOCATE q")
            assert "Seq Scan" not in plan and "Index" in plan, (sql, plan)
    finally:
        await conn.close()


def _literal(value: object) -> str:
    return "NULL" if value is None else str(value) if isinstance(value, int) else f"'{value}'"


async def test_archive_moves_a_closed_month_to_a_checksummed_file_and_the_books_still_balance(
        pg: EmbeddedPostgres, template_db: str, tmp_path: Path) -> None:
    name = "h_" + secrets.token_hex(6)
    admin = await asyncpg.connect(pg.admin_dsn("postgres"))
    await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    dsn = pg.admin_dsn(name)
    conn = await asyncpg.connect(dsn)
    try:
        old = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(days=75)  # a closed month
        await generate_history(conn, "acct_a", 3000, start=old, step=dt.timedelta(seconds=60), tag="old")
        await generate_history(conn, "acct_b", 1000, start=old, step=dt.timedelta(seconds=60), tag="old")
        for account in ("acct_a", "acct_b"):  # money that arrived in the closed month and is still there
            await conn.execute(
                "INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, note,"
                " created_at) VALUES ($1, 'credit', 'adjustment', 777, 777, 'old credit', $2)",
                account, old + dt.timedelta(days=1))
            await conn.execute("UPDATE buckets SET balance_nanos = 777 WHERE account_id = $1", account)
        await generate_history(conn, "acct_a", 500, start=NOW - dt.timedelta(hours=1), step=dt.timedelta(seconds=1),
                               tag="new")
        await assert_ledger_invariants(conn)
        live_before = await conn.fetchval("SELECT count(*) FROM usage_records")
        months = await archive.closed_months(conn, 1)
        assert months and all(m < (NOW - dt.timedelta(days=28)).date() for m in months)
        done = await archive.archive(dsn, keep_months=1, directory=tmp_path)
        archived = {(a.table, a.month): a for a in done}
        assert {t for t, _ in archived} == {"ledger_entries", "usage_records"}
        assert sum(a.rows for a in done if a.table == "usage_records") == 4000
        assert await conn.fetchval("SELECT count(*) FROM usage_records") == live_before - 4000
        for a in done:  # each file matches its manifest: checksum, rows, per-bucket totals
            manifest = archive.verify_file(a.file.with_name(a.file.name.removesuffix(".jsonl.gz") + ".manifest.json"))
            assert manifest["sha256"] == a.sha256 and manifest["rows"] == a.rows
            assert f"{a.table}_p{a.month:%Y_%m}" not in await partitions(conn, a.table)
        with gzip.open(archived[("usage_records", old.date().replace(day=1))].file, "rb") as f:
            first = json.loads(f.readline())
        assert first["account_id"] in ("acct_a", "acct_b") and first["receipt"]["charge_nanos"] == first["charge_nanos"]
        # the live ledger alone no longer sums to the balances; live + archived totals do, to the nano
        assert await conn.fetchval("SELECT count(*) FROM buckets b WHERE balance_nanos <>"
                                   " (SELECT coalesce(sum(amount_nanos), 0) FROM ledger_entries l"
                                   "  WHERE l.account_id = b.account_id AND l.bucket = b.bucket)") == 2
        assert await archive.verify_books(conn) == []
        # each live entry's balance_after is the archived total plus the live running sum
        assert await conn.fetchval("""
            SELECT count(*) FROM (SELECT l.balance_after_nanos, coalesce(a.total, 0)
                     + sum(l.amount_nanos) OVER (PARTITION BY l.account_id, l.bucket ORDER BY l.seq) AS running
                  FROM ledger_entries l LEFT JOIN (
                      SELECT split_part(key, E'\\t', 1) AS account_id, split_part(key, E'\\t', 2) AS bucket,
                             sum((value ->> 'amount_nanos')::numeric) AS total
                      FROM history_archives, jsonb_each(bucket_totals) GROUP BY 1, 2) a USING (account_id, bucket)) x
            WHERE balance_after_nanos <> running""") == 0
        # the archived month's guard rows went with it; the live ones stay
        assert await conn.fetchval("SELECT count(*) FROM usage_request_ids") == live_before - 4000
        assert await conn.fetchval("SELECT count(*) FROM ledger_charge_requests") == 500
        assert await archive.archive(dsn, keep_months=1, directory=tmp_path) == []  # nothing left to do
        # a tampered file is caught
        victim = done[0].file
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="SHA-256"):
            archive.verify_file(victim.with_name(victim.name.removesuffix(".jsonl.gz") + ".manifest.json"))
    finally:
        await conn.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
