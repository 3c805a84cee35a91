"""The ledger's SQL: every money movement is one call of a database function.

Database errors are translated here and nowhere else: connection trouble
becomes LedgerUnavailable (the gateway fails closed); serialization failures and
deadlocks are retried. Settlements and reservations are grouped into shared
transactions (group commit); one item whose data the database refuses is then
retried alone, so it never fails the others. A settlement whose connection drops
is looked up by id: if it committed, the caller gets its real result.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg

from .. import metrics
from ..db import reads, view_connection
from ..errors import (
    BudgetExceeded,
    IdempotencyConflict,
    InvalidRequest,
    InsufficientBalance,
    LedgerError,
    LedgerOutcomeUnknown,
    LedgerRejected,
    LedgerUnavailable,
    NotFound,
    ReservationResolved,
)
from .model import BudgetLimit, Held, Outcome, clean_record

log = logging.getLogger("tokensforge.ledger")

_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    # a multi-host URL with target_session_attrs=read-write while no host is a primary (mid-failover:
    # TargetServerAttributeNotMatched), or a connection left in a broken state by a server killed under
    # it ("cannot switch to state ...; another operation is in progress"): asyncpg's client-side errors
    asyncpg.exceptions.InternalClientError,
    # a standby that was promoted under a session, or a primary demoted: writes refused as read-only
    asyncpg.ReadOnlySQLTransactionError,
)
# SQLSTATE classes that say the server cannot work right now, whatever the data:
# insufficient resources (disk full, out of memory), operator intervention, system error.
_SERVER_TROUBLE = ("53", "57", "58")
_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
_MAX_RETRIES = 3
_SMALL_BATCH = 3  # lease settlements of up to this many items go item by item
_UNAVAILABLE_MESSAGE = "the ledger database is unavailable; nothing was charged"


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate or "")[:2] in _SERVER_TROUBLE:
        return True
    return isinstance(exc, _UNAVAILABLE)


def _rejected(exc: BaseException) -> bool:
    """The database refused the data of this statement (not the connection, not a race)."""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _RETRYABLE) and not _unavailable(exc)


class _NothingSent(LedgerUnavailable):
    """No connection could be had, so the statement never left: its outcome is not in doubt."""


@asynccontextmanager
async def translated(op: str) -> AsyncIterator[None]:
    """Time a ledger operation and map database failures to domain errors."""
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:
        if _unavailable(exc):
            raise LedgerUnavailable(_UNAVAILABLE_MESSAGE) from exc
        raise
    finally:
        metrics.child(metrics.LEDGER_OP_DURATION, op).observe(time.perf_counter() - started)


Item = TypeVar("Item")
Result = TypeVar("Result")


class _Batcher(Generic[Item, Result]):
    """Group commit without a timer: while `max_inflight` batches are in the database, new
    items queue up and go together in the next one. At low load an item goes at once, alone;
    under load many share one transaction, one round trip and one commit. `flush` answers
    each item with its result or the exception its caller should see."""

    def __init__(self, flush: Callable[[list[Item]], Awaitable[list[Result | Exception]]],
                 max_batch: int, max_inflight: int) -> None:
        self._flush_fn = flush
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until done

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            batch, self._queue = self._queue[:self._max_batch], self._queue[self._max_batch:]
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._flush_fn([item for item, _ in batch])
        except BaseException as exc:  # the whole transaction failed: every caller hears why
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._inflight -= 1
            self._kick()


_Settlement = tuple[str, int, "dict[str, Any] | None"]
_LeaseSettlement = tuple[str, str, int, "dict[str, Any] | None"]  # lease id, request id, charge, record


@dataclass(frozen=True, slots=True)
class UsageFilters:
    """What `GET /v1/usage` narrows the records by (None: any); `project_id` scopes a project's key."""

    model: str | None = None
    route_kind: str | None = None
    bucket: str | None = None
    status: str | None = None
    key_id: str | None = None
    project_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    outcome: str  # ok | insufficient_balance | budget_exceeded | small | pool | stale
    granted_nanos: int
    available_nanos: int  # the bucket's available balance after the grant
    lease_nanos: int  # what the lease holds now


@dataclass(frozen=True, slots=True)
class _Hold:
    reservation_id: str
    request_id: str
    account_id: str
    bucket: str
    amount_nanos: int
    budgets: Sequence[BudgetLimit]
    receipt: dict[str, Any] | None


