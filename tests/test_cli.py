"""The `tokensforge` command as ops run it: real processes, signals, embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest

from tokensforge.db import migrate, migration_files
from tokensforge.embedded_pg import _chown, _server_account

from .harness import Mock, write_catalog
from .procs import GatewayProcess


def test_serve_refuses_a_bad_catalog_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[buckets]]\nid = "credit"\n[[channels]]\nid = "c"\nbase_url = "http://x"\n'
                   '[[models]]\nid = "m"\n[[models.routes]]\nid = "r"\nkind = "official"\nbucket = "gold"\n'
                   'input_price_per_mtok = "1"\noutput_price_per_mtok = "1"\nchannels = [{channel = "c", '
                   'upstream_model = "u"}]\n')
    proc = subprocess.run([sys.executable, "-m", "tokensforge", "serve", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "route 'r'" in proc.stderr and "unknown bucket 'gold'" in proc.stderr


async def test_serve_on_a_given_database_stops_cleanly_on_sigterm(dsn: str, mock_upstream: Mock,
                                                                 tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.toml", mock_upstream.url)
    gateway = GatewayProcess(catalog, dsn=dsn)
    with gateway:
        pass
    assert gateway.proc.returncode == 0, gateway.log()


async def test_serve_with_embedded_postgres_initialises_persists_and_stops_it(mock_upstream: Mock,
                                                                              tmp_path: Path) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="tokensforge-serve-"))
    _chown(data_dir, _server_account())
    data_dir.chmod(0o755)
    catalog = write_catalog(tmp_path / "catalog.toml", mock_upstream.url)
    try:
        for _ in range(2):  # the second start reuses the initialised cluster
            gateway = GatewayProcess(catalog, dsn=None, data_dir=data_dir)
            with gateway:
                assert (data_dir / "pg" / "postmaster.pid").exists()
            assert gateway.proc.returncode == 0, gateway.log()
            assert not (data_dir / "pg" / "postmaster.pid").exists()  # PostgreSQL was stopped too
        assert gateway.log().count("applied migration") == 0  # already migrated by the first run
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_concurrent_migrations_apply_once(pg) -> None:
    admin = await asyncpg.connect(pg.admin_dsn("postgres"))
    try:
        await admin.execute("CREATE DATABASE migrate_race")
        dsn = pg.admin_dsn("migrate_race")
        applied = await asyncio.gather(*(migrate(dsn) for _ in range(6)))
        shipped = len(migration_files())
        assert sorted(len(a) for a in applied) == [0, 0, 0, 0, 0, shipped]  # one process did all the work
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == shipped
        finally:
            await conn.close()
    finally:
        await admin.execute("DROP DATABASE IF EXISTS migrate_race WITH (FORCE)")
        await admin.close()


@pytest.mark.parametrize("command", [["--help"], ["migrate", "--help"], ["mock-upstream", "--help"]])
def test_commands_exist(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "tokensforge", *command], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage" in proc.stdout
