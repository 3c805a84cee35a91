"""Usage history generated in the database (generate_series, not HTTP): consistent books for the
growth benchmark and the history/export tests.

`generate_history` gives one account `n` usage records with realistic ~1 KB receipts spread from
`start` in steps of `step`, each with its charge ledger entry, plus one top-up posted first that
covers them all — so every SPEC §5 invariant holds afterwards (balance = Σ entries, each entry's
balance_after is the running sum, one charge per charged record)."""

from __future__ import annotations

import datetime as dt

import asyncpg

_GENERATE = """
WITH g AS (
    SELECT i, $3::timestamptz + $4::interval * i AS t, (1000 + (i::bigint * 7919) % 50000) AS c,
           $1 || '_h' || $7 || '_' || i AS rid,
           (ARRAY['gpt-4o-mini', 'gpt-4o', 'claude-haiku'])[1 + i % 3] AS model,
           (ARRAY['official', 'routed'])[1 + i % 2] AS kind
    FROM generate_series(1, $2::integer) AS i
), l AS (
    INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note,
                                created_at)
    SELECT $1, $5, 'charge', -c, $6::bigint - sum(c) OVER (ORDER BY i), rid, model, t FROM g ORDER BY i
    RETURNING id, request_id, balance_after_nanos
), r AS (  -- each charge is a settled reservation's (SPEC §5: a charge is posted by its settlement)
    INSERT INTO reservations (id, request_id, account_id, bucket, amount_nanos, status, expires_at, created_at,
                              resolved_at)
    SELECT rid, rid, $1, $5, 2 * c, 'settled', t + interval '10 minutes', t, t FROM g
)
INSERT INTO usage_records (request_id, account_id, key_id, status, model, route_id, route_kind, bucket,
                           reserved_nanos, charge_nanos, ledger_entry_id, latency_ms, receipt, created_at)
SELECT g.rid, $1, 'key_gen', 'succeeded', g.model, g.model || '/' || g.kind, g.kind, $5, 2 * g.c, g.c, l.id,
       20 + g.i % 400,
       jsonb_build_object(
           'object', 'receipt', 'request_id', g.rid, 'account_id', $1, 'key_id', 'key_gen', 'status', 'succeeded',
           'requested_model', g.model, 'selected_model', g.model,
           'route', jsonb_build_object('id', g.model || '/' || g.kind, 'kind', g.kind), 'bucket', $5,
           'usage', jsonb_build_object('prompt_tokens', 100 + g.i % 900, 'completion_tokens', 10 + g.i % 200,
                                       'total_tokens', 110 + g.i % 900 + g.i % 200, 'cache_read_tokens', 0,
                                       'cache_write_tokens', 0, 'cache_write_1h_tokens', 0, 'reasoning_tokens', 0),
           'reserved_nanos', 2 * g.c, 'charge_nanos', g.c,
           'charge_usd', '0.' || lpad(g.c::text, 9, '0'), 'ledger_entry_id', l.id,
           'balance_after_nanos', l.balance_after_nanos, 'latency_ms', 20 + g.i % 400,
           'attempts', jsonb_build_array(jsonb_build_object(
               'channel', 'primary', 'upstream_model', g.model, 'status', 200,
               'note', repeat('x', 600))),
           'created', extract(epoch FROM g.t)::bigint),
       g.t
FROM g JOIN l ON l.request_id = g.rid ORDER BY g.i"""


async def ensure_months(conn: asyncpg.Connection, start: dt.datetime, end: dt.datetime) -> None:
    """Partitions for every month from `start` to `end` (the sweeper only makes current and future ones)."""
    await conn.execute("""
        SELECT tf_history_partition(t, m) FROM unnest(ARRAY['usage_records', 'ledger_entries']) AS t,
               generate_series(tf_month_start($1), $2, interval '1 month') AS m""", start, end)


async def generate_history(conn: asyncpg.Connection, account_id: str, n: int, *, start: dt.datetime,
                           step: dt.timedelta, bucket: str = "credit", tag: str = "0") -> int:
    """n consistent usage records + charges for an existing account (its bucket row is made if missing);
    returns the total charged. `tag` keeps request ids unique across calls for one account."""
    total = int(await conn.fetchval(
        "SELECT coalesce(sum((1000 + (i::bigint * 7919) % 50000)), 0) FROM generate_series(1, $1::integer) i", n))
    await ensure_months(conn, start - dt.timedelta(seconds=1), start + step * n)
    async with conn.transaction():
        await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, 'generated') ON CONFLICT DO NOTHING",
                           account_id)
        await conn.execute("INSERT INTO buckets (account_id, bucket) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                           account_id, bucket)
        balance = int(await conn.fetchval(
            "SELECT balance_nanos FROM buckets WHERE account_id = $1 AND bucket = $2 FOR UPDATE", account_id, bucket))
        await conn.execute(
            "INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, note,"
            " idempotency_key, created_at) VALUES ($1, $2, 'topup', $3, $4, 'generated history', $5, $6)",
            account_id, bucket, total, balance + total, f"gen-{tag}", start - dt.timedelta(seconds=1))
        await conn.execute(_GENERATE, account_id, n, start, step, bucket, balance + total, tag)
    return total