class LedgerStore:
    """Top-ups, reservations, settlement and the account's money views.

    `acquire_timeout_s` bounds the wait for a pool connection (then LedgerUnavailable);
    `resolve_window_s` bounds how long a settlement whose connection dropped keeps asking
    the database whether it committed."""

    def __init__(self, pool: asyncpg.Pool, *, reservation_ttl_s: float = 600.0, max_batch: int = 128,
                 max_inflight_batches: int = 4, acquire_timeout_s: float = 5.0,
                 resolve_window_s: float = 2.0) -> None:
        self.pool = pool
        self.reservation_ttl_s = reservation_ttl_s
        self.acquire_timeout_s = acquire_timeout_s
        self.resolve_window_s = resolve_window_s
        self._settles: _Batcher[_Settlement, tuple[str | None, int]] = _Batcher(
            self._finish_many, max_batch, max_inflight_batches)
        self._holds: _Batcher[_Hold, Held] = _Batcher(self._reserve_many, max_batch, max_inflight_batches)
        # settlements against leases are the one write per request. Two batches in flight that touch the
        # same account only queue on its bucket row (each holds it until its commit), so they go by lease
        # into shards of one batch in flight each: batches of different shards touch different leases
        # (so mostly different accounts) and run side by side; within a shard whatever arrives while a
        # batch is in the database goes in the next one, whole (one hot account: fewer, larger batches)
        self._lease_settles: list[_Batcher[_LeaseSettlement, tuple[str | None, int]]] = [
            _Batcher(self._lease_finish_many, max_batch, 1) for _ in range(min(max_inflight_batches, 2))]
        self._traces: _Batcher[tuple[str, dict[str, Any]], None] = _Batcher(
            self._trace_many, max_batch, min(max_inflight_batches, 2))

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await self.pool.acquire(timeout=self.acquire_timeout_s)
        except Exception as exc:
            if _unavailable(exc):
                raise _NothingSent(_UNAVAILABLE_MESSAGE) from exc
            raise
        try:
            yield conn
        finally:
            await self.pool.release(conn)

    async def _call(self, op: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        for attempt in range(_MAX_RETRIES):
            try:
                async with translated(op), self._connection() as conn:
                    rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
                    return rows
            except _RETRYABLE:
                if attempt == _MAX_RETRIES - 1:
                    raise
                await asyncio.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _read(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with translated("read"), self._connection() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows

    def _view_connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection for the account views: the standby's pool when one is attached (db.reads), the
        primary's if the standby cannot be had (translated() turns a failure into LedgerUnavailable)."""
        return view_connection(self.pool, timeout_s=self.acquire_timeout_s)

    async def _view(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with translated("read"), self._view_connection() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows

    async def topup(
        self, account_id: str, bucket: str, amount_nanos: int, idempotency_key: str, note: str | None,
    ) -> tuple[asyncpg.Record, bool]:
        """Credit a bucket once per idempotency key; returns (entry, created)."""
        try:
            rows = await self._call(
                "topup", "SELECT outcome, entry_seq FROM tf_topup($1, $2, $3, $4, $5)",
                account_id, bucket, amount_nanos, idempotency_key, note)
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"account {account_id!r} does not exist", param="account_id") from None
        except asyncpg.NumericValueOutOfRangeError:  # checked where it happens, so concurrent top-ups agree
            raise InvalidRequest(f"this top-up would take bucket {bucket!r} past the largest balance the ledger "
                                 "holds (2^63 - 1 nano-USD)", param="amount_nanos") from None
        outcome, seq = rows[0]["outcome"], rows[0]["entry_seq"]
        if outcome == "conflict":
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} was already used with a different bucket or amount",
                param="idempotency_key")
        entries = await self._read("SELECT * FROM ledger_entries WHERE seq = $1", seq)
        return entries[0], outcome == "created"

    async def reserve(
        self, reservation_id: str, account_id: str, bucket: str, amount_nanos: int,
        budgets: Sequence[BudgetLimit] = (), receipt: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Held:
        """Hold `amount_nanos` in the bucket (and budgets); returns the available amount left, which
        also tells which pool period holds the money (`pool_period_end`, None for a prepaid bucket).

        Concurrent reservations are grouped into one transaction (group commit); each one is
        still all-or-nothing. A pool whose period has ended is caught up first, in the same
        transaction, so an expired allowance is never spent."""
        return await self._holds.submit(_Hold(reservation_id, request_id or reservation_id, account_id, bucket,
                                              amount_nanos, budgets, _cleaned(receipt)))

    async def _reserve_many(self, holds: list[_Hold]) -> list[Held | Exception]:
        try:
            rows = await self._call(
                "reserve", "SELECT * FROM tf_reserve_many($1, $2, $3, $4, $5, $6, $7, $8) ORDER BY idx",
                [h.reservation_id for h in holds], [h.request_id for h in holds], [h.account_id for h in holds],
                [h.bucket for h in holds], [h.amount_nanos for h in holds], self.reservation_ttl_s,
                [[{"scope": b.scope, "period": b.period, "limit": b.limit_nanos} for b in h.budgets] for h in holds],
                [h.receipt for h in holds])
        except Exception as exc:
            if not _rejected(exc):
                raise
            return await _one_by_one("reservation", holds, self._reserve_many, exc)
        return [_hold_result(h, row) for h, row in zip(holds, rows, strict=True)]

    async def finish(
        self, reservation_id: str, charge_nanos: int, record: dict[str, Any] | None,
    ) -> tuple[str | None, int]:
        """Settle (charge > 0) or void (charge 0) a reservation; returns (ledger entry id, balance after).

        With a record, the usage record is written in the same transaction. Concurrent calls
        are grouped into one transaction (group commit). If the connection drops mid-call, the
        reservation is looked up: a settlement that committed returns its real result; one that
        did not raises LedgerUnavailable (the reservation stays open, nothing was charged); if
        the database cannot be asked within `resolve_window_s`, LedgerOutcomeUnknown.
        """
        return await self._settles.submit((reservation_id, charge_nanos, _cleaned(record)))

    async def _finish_many(self, items: list[_Settlement]) -> list[tuple[str | None, int] | Exception]:
        try:
            rows = await self._call(
                "settle", "SELECT * FROM tf_finish_many($1, $2, $3, $4) ORDER BY idx",
                [i[0] for i in items], [i[1] for i in items],
                ["settled" if i[1] > 0 else "voided" for i in items], [i[2] for i in items])
        except _NothingSent:
            raise
        except LedgerUnavailable:  # the transaction may have committed before the connection dropped
            return await self._resolve(items)
        except Exception as exc:
            if not _rejected(exc):
                raise
            return await _one_by_one("settlement", items, self._finish_many, exc)
        return [_settle_result(item, row) for item, row in zip(items, rows, strict=True)]

    async def _resolve(self, items: list[_Settlement]) -> list[tuple[str | None, int] | Exception]:
        async def ask(batch: list[_Settlement]) -> list[tuple[str | None, int] | Exception]:
            found = await self._outcomes([i[0] for i in batch])
            return [_resolved_result(item, found.get(item[0])) for item in batch]

        return await self._patiently(items, ask, lambda item: f"reservation {item[0]}")

    async def _patiently(
        self, items: list[Item], ask: Callable[[list[Item]], Awaitable[list[Result | Exception]]],
        name: Callable[[Item], str],
    ) -> list[Result | Exception]:
        """Ask the database, patiently but within `resolve_window_s`, what became of settlements whose
        connection dropped; if it cannot be asked in time, each is LedgerOutcomeUnknown."""
        deadline = time.monotonic() + self.resolve_window_s
        delay_s = 0.05
        while True:
            try:
                return await ask(items)
            except LedgerUnavailable as exc:
                if time.monotonic() + delay_s > deadline:
                    log.error("could not learn within %.1f s whether %d settlement(s) committed (%r)",
                              self.resolve_window_s, len(items), exc.__cause__)
                    return [LedgerOutcomeUnknown(
                        "the ledger database went away while settling; whether the charge was posted is not "
                        f"known yet ({name(item)})") for item in items]
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.5)

    async def outcome(self, reservation_id: str) -> Outcome | None:
        """What became of a reservation: open, settled, voided or expired, with its charge entry,
        balance after and stored usage record. None if there is no such reservation."""
        return (await self._outcomes([reservation_id])).get(reservation_id)

    async def _outcomes(self, reservation_ids: list[str]) -> dict[str, Outcome]:
        # FOR SHARE waits for a settlement of the same reservation still in flight (its row lock),
        # so an 'open' answer is never a transaction that is about to commit.
        rows = await self._read(_OUTCOMES_SQL, reservation_ids)
        return {row["id"]: Outcome(row["id"], row["request_id"], row["status"], row["ledger_entry_id"],
                                   row["charge_nanos"], row["balance_after_nanos"], row["receipt"])
                for row in rows}

    # ------------------------------------------------------------------ leases (ledger/leases.py)

    async def lease_grow(self, lease_id: str, holder: str, account_id: str, bucket: str, *, want_nanos: int,
                         min_nanos: int, fraction_ppm: int, ttl_s: float,
                         budgets: Sequence[BudgetLimit] = ()) -> LeaseGrant:
        """Take (or grow) a lease in one round trip: up to `want_nanos`, at least `min_nanos`, at most
        the fraction of the bucket's available balance and what every budget has left."""
        rows = await self._call(
            "lease", "SELECT * FROM tf_lease_grow($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            lease_id, holder, account_id, bucket, want_nanos, min_nanos, fraction_ppm, ttl_s,
            [b.scope for b in budgets], [b.period for b in budgets], [b.limit_nanos for b in budgets])
        row = rows[0]
        return LeaseGrant(row["outcome"], row["granted"], row["available_nanos"], row["lease_nanos"])

    async def lease_finish(self, lease_id: str, request_id: str, charge_nanos: int,
                           record: dict[str, Any] | None) -> tuple[str | None, int]:
        """Settle a request carved from a lease (group commit, like `finish`); a lost reply is
        resolved through the request's usage record."""
        shard = self._lease_settles[zlib.crc32(lease_id.encode()) % len(self._lease_settles)]
        return await shard.submit((lease_id, request_id, charge_nanos, _cleaned(record)))

    async def _lease_finish_many(self, items: list[_LeaseSettlement]) -> list[tuple[str | None, int] | Exception]:
        try:
            rows = await self._call(
                "settle", lease_finish_sql(len(items)),
                [i[0] for i in items], [i[1] for i in items], [i[2] for i in items], [i[3] for i in items])
        except _NothingSent:
            raise
        except LedgerUnavailable:  # the transaction may have committed before the connection dropped
            return await self._resolve_leased(items)
        except Exception as exc:
            if not _rejected(exc):
                raise
            return await _one_by_one("settlement", items, self._lease_finish_many, exc)
        return [_lease_settle_result(item, row) for item, row in zip(items, rows, strict=True)]

    async def _resolve_leased(self, items: list[_LeaseSettlement]) -> list[tuple[str | None, int] | Exception]:
        """A leased request has no reservation row: what it left is its usage record."""
        async def ask(batch: list[_LeaseSettlement]) -> list[tuple[str | None, int] | Exception]:
            rows = await self._read(
                "SELECT request_id, charge_nanos, ledger_entry_id, (receipt ->> 'balance_after_nanos')::bigint AS"
                " balance FROM usage_records WHERE request_id = ANY($1::text[])", [i[1] for i in batch])
            found = {row["request_id"]: row for row in rows}
            return [_leased_resolution(item, found.get(item[1])) for item in batch]

        return await self._patiently(items, ask, lambda item: f"request {item[1]}")

    async def trace(self, lease_id: str, receipt: dict[str, Any]) -> None:
        """Make a stream carved from a lease durable as it starts (0009_stream_traces.sql): if its
        gateway dies before it settles, the sweeper writes its usage record (`gateway_lost`, charged 0).
        Group-committed like settlements."""
        await self._traces.submit((lease_id, clean_record(receipt)))

    async def _trace_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[None | Exception]:
        await self._call("trace", "SELECT tf_trace_many($1, $2)", [i[0] for i in items], [i[1] for i in items])
        return [None] * len(items)

    async def close_lost(self, grace_s: float, limit: int = 100) -> int:
        """The sweeper's pass over stream traces: forget settled ones, record the lost ones (SPEC §5.9)."""
        rows = await self._call("expire", "SELECT tf_close_lost($1, $2) AS n", grace_s, limit)
        count: int = rows[0]["n"]
        return count

    async def lease_charge_late(
        self, lease_id: str, request_id: str, charge_nanos: int, record: dict[str, Any] | None,
        budgets: Sequence[BudgetLimit],
    ) -> tuple[str | None, int]:
        """Post a charge whose lease a sweeper already voided, from the bucket's available balance if it
        is still there; else write the usage record unbilled and raise ReservationResolved."""
        rows = await self._call(
            "settle", "SELECT * FROM tf_lease_charge_late($1, $2, $3, $4, $5)", lease_id, request_id, charge_nanos,
            _cleaned(record), [b.limit_nanos for b in budgets])
        row = rows[0]
        if row["outcome"] == "ok":
            return row["ledger_entry_id"], row["balance_after_nanos"]
        if row["outcome"] == "unbilled":
            log.error("request %s went unbilled: its lease %s lapsed and the bucket can no longer cover %d nano-USD",
                      request_id, lease_id, charge_nanos)
        raise ReservationResolved(f"request {request_id} could not be charged: its lease {lease_id} is gone")

    async def lease_return(self, amounts: dict[str, int], *, close: bool) -> dict[str, int | None]:
        """Give unused lease money back (each lease by its amount, clamped to what it holds); with
        `close`, a lease that reaches zero ends. Answers each lease's amount left, None if it is gone."""
        ids = sorted(amounts)
        rows = await self._call("lease", "SELECT * FROM tf_lease_return($1, $2, $3)",
                                ids, [amounts[i] for i in ids], close)
        return {row["id"]: row["lease_nanos"] for row in rows}

    async def lease_renew(self, lease_ids: list[str], ttl_s: float) -> dict[str, int]:
        """Push open leases' expiry a TTL ahead; answers the ones still open with their amount."""
        rows = await self._call(
            "lease", "UPDATE reservations SET expires_at = now() + make_interval(secs => $2)"
                     " WHERE id = ANY($1::text[]) AND status = 'open' AND kind = 'lease' RETURNING id, amount_nanos",
            lease_ids, ttl_s)
        return {row["id"]: row["amount_nanos"] for row in rows}

    async def leased_by_others(self, account_id: str, bucket: str, holder: str) -> int:
        rows = await self._read(
            "SELECT coalesce(sum(amount_nanos), 0)::bigint AS n FROM reservations WHERE account_id = $1"
            " AND bucket = $2 AND status = 'open' AND kind = 'lease' AND holder <> $3", account_id, bucket, holder)
        return int(rows[0]["n"])

    async def notify(self, payload: str) -> None:
        """Tell every gateway process (LISTEN/NOTIFY, channel `tokensforge`)."""
        await self._call("notify", "SELECT pg_notify('tokensforge', $1)", payload)

    async def extend(self, reservation_id: str) -> bool:
        """Push an open reservation's expiry a full TTL ahead (a long stream is still alive)."""
        rows = await self._call(
            "extend", "UPDATE reservations SET expires_at = now() + make_interval(secs => $2)"
                      " WHERE id = $1 AND status = 'open' RETURNING 1", reservation_id, self.reservation_ttl_s)
        return bool(rows)

    async def record(self, receipt: dict[str, Any]) -> None:
        """A usage record for a request that reserved nothing."""
        await self._call("record", "SELECT tf_record($1)", clean_record(receipt))

    async def expire(self, limit: int = 100) -> int:
        rows = await self._call("expire", "SELECT tf_expire($1) AS n", limit)
        count: int = rows[0]["n"]
        return count

    async def balances(self, account_id: str) -> list[asyncpg.Record]:
        """Each bucket's balance, what requests hold (`reserved_nanos`) and what gateway processes hold
        in leases (`leased_nanos`): the account can spend leased money, since a process gives its lease
        back before it refuses a request for money."""
        return await self._read(_BALANCES_SQL + " ORDER BY b.bucket", account_id)

    async def available(self, account_id: str, bucket: str) -> int:
        """What the account can spend in the bucket: balance − requests' reservations (leases included)."""
        rows = await self._read(_BALANCES_SQL + " AND b.bucket = $2", account_id, bucket)
        return int(rows[0]["balance_nanos"] - rows[0]["reserved_nanos"]) if rows else 0

    async def balance(self, account_id: str, bucket: str) -> int:
        rows = await self._read(
            "SELECT balance_nanos FROM buckets WHERE account_id = $1 AND bucket = $2", account_id, bucket)
        return int(rows[0]["balance_nanos"]) if rows else 0

    async def ledger(
        self, account_id: str, *, limit: int, after: int | None, bucket: str | None = None,
        project_id: str | None = None,
    ) -> list[asyncpg.Record]:
        """The account's entries, newest first; for a project's key, the account's own entries (top-ups,
        grants, expiries) and the charges and refunds of that project's requests only. `seq < coalesce($2,
        max)` and a statement per filter shape: a pooled connection's generic plan can still walk an index
        backwards from the cursor (ledger_by_account[_bucket])."""
        args: list[Any] = [account_id, after, limit]
        sql = ("SELECT * FROM ledger_entries e WHERE e.account_id = $1"
               " AND e.seq < coalesce($2::bigint, " + _MAX_SEQ + ")")
        if bucket is not None:
            args.append(bucket)
            sql += f" AND e.bucket = ${len(args)}"
        if project_id is not None:
            args.append(project_id)
            sql += (f" AND (e.request_id IS NULL OR EXISTS (SELECT 1 FROM usage_records u"
                    f" WHERE u.request_id = e.request_id AND u.account_id = $1 AND u.project_id = ${len(args)}))")
        return await self._view(sql + " ORDER BY e.seq DESC LIMIT $3", *args)

    async def usage(
        self, account_id: str, *, limit: int, after: int | None,
        filters: UsageFilters | Mapping[str, Any] | None = None,
    ) -> list[asyncpg.Record]:
        """The account's usage records, newest first, narrowed by `filters` (a project's key: its project's)."""
        sql, args = usage_query(account_id, after=after, filters=filters)
        return await self._view(sql + f" LIMIT ${len(args) + 1}", *args, limit)

    async def receipt(self, account_id: str, request_id: str,
                      project_id: str | None = None) -> asyncpg.Record | None:
        """From the read replica, else (not replicated yet, or no replica) from the primary: a client
        that was just given an answer always finds its receipt."""
        sql = ("SELECT receipt, created_at, latency_ms FROM usage_records"
               " WHERE account_id = $1 AND request_id = $2 AND ($3::text IS NULL OR project_id = $3)")
        rows = await self._view(sql, account_id, request_id, project_id) if reads(self.pool) is not self.pool \
            else []
        if not rows:
            rows = await self._read(sql, account_id, request_id, project_id)
        return rows[0] if rows else None

    async def entry(self, entry_id: str) -> asyncpg.Record | None:
        rows = await self._read("SELECT * FROM ledger_entries WHERE id = $1", entry_id)
        return rows[0] if rows else None

    async def spend_summary(self, account_id: str, *, bin_s: int, bins: int, typical_of: int = 20,
                            top: int = 5, project_id: str | None = None) -> dict[str, list[asyncpg.Record]]:
        """Spend of an account (of one project, given `project_id`) over the last `bins` time bins of
        `bin_s` seconds (UTC-aligned, by the database clock): per bucket and bin (empty bins included),
        the top models and routes, and the median tokens of its last `typical_of` requests that reported usage."""
        args = (account_id, bin_s, bins)
        # the account's summary reads the hourly rollup; a project's (not in the rollup) its usage records
        series_sql, top_sql = (_SPEND_SERIES_SQL, _SPEND_TOP_SQL) if project_id is None else (
            _PROJECT_SPEND_SERIES_SQL, _PROJECT_SPEND_TOP_SQL)
        scope = () if project_id is None else (project_id,)
        async with translated("read"), self._view_connection() as conn:
            series = await conn.fetch(series_sql, *args, *scope)
            models = await conn.fetch(top_sql.format(key="model", extra="", group=""), *args, top, *scope)
            routes = await conn.fetch(top_sql.format(
                key="route_id", extra=", nullif(h.route_kind, '') AS route_kind", group=", h.route_kind"), *args,
                top, *scope)
            typical = await conn.fetch(_TYPICAL_SQL, account_id, typical_of, project_id)
        return {"series": series, "models": models, "routes": routes, "typical": typical}


