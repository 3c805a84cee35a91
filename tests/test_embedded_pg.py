"""Embedded PostgreSQL: real clusters (throwaway, under /tmp) plus bindir discovery."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tokensforge import embedded_pg
from tokensforge.embedded_pg import (
    ClusterHome,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    PostgresNotFound,
    _choose_home,
    fallback_home,
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


# --------------------------------------------------------------------------- where the cluster lives

#: an account that owns nothing here, so only "other" permission bits let it in
STRANGER = embedded_pg._Account("stranger", 54321, 54321, frozenset({54321}))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="making a home chowns it to another account")


def test_fallback_home_is_stable_readable_and_distinct_per_path() -> None:
    root = Path("/var/lib/tokensforge")
    home = fallback_home(Path("/root/app/.tokensforge"), root)
    assert home == fallback_home(Path("/root/app/.tokensforge"), root)  # a restart finds the same cluster
    assert home.parent == root and home.name.startswith("app-.tokensforge-")
    assert fallback_home(Path("/home/bob/app/.tokensforge"), root) != home  # same tail, other clone
    assert fallback_home(Path("/"), root).parent == root
    odd = fallback_home(Path("/x/my data dir ünïcode " + "y" * 200), root)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,45}", odd.name), odd.name


def test_home_is_the_requested_dir_when_not_root_or_reachable(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "data"
    data_dir.mkdir(mode=0o755)
    roots = [scratch_dir / "roots"]
    assert _choose_home(data_dir, None, roots) == ClusterHome(data_dir, data_dir)
    home = _choose_home(data_dir, STRANGER, roots)
    assert home.path == data_dir and not home.moved and home.cluster_dir == data_dir / "pg"
    assert not roots[0].exists()


@root_only
def test_unreachable_dir_gets_a_home_the_server_owns_and_keeps_it(scratch_dir: Path) -> None:
    private = scratch_dir / "private"
    private.mkdir(mode=0o700)
    data_dir = private / "clone" / ".tokensforge"
    data_dir.mkdir(parents=True)
    roots = [scratch_dir / "roots"]

    home = _choose_home(data_dir, STRANGER, roots)
    assert home.moved and home.path == fallback_home(data_dir, roots[0])
    assert f"cannot traverse {private} (mode drwx------)" in (home.reason or "")
    st = home.path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (STRANGER.uid, 0o700)
    assert stat.S_IMODE(roots[0].stat().st_mode) == 0o711
    assert (home.path / "data-dir").read_text() == f"{data_dir}\n"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700  # the user's dir is never widened

    (home.path / "pg").mkdir()
    (home.path / "pg" / "PG_VERSION").write_text("16\n")
    assert _choose_home(data_dir, STRANGER, roots) == home  # a restart finds the same cluster
    private.chmod(0o755)  # reachable now, but the balances are in the fallback cluster: stay there
    again = _choose_home(data_dir, STRANGER, roots)
    assert again.path == home.path and "earlier run" in (again.reason or "")


@root_only
def test_an_unsafe_or_unusable_root_is_skipped(scratch_dir: Path) -> None:
    private = scratch_dir / "private"
    private.mkdir(mode=0o700)
    shared = scratch_dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # someone else could swap what is inside: never used
    not_a_dir = scratch_dir / "file"
    not_a_dir.write_text("")
    fine = scratch_dir / "fine"

    home = _choose_home(private, STRANGER, [shared, not_a_dir / "roots", fine])
    assert home.path.parent == fine
    with pytest.raises(EmbeddedPostgresError, match=f"cannot traverse {private}.*no fallback home is usable") \
            as info:
        _choose_home(scratch_dir / "private", STRANGER, [shared])
    assert f"chmod o+x {private}" in str(info.value)
