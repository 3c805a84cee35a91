"""Embedded PostgreSQL: real clusters (throwaway, under /tmp) plus bindir discovery."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tokensforge import embedded_pg
from tokensforge.embedded_pg import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    PostgresNotFound,
    find_pg_bindir,
)


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    """A throwaway cluster, stopped and removed even when the test fails."""
    pg = EmbeddedPostgres.throwaway()
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A dir directly under /tmp that the `postgres` account can enter when we are root."""
    path = Path(tempfile.mkdtemp(prefix="tokensforge-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fetch(dsn: str, query: str, *args: Any) -> Any:
    """One query on a fresh connection; sync so the tests read top to bottom."""
    async def go() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()
    return asyncio.run(go())


def execute(dsn: str, *statements: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()
    asyncio.run(go())


def fake_bindir(path: Path) -> Path:
    """A dir with empty executables named like the PostgreSQL tools (never run)."""
    path.mkdir(parents=True)
    for name in embedded_pg.REQUIRED_BINARIES:
        (path / name).touch(mode=0o755)
    return path


# --------------------------------------------------------------------------- clusters


def test_start_connect_stop_restart_keeps_data(cluster: EmbeddedPostgres) -> None:
    dsn = cluster.start()
    assert dsn == f"postgresql://tokensforge@127.0.0.1:{cluster.port}/tokensforge"
    assert dsn == cluster.dsn
    assert fetch(dsn, "SELECT 1") == 1
    execute(dsn, "CREATE TABLE kept (v text)", "INSERT INTO kept VALUES ('survives')")

    cluster.stop()
    assert not cluster.is_running()
    with pytest.raises(OSError):
        fetch(dsn, "SELECT 1")
    cluster.stop()  # idempotent

    assert cluster.start() == dsn  # same port: an outage test reconnects to the same DSN
    assert fetch(dsn, "SELECT v FROM kept") == "survives"
    assert cluster.start() == dsn  # already running: no-op


def test_admin_dsn_reaches_other_databases(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    execute(cluster.admin_dsn("postgres"), 'CREATE DATABASE "other db"')
    assert fetch(cluster.admin_dsn("other db"), "SELECT current_database()") == "other db"


def test_throwaway_is_non_durable_and_removed_on_close() -> None:
    with EmbeddedPostgres.throwaway() as pg:
        assert fetch(pg.dsn, "SHOW fsync") == "off"
        assert fetch(pg.dsn, "SHOW max_connections") == "300"
        data_dir = pg.data_dir
        assert (data_dir / "pg" / "PG_VERSION").exists()
        assert (data_dir / "pg.log").exists()
    assert not data_dir.exists()


def test_durable_cluster_in_named_dir(scratch_dir: Path) -> None:
    pg = EmbeddedPostgres(scratch_dir / "data")
    try:
        pg.start()
        assert fetch(pg.dsn, "SHOW fsync") == "on"
    finally:
        pg.close()
    assert (scratch_dir / "data" / "pg" / "PG_VERSION").exists()  # close() keeps named dirs


def test_leftover_server_is_restarted_by_new_instance(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    successor = EmbeddedPostgres(cluster.data_dir, durable=False)
    try:
        assert fetch(successor.start(), "SELECT 1") == 1
    finally:
        successor.stop()
    assert not cluster.is_running()


def test_long_data_dir_falls_back_to_short_socket_dir(scratch_dir: Path) -> None:
    data_dir = scratch_dir / ("d" * 110)
    pg = EmbeddedPostgres(data_dir, durable=False)
    try:
        assert fetch(pg.start(), "SELECT 1") == 1
        assert not (data_dir / "run").exists()
    finally:
        pg.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the traversal check only applies to root")
def test_root_refuses_dir_postgres_cannot_traverse(scratch_dir: Path) -> None:
    locked = scratch_dir / "locked"
    locked.mkdir(mode=0o700)
    pg = EmbeddedPostgres(locked / "data")
    with pytest.raises(EmbeddedPostgresError, match=f"cannot traverse {locked}"):
        pg.start()
    assert not pg.is_running()


# --------------------------------------------------------------------------- bindir discovery


def test_find_pg_bindir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = fake_bindir(tmp_path / "bin")
    monkeypatch.setenv("TOKENSFORGE_PG_BINDIR", str(bindir))
    assert find_pg_bindir() == bindir


def test_bogus_env_bindir_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSFORGE_PG_BINDIR", str(tmp_path / "nope"))
    with pytest.raises(PostgresNotFound, match="TOKENSFORGE_PG_BINDIR") as info:
        find_pg_bindir()
    assert str(tmp_path / "nope") in str(info.value)
    assert "deploy/ensure-postgres.sh" in str(info.value)


def test_bogus_constructor_bindir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PostgresNotFound, match="missing or not executable: initdb"):
        EmbeddedPostgres(tmp_path / "data", bindir=tmp_path)


def test_distro_dirs_pick_highest_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("9.6", "15", "10"):
        fake_bindir(tmp_path / "postgresql" / version / "bin")
    (tmp_path / "postgresql" / "16" / "bin").mkdir(parents=True)  # incomplete: skipped
    monkeypatch.delenv("TOKENSFORGE_PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(embedded_pg, "DISTRO_BINDIR_GLOB", f"{tmp_path}/postgresql/*/bin")
    assert find_pg_bindir() == tmp_path / "postgresql" / "15" / "bin"


def test_nothing_found_tells_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENSFORGE_PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded_pg, "DISTRO_BINDIR_GLOB", f"{tmp_path}/none/*/bin")
    with pytest.raises(PostgresNotFound, match="deploy/ensure-postgres.sh"):
        find_pg_bindir()