_MAX_SEQ = "9223372036854775807"

#: the /v1/usage equality filters (UsageFilters field → usage_records column); each has an index led by
#: (account_id, column) or is selective by itself (request_id)
USAGE_FILTERS = {"model": "model", "route_kind": "route_kind", "bucket": "bucket", "status": "status",
                 "key_id": "key_id", "project_id": "project_id", "request_id": "request_id"}


def usage_query(account_id: str, *, after: int | None, filters: UsageFilters | Mapping[str, Any] | None,
                columns: str = "seq, receipt, created_at, latency_ms") -> tuple[str, list[Any]]:
    """The account's usage records newest first, from before the cursor, narrowed by the filters given
    (a UsageFilters, or a mapping of its field names). Only the filters present are in the text (one
    statement per filter shape), so even a generic plan has `column = $n` to use an index with; the caller
    appends LIMIT (or streams it all)."""
    f = filters if isinstance(filters, UsageFilters) else UsageFilters(**(filters or {}))
    args: list[Any] = [account_id, after]
    sql = f"SELECT {columns} FROM usage_records WHERE account_id = $1 AND seq < coalesce($2::bigint, {_MAX_SEQ})"
    for name, column in USAGE_FILTERS.items():
        value = getattr(f, name)
        if value is not None:
            args.append(value)
            sql += f" AND {column} = ${len(args)}"
    for value, condition in ((f.since, "created_at >= "), (f.until, "created_at < ")):
        if value is not None:
            args.append(value)
            sql += f" AND {condition}${len(args)}"
    return sql + " ORDER BY seq DESC", args


