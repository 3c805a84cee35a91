"""Connection pool and schema migrations.

Migrations are the numbered SQL files in `migrations/`, applied in order, each
in its own transaction, under a PostgreSQL advisory lock so that many gateway
processes starting at once migrate exactly once.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import asyncpg
import orjson

log = logging.getLogger("tokensforge.db")

_MIGRATION_LOCK = 0x70F0_0001  # arbitrary, constant across versions


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

    __slots__ = ("acquire_timeout_s", "acquired")

    def __init__(self, *args: Any, acquire_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout_s = acquire_timeout_s
        self.acquired = 0  # connections handed out so far (tests count queries with it)

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
