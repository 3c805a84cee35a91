"""Connection pools, the primary the gateway writes to, read replicas, and schema migrations.

High availability (README "High availability"): TOKENSFORGE_DATABASE_URL may name several hosts
with `target_session_attrs=read-write` (`postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write`,
as `pg_autoctl show uri --formation default` prints it). Every connection is opened that way: pooled
ones (requests, the sweeper, leases, rate permits), the LISTEN connection and the migrations; a
connection to a primary that died is dropped by the pool, and the next one goes to whichever host
is the primary then, so a promotion is followed without a restart. While no host is a primary,
connecting fails at once (refused, or `TargetServerAttributeNotMatched`), which the store turns
into 503 ledger_unavailable. `PRIMARY` keeps what the probe saw: which host is the primary and how
long this process has gone without one (/readyz and metrics show it).

Read replicas: with TOKENSFORGE_READ_DATABASE_URL set, `attach_replica` gives the pool a second
pool on a standby; `reads(pool)` is the pool the account views read from (usage, ledger, spend
summary, CSV, reports), the primary pool itself when there is none.

Migrations are the numbered SQL files in `migrations/`, applied in order, each
in its own transaction, under a PostgreSQL advisory lock so that many gateway
processes starting at once migrate exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import orjson

from . import metrics

log = logging.getLogger("tokensforge.db")

_MIGRATION_LOCK = 0x70F0_0001  # arbitrary, constant across versions
READ_URL_ENV = "TOKENSFORGE_READ_DATABASE_URL"


def _json_codecs(conn: asyncpg.Connection) -> Any:
    return conn.set_type_codec(
        "jsonb", encoder=lambda v: b"\x01" + orjson.dumps(v), decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog", format="binary",
    )


async def _init_connection(conn: asyncpg.Connection) -> None:
    await _json_codecs(conn)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (a round trip per use): pool connections never
    LISTEN, hold advisory locks or change settings; transactions always close in `async with`."""


class BoundedPool(asyncpg.Pool):  # type: ignore[misc]  # asyncpg ships no types
    """A pool whose `acquire()` (and so `fetch`, `execute`, ... on the pool) waits at most
    `acquire_timeout_s` for a free connection, then raises `TimeoutError`, which the store's
    `translated()` turns into LedgerUnavailable (503): with every connection busy a request
    fails closed instead of waiting for ever. An explicit `timeout=` still wins."""

    __slots__ = ("acquire_timeout_s", "acquired", "replica")

    def __init__(self, *args: Any, acquire_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout_s = acquire_timeout_s
        self.acquired = 0  # connections handed out so far (tests count queries with it)
        self.replica: asyncpg.Pool | None = None  # the views' pool on a standby (attach_replica)

    async def close(self) -> None:
        replica, self.replica = self.replica, None
        if replica is not None:
            await replica.close()
        await super().close()

    def acquire(self, *, timeout: float | None = None) -> Any:
        self.acquired += 1
        return super().acquire(timeout=self.acquire_timeout_s if timeout is None else timeout)


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 20,
                      acquire_timeout_s: float | None = 5.0, statement_cache_size: int = 100) -> asyncpg.Pool:
    """`statement_cache_size=0` makes asyncpg use only the unnamed prepared statement (Parse, Describe,
    Flush, then Bind, Execute, Sync: no ReadyForQuery in between, so PgBouncer keeps both on one server
    connection), which PgBouncer < 1.21 in transaction mode can carry; a named, cached statement lives on
    one server connection and is missing on the next (asyncpg issues #198, #339)."""
    pool = BoundedPool(
        dsn, acquire_timeout_s=acquire_timeout_s, min_size=min(min_size, max_size), max_size=max_size,
        init=_init_connection, reset=_keep_session, command_timeout=30, max_inactive_connection_lifetime=60,
        max_queries=50_000, loop=None, connection_class=asyncpg.Connection, record_class=asyncpg.Record,
        statement_cache_size=statement_cache_size,
    )
    await pool
    return pool