_BALANCES_SQL = """
SELECT b.bucket, b.balance_nanos, (b.reserved_nanos - coalesce(l.leased, 0))::bigint AS reserved_nanos,
       coalesce(l.leased, 0)::bigint AS leased_nanos
FROM buckets b
LEFT JOIN (SELECT bucket, sum(amount_nanos) AS leased FROM reservations
           WHERE account_id = $1 AND status = 'open' AND kind = 'lease' GROUP BY 1) l USING (bucket)
WHERE b.account_id = $1"""

# A settled reservation's charge entry is the one charge of its request (one per request id);
# a void has none: its balance is the one its usage record saw (same bucket), else the current one.
_OUTCOMES_SQL = """
SELECT r.id, r.request_id, r.status, l.id AS ledger_entry_id, coalesce(-l.amount_nanos, 0) AS charge_nanos,
       CASE WHEN r.status = 'open' THEN NULL
            WHEN l.id IS NOT NULL THEN l.balance_after_nanos
            WHEN u.bucket = r.bucket AND u.ledger_entry_id IS NULL
                 THEN coalesce((u.receipt ->> 'balance_after_nanos')::bigint, b.balance_nanos)
            ELSE b.balance_nanos END AS balance_after_nanos,
       u.receipt
FROM reservations r
LEFT JOIN ledger_entries l ON r.status = 'settled' AND l.request_id = r.request_id AND l.kind = 'charge'
LEFT JOIN usage_records u ON u.request_id = r.request_id
LEFT JOIN buckets b ON b.account_id = r.account_id AND b.bucket = r.bucket
WHERE r.id = ANY($1::text[])
FOR SHARE OF r"""


