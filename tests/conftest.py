"""Shared fixtures: one throwaway PostgreSQL per session, a fresh database per test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tokensforge.accounts import AccountStore
from tokensforge.db import create_pool, migrate
from tokensforge.embedded_pg import EmbeddedPostgres
from tokensforge.ledger.store import LedgerStore

from .harness import Gw, Mock, gateway_of, gateway_settings, start_gateway, start_mock, write_catalog
from .invariants import assert_ledger_invariants

TEMPLATE = "tf_template"


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    cluster = EmbeddedPostgres.throwaway()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
async def template_db(pg: EmbeddedPostgres) -> str:
    """A migrated database that every test's database is cloned from (fast: file copy)."""
    conn = await asyncpg.connect(pg.admin_dsn("postgres"))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    await migrate(pg.admin_dsn(TEMPLATE))
    return TEMPLATE


@pytest.fixture
async def dsn(pg: EmbeddedPostgres, template_db: str) -> AsyncIterator[str]:
    """A fresh migrated database; SPEC §5 invariants are checked on it after the test."""
    name = "t_" + secrets.token_hex(6)
    admin = await asyncpg.connect(pg.admin_dsn("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
        yield pg.admin_dsn(name)
        await assert_ledger_invariants(pg.admin_dsn(name))
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


# ---------------------------------------------------------------- end-to-end: mock upstream + gateway


@pytest.fixture(scope="session")
async def mock_upstream() -> AsyncIterator[Mock]:
    ctx, url = await start_mock()
    async with ctx, aiohttp.ClientSession() as session:
        yield Mock(url, session)


@pytest.fixture
async def gw(dsn: str, mock_upstream: Mock, tmp_path: Path) -> AsyncIterator[Gw]:
    await mock_upstream.reset()
    settings = gateway_settings(write_catalog(tmp_path / "catalog.toml", mock_upstream.url))
    ctx, url, app = await start_gateway(settings, dsn)
    async with ctx, aiohttp.ClientSession() as session:
        harness = Gw(url, dsn, gateway_of(app), mock_upstream, session)
        try:
            yield harness
        finally:
            for client in harness.clients:
                await client.close()


@pytest.fixture
async def ledger(dsn: str) -> AsyncIterator[tuple[LedgerStore, AccountStore, str]]:
    """A ledger store and an account store on a fresh database, and its DSN (a test file may define its own)."""
    pool = await create_pool(dsn, max_size=20)
    try:
        yield LedgerStore(pool, reservation_ttl_s=60), AccountStore(pool), dsn
    finally:
        await pool.close()