async def attach_replica(pool: asyncpg.Pool, dsn: str | None = None, *, max_size: int = 10,
                         acquire_timeout_s: float | None = 5.0, statement_cache_size: int = 100) -> asyncpg.Pool | None:
    """Open the views' pool on a standby (`dsn`, else TOKENSFORGE_READ_DATABASE_URL; none: nothing
    to do) and attach it to `pool`, which closes it with itself. A standby that is down at start is
    not fatal: the pool connects lazily (min_size 0) and the views fall back to the primary."""
    dsn = dsn or os.environ.get(READ_URL_ENV) or None
    if dsn is None or not isinstance(pool, BoundedPool):
        return None
    replica = BoundedPool(
        dsn, acquire_timeout_s=acquire_timeout_s, min_size=0, max_size=max_size, init=_init_connection,
        reset=_keep_session, command_timeout=30, max_inactive_connection_lifetime=60, max_queries=50_000,
        loop=None, connection_class=asyncpg.Connection, record_class=asyncpg.Record,
        statement_cache_size=statement_cache_size,
    )
    await replica
    pool.replica = replica
    return replica


def reads(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The pool account views read from: the standby's when one is attached, else `pool`. What a view
    must find even before it replicates (a receipt the client was just given) falls back to `pool`
    on a miss (LedgerStore.receipt)."""
    replica: asyncpg.Pool | None = getattr(pool, "replica", None)
    return replica if replica is not None else pool


@asynccontextmanager
async def view_connection(pool: asyncpg.Pool, *, timeout_s: float | None = None) -> AsyncIterator[asyncpg.Connection]:
    """A connection for an account view: from the standby's pool when one is attached and can be had in
    time, else from `pool` (the primary's); released on exit."""
    views = reads(pool)
    if views is not pool:
        try:
            conn = await views.acquire(timeout=timeout_s)
        except Exception as exc:  # the standby is away: the primary answers instead
            log.debug("read replica unavailable, reading from the primary: %r", exc)
        else:
            try:
                yield conn
            finally:
                await views.release(conn)
            return
    async with pool.acquire(timeout=timeout_s) as conn:
        yield conn


# ---------------------------------------------------------------------------------- the primary


@dataclass(slots=True)
class PrimaryWatch:
    """What this process's database probe saw: the primary's host:port, and the spells without one."""

    host: str | None = None
    lost_at: float | None = None  # monotonic time of the first probe that found no primary
    last_outage_s: float | None = None  # how long the last spell without a primary lasted
    changes: int = 0  # times the primary was found on another host than before

    def observe(self, host: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if host is None:
            if self.lost_at is None:
                self.lost_at = now
                log.warning("no primary database reachable (was %s)", self.host)
        else:
            if self.lost_at is not None:
                self.last_outage_s = now - self.lost_at
                metrics.DATABASE_LAST_OUTAGE.set(self.last_outage_s)
                log.warning("primary database %s reached after %.2f s without one", host, self.last_outage_s)
                self.lost_at = None
            if host != self.host:
                if self.host is not None:
                    self.changes += 1
                    metrics.DATABASE_PRIMARY_CHANGES.inc()
                    metrics.child(metrics.DATABASE_PRIMARY, self.host).set(0)
                    log.warning("the primary database moved: %s -> %s", self.host, host)
                metrics.child(metrics.DATABASE_PRIMARY, host).set(1)
                self.host = host
        metrics.DATABASE_WITHOUT_PRIMARY.set(self.without_s(now))

    def without_s(self, now: float | None = None) -> float:
        if self.lost_at is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.lost_at


PRIMARY = PrimaryWatch()

_PROBE_SQL = ("SELECT coalesce(host(inet_server_addr()), 'local') || ':' || coalesce(inet_server_port(), 0)"
              " AS host, pg_is_in_recovery() AS standby")


async def probe_primary(pool: asyncpg.Pool, timeout_s: float = 0.8) -> bool:
    """One query through the pool: is it connected to a primary, and which? (kept in PRIMARY)"""
    host: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            row = await pool.fetchrow(_PROBE_SQL)
        if row is not None and not row["standby"]:
            host = str(row["host"])
    except Exception:  # unreachable, whatever the reason
        host = None
    PRIMARY.observe(host)
    return host is not None


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every shipped migration, in order."""
    out = []
    for entry in resources.files("tokensforge.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            out.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(out)


async def migrate(dsn_or_conn: str | asyncpg.Connection) -> list[str]:
    """Apply pending migrations; returns the names applied by this call. The advisory lock is a session
    lock: give a direct URL (Settings.direct_dsn), never one through a transaction-mode pooler."""
    conn = await asyncpg.connect(dsn_or_conn) if isinstance(dsn_or_conn, str) else dsn_or_conn
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
                log.info("applied migration %s", name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    finally:
        if isinstance(dsn_or_conn, str):
            await conn.close()
    return applied