# Bins are aligned to the Unix epoch (UTC midnight for days), so every gateway draws the same chart.
_SPEND_WINDOW = """
WITH w AS (
    SELECT make_interval(secs => $2) AS step,
           date_bin(make_interval(secs => $2), now(), timestamptz '1970-01-01 00:00:00+00')
               - make_interval(secs => $2 * ($3 - 1)) AS start
)"""
# Every bucket's spend per bin of the window, empty bins included, from the CTE `used` (bucket, t, charge_nanos).
_SPEND_SERIES_TAIL = """
SELECT b.bucket, s.t, coalesce(used.charge_nanos, 0)::bigint AS charge_nanos
FROM (SELECT DISTINCT bucket FROM used) b
CROSS JOIN w
CROSS JOIN LATERAL generate_series(w.start, w.start + w.step * ($3 - 1), w.step) AS s(t)
LEFT JOIN used ON used.bucket = b.bucket AND used.t = s.t
ORDER BY b.bucket, s.t"""
# Both read the hourly rollup (usage_hourly, kept by the inserting transaction): a window is whole hours.
_SPEND_SERIES_SQL = _SPEND_WINDOW + """,
used AS (
    SELECT h.bucket, date_bin(w.step, h.hour, timestamptz '1970-01-01 00:00:00+00') AS t,
           sum(h.charge_nanos)::bigint AS charge_nanos
    FROM usage_hourly h, w
    WHERE h.account_id = $1 AND h.hour >= w.start AND h.bucket <> ''
    GROUP BY 1, 2
)""" + _SPEND_SERIES_TAIL
_SPEND_TOP_SQL = _SPEND_WINDOW + """
SELECT h.{key}{extra}, sum(h.charge_nanos)::bigint AS charge_nanos, sum(h.requests)::bigint AS requests
FROM usage_hourly h, w
WHERE h.account_id = $1 AND h.hour >= w.start AND h.{key} <> ''
GROUP BY h.{key}{group}
ORDER BY charge_nanos DESC, requests DESC, h.{key}
LIMIT $4"""
# A project's summary: the rollup has no project, so its usage records (covering (account_id, created_at)).
_PROJECT_SPEND_SERIES_SQL = _SPEND_WINDOW + """,
used AS (
    SELECT u.bucket, date_bin(w.step, u.created_at, timestamptz '1970-01-01 00:00:00+00') AS t,
           sum(u.charge_nanos)::bigint AS charge_nanos
    FROM usage_records u, w
    WHERE u.account_id = $1 AND u.created_at >= w.start AND u.bucket IS NOT NULL
      AND u.project_id = $4
    GROUP BY 1, 2
)""" + _SPEND_SERIES_TAIL
_PROJECT_SPEND_TOP_SQL = _SPEND_WINDOW + """
SELECT h.{key}{extra}, sum(h.charge_nanos)::bigint AS charge_nanos, count(*)::bigint AS requests
FROM usage_records h, w
WHERE h.account_id = $1 AND h.created_at >= w.start AND h.{key} IS NOT NULL AND h.project_id = $5
GROUP BY h.{key}{group}
ORDER BY charge_nanos DESC, requests DESC, h.{key}
LIMIT $4"""
_TYPICAL_SQL = """
SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY prompt_tokens) AS prompt_tokens,
       percentile_disc(0.5) WITHIN GROUP (ORDER BY completion_tokens) AS completion_tokens,
       count(*)::bigint AS requests
FROM (SELECT (receipt #>> '{usage,prompt_tokens}')::bigint AS prompt_tokens,
             (receipt #>> '{usage,completion_tokens}')::bigint AS completion_tokens
      FROM usage_records
      WHERE account_id = $1 AND ($3::text IS NULL OR project_id = $3)
        AND status = 'succeeded' AND jsonb_typeof(receipt #> '{usage,prompt_tokens}') = 'number'
      ORDER BY seq DESC LIMIT $2) last"""

