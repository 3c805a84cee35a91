"""The account's history at scale: the CSV export that streams every matching usage record.

The database encodes the rows (`COPY (SELECT …) TO STDOUT WITH CSV`, a server-side stream over the
(account_id, seq) index) and the gateway only relays chunks of bytes, yielding to the event loop
after each one: memory stays at a chunk however many rows match, and other requests on the process
wait at most one chunk's relay. Money stays exact: integer nanos and their decimal USD strings are
computed in SQL with integer arithmetic, the way `money.usd` does it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from .errors import RateLimited
from .ledger.store import UsageFilters, usage_query

log = logging.getLogger("tokensforge.history")

#: the columns of the usage CSV, in order
CSV_COLUMNS = ("request_id", "created_at", "status", "model", "route_id", "route_kind", "bucket", "prompt_tokens",
               "completion_tokens", "reserved_nanos", "charge_nanos", "charge_usd", "ledger_entry_id", "latency_ms",
               "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens")

#: exports one key may run at once (across every gateway process: a transaction advisory lock per slot)
EXPORTS_PER_KEY = 2
#: exports one process serves at once (each holds a database connection while it streams)
EXPORTS_PER_PROCESS = 4
#: an export may take this long (the pool's command timeout is for ordinary statements)
EXPORT_TIMEOUT_S = 3600.0
#: an export's pace in CSV bytes a second (~12,000 rows: 1,000,000 rows take ~85 s). Exports are background
#: work; while the gateway waits the database stops producing rows (COPY's backpressure), so the pace caps
#: the export's database CPU as well as the gateway's
EXPORT_BYTES_PER_S = 2_000_000

_CHARGE = "coalesce((receipt ->> 'charge_nanos')::bigint, 0)"
_USAGE = "receipt #>> '{usage,%s}'"
_EXPORT_COLUMNS = ", ".join((
    "receipt ->> 'request_id' AS request_id",
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') AS created_at",
    "receipt ->> 'status' AS status",
    "receipt ->> 'selected_model' AS model",
    "receipt #>> '{route,id}' AS route_id",
    "receipt #>> '{route,kind}' AS route_kind",
    "receipt ->> 'bucket' AS bucket",
    f"{_USAGE % 'prompt_tokens'} AS prompt_tokens",
    f"{_USAGE % 'completion_tokens'} AS completion_tokens",
    "coalesce((receipt ->> 'reserved_nanos')::bigint, 0) AS reserved_nanos",
    f"{_CHARGE} AS charge_nanos",
    f"CASE WHEN {_CHARGE} < 0 THEN '-' ELSE '' END || (abs({_CHARGE}) / 1000000000)::text || '.'"
    f" || lpad((abs({_CHARGE}) % 1000000000)::text, 9, '0') AS charge_usd",
    "receipt ->> 'ledger_entry_id' AS ledger_entry_id",
    "latency_ms",
    *(f"coalesce({_USAGE % k}, '0') AS {k}" for k in CSV_COLUMNS[-4:]),
))

_slots = asyncio.Semaphore(EXPORTS_PER_PROCESS)


def export_query(account_id: str, *, filters: UsageFilters | Mapping[str, Any] | None,
                 since: dt.datetime | None = None, until: dt.datetime | None = None,
                 after: int | None = None) -> tuple[str, list[Any]]:
    """The usage export's SELECT (newest first, every matching row older than the cursor) and its arguments;
    `since`/`until` narrow the filters' own time range."""
    f = filters if isinstance(filters, UsageFilters) else UsageFilters(**(filters or {}))
    f = dataclasses.replace(f, since=since or f.since, until=until or f.until)
    return usage_query(account_id, after=after, filters=f, columns=_EXPORT_COLUMNS)


async def stream_usage_csv(pool: asyncpg.Pool, key_id: str, account_id: str, write: Callable[[bytes], Awaitable[None]],
                           *, filters: UsageFilters | Mapping[str, Any] | None, since: dt.datetime | None = None,
                           until: dt.datetime | None = None, after: int | None = None,
                           acquire_timeout_s: float = 5.0) -> int:
    """Stream the account's usage records as CSV (a header, then every matching row) to `write`;
    returns the bytes written. Raises RateLimited before writing anything if the key already runs
    EXPORTS_PER_KEY exports (in any process) or this process runs EXPORTS_PER_PROCESS."""
    if _slots.locked():
        raise RateLimited("too many usage exports are running on this gateway; retry shortly",
                          retry_after_s=1)
    sql, args = export_query(account_id, filters=filters, since=since, until=until, after=after)
    async with _slots:
        conn = await pool.acquire(timeout=acquire_timeout_s)
        try:
            async with conn.transaction(readonly=True):
                slot = await conn.fetchval(
                    "SELECT s FROM generate_series(0, $2 - 1) AS s"
                    " WHERE pg_try_advisory_xact_lock(hashtext('tf-export:' || $1), s) LIMIT 1",
                    key_id, EXPORTS_PER_KEY)
                if slot is None:
                    raise RateLimited(f"this key already runs {EXPORTS_PER_KEY} usage exports; retry when one ends",
                                      retry_after_s=5)
                sent, began = 0, time.monotonic()

                async def relay(chunk: bytes) -> None:
                    nonlocal sent
                    chunk = chunk.replace(b"\n", b"\r\n")  # RFC 4180 line ends (no field holds a newline)
                    sent += len(chunk)
                    await write(chunk)
                    # yield to every other request on this process between chunks, and keep the pace
                    await asyncio.sleep(max(0.0, began + sent / EXPORT_BYTES_PER_S - time.monotonic()))

                await conn.copy_from_query(sql, *args, output=relay, format="csv", header=True,
                                           timeout=EXPORT_TIMEOUT_S)
                return sent
        finally:
            await pool.release(conn)


#: months of partitions kept ready ahead of the current one, and how often every process checks
PARTITION_MONTHS_AHEAD = 2
PARTITION_CHECK_S = 3600.0


async def partitions_forever(pool: asyncpg.Pool, *, interval_s: float = PARTITION_CHECK_S) -> None:
    """Keep the history tables' monthly partitions made PARTITION_MONTHS_AHEAD months ahead (every
    process, harmlessly in parallel; a lock that is not free at once is left to the next pass)."""
    while True:
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '2s'")
                made = await conn.fetchval("SELECT tf_history_ensure_partitions($1)", PARTITION_MONTHS_AHEAD)
            if made:
                log.info("made %d history partition(s) ahead", made)
        except Exception as exc:  # keep checking whatever one pass hit; the months ahead leave time
            log.warning("history partitions: %s (will retry)", exc)
        await asyncio.sleep(interval_s)
