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


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_keep_session,
        command_timeout=30, max_inactive_connection_lifetime=60,
    )
    assert pool is not None
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
    """Apply pending migrations; returns the names applied by this call."""
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