def lease_finish_sql(items: int) -> str:
    """The statement that settles a batch of `items` lease settlements: small batches item by item,
    larger ones set-based, each the cheaper one there (0005_leases.sql; benchmarks/ledger_bench.py
    measures both)."""
    function = "tf_lease_finish_each" if items <= _SMALL_BATCH else "tf_lease_finish_many"
    return f"SELECT * FROM {function}($1, $2, $3, $4) ORDER BY idx"


def _cleaned(record: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if record is None else clean_record(record)


async def _one_by_one(
    what: str, items: list[Item], flush: Callable[[list[Item]], Awaitable[list[Result | Exception]]],
    exc: BaseException,
) -> list[Result | Exception]:
    """A batch the database refused: run each item in its own transaction, so only the item
    whose data is bad fails. Rare, so the extra round trips do not matter."""
    if len(items) == 1:
        sqlstate = getattr(exc, "sqlstate", None)
        log.warning("the ledger database refused a %s (%s: %s)", what, type(exc).__name__, sqlstate)
        rejected = LedgerRejected(f"the ledger database refused this {what} ({sqlstate}); nothing moved")
        rejected.__cause__ = exc
        return [rejected]
    results: list[Result | Exception] = []
    for item in items:
        try:
            results.extend(await flush([item]))
        except Exception as alone:  # this item's own answer; the others are already settled
            results.append(alone)
    return results


def _resolved_result(item: _Settlement, found: Outcome | None) -> tuple[str | None, int] | Exception:
    reservation_id, charge_nanos, _ = item
    if found is not None and found.status == "open":
        return LedgerUnavailable(_UNAVAILABLE_MESSAGE)
    wanted = "settled" if charge_nanos > 0 else "voided"
    if found is None or found.status != wanted or found.charge_nanos != charge_nanos:
        return ReservationResolved(f"reservation {reservation_id} is not open")
    assert found.balance_after_nanos is not None
    return found.ledger_entry_id, found.balance_after_nanos


def _hold_result(hold: _Hold, row: asyncpg.Record) -> Held | Exception:
    if row["outcome"] == "ok":
        return Held(row["available_nanos"], row["pool_period_end"])
    if row["outcome"] == "insufficient_balance":
        return InsufficientBalance(hold.bucket, hold.amount_nanos, row["available_nanos"])
    if row["outcome"] == "budget_exceeded":
        kind = row["budget_scope"].split(":")[0]
        return BudgetExceeded(
            f"the {kind} budget cannot cover this request: needs {hold.amount_nanos} nano-USD, "
            f"{row['budget_remaining_nanos']} left in the period",
            budget_scope=kind, needed_nanos=hold.amount_nanos, remaining_nanos=row["budget_remaining_nanos"])
    return LedgerError(f"reservation id {hold.reservation_id!r} is already used; nothing moved")


def _settle_result(item: _Settlement, row: asyncpg.Record) -> tuple[str | None, int] | Exception:
    if row["outcome"] == "ok":
        return row["ledger_entry_id"], row["balance_after_nanos"]
    if row["outcome"] == "resolved":
        return ReservationResolved(f"reservation {item[0]} is not open")
    return LedgerError(f"charge {item[1]} outside reservation {item[0]}; nothing moved")


def _lease_settle_result(item: _LeaseSettlement, row: asyncpg.Record) -> tuple[str | None, int] | Exception:
    if row["outcome"] == "ok":
        return row["ledger_entry_id"], row["balance_after_nanos"]
    if row["outcome"] == "resolved":
        return ReservationResolved(f"request {item[1]} is already settled, or its lease {item[0]} is gone")
    return LedgerError(f"charge {item[2]} outside lease {item[0]}; nothing moved")


def _leased_resolution(item: _LeaseSettlement, found: asyncpg.Record | None) -> tuple[str | None, int] | Exception:
    if found is None:
        return LedgerUnavailable(_UNAVAILABLE_MESSAGE)  # it did not commit: the carve still holds the money
    if found["charge_nanos"] != item[2]:
        return ReservationResolved(f"request {item[1]} is already settled")
    return found["ledger_entry_id"], found["balance"]
