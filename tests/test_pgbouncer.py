"""Production pooling: two gateway processes through a real PgBouncer in transaction mode.

The pool URL (TOKENSFORGE_DATABASE_URL) goes through PgBouncer 1.18, which in transaction mode hands each
transaction whichever server connection is free and carries no named prepared statements between them, so
the gateways run with TOKENSFORGE_DB_STATEMENT_CACHE_SIZE=0 (asyncpg then uses the unnamed statement only).
Migrations (a session advisory lock) and the LISTEN connection need a session of their own and use
TOKENSFORGE_DIRECT_DATABASE_URL, straight to PostgreSQL. The two URLs carry different application names, so
pg_stat_activity shows which backend serves which, and PgBouncer's own SHOW SERVERS / SHOW STATS (its admin
console, read with psql: the console speaks only the simple query protocol) show what it carried.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import openai
import pytest

from tokensforge.embedded_pg import PG_ACCOUNT, EmbeddedPostgres
from tokensforge.mock_upstream import reply_text
from tokensforge.settings import Settings

from .harness import ADMIN_TOKEN, Gw, free_port, write_catalog
from .invariants import assert_ledger_invariants
from .procs import GatewayProcess

MESSAGES = [{"role": "user", "content": "hello through the pooler"}]
POOLED_APP, DIRECT_APP = "tf-pooled", "tf-direct"


def pgbouncer_binary() -> str:
    path = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if path is None:
        pytest.fail("pgbouncer not found: run `make pgbouncer` (deploy/ensure-pgbouncer.sh installs Debian's "
                    "package)")
    return path


class PgBouncer:
    """A real pgbouncer on a free loopback port, in front of one database of the test cluster, in
    `pool_mode = transaction`, trust auth (loopback only; the user must still be in the auth file).
    Its files live in a fresh dir directly under /tmp: as root it runs as the cluster's account (it refuses
    root), which cannot enter pytest's 0700 tmp dirs."""

    def __init__(self, dsn: str, psql: Path, *, pool_size: int) -> None:
        target = urlsplit(dsn)
        self.user, self.dbname = target.username or "", target.path.lstrip("/")
        self.port, self.psql = free_port(), psql
        self.dir = Path(tempfile.mkdtemp(prefix="tokensforge-pgbouncer-"))
        (self.dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
{self.dbname} = host={target.hostname} port={target.port} dbname={self.dbname}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "userlist.txt"}
admin_users = {self.user}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
""")
        as_root = os.geteuid() == 0
        if as_root:
            shutil.chown(self.dir, PG_ACCOUNT)
        self.log_path = self.dir / "pgbouncer.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([pgbouncer_binary(), str(self.dir / "pgbouncer.ini")], stdout=self._log,
                                     stderr=subprocess.STDOUT, user=PG_ACCOUNT if as_root else None)

    def url(self, application_name: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}?application_name={application_name}"

    def wait_ready(self, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbouncer exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.show("VERSION")
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def show(self, what: str) -> list[dict[str, str]]:
        """`SHOW <what>` on the admin console, rows as {column: text}."""
        proc = subprocess.run(
            [str(self.psql), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "pgbouncer",
             "-X", "-A", "-F", "\t", "-P", "footer=off", "-c", f"SHOW {what}"],
            capture_output=True, text=True, timeout=10, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"SHOW {what} failed: {proc.stderr}")
        header, *rows = proc.stdout.splitlines()
        columns = header.split("\t")
        return [dict(zip(columns, row.split("\t"), strict=True)) for row in rows]

    def transactions(self) -> int:
        """SHOW STATS' total_xact_count for the database (no row before its first client)."""
        return sum(int(row["total_xact_count"]) for row in self.show("STATS") if row["database"] == self.dbname)

    def server_pids(self) -> set[int]:
        """The PostgreSQL backends PgBouncer holds for the database (SHOW SERVERS' remote_pid)."""
        return {int(row["remote_pid"]) for row in self.show("SERVERS") if row["database"] == self.dbname}

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # immediate shutdown (SIGINT would wait for clients)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pgbouncer(dsn: str, pg: EmbeddedPostgres) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(dsn, pg.bindir / "psql", pool_size=4)
    try:
        bouncer.wait_ready()
        yield bouncer
    finally:
        bouncer.stop()


def test_the_direct_url_defaults_to_the_pooled_one_and_needs_it() -> None:
    pooled, direct = "postgresql://u@pgbouncer:6432/db", "postgresql://u@postgres:5432/db"
    settings = Settings.from_env({"TOKENSFORGE_DATABASE_URL": pooled, "TOKENSFORGE_DIRECT_DATABASE_URL": direct,
                                  "TOKENSFORGE_DB_STATEMENT_CACHE_SIZE": "0"})
    assert settings.direct_dsn(pooled) == direct and settings.db_statement_cache_size == 0
    plain = Settings.from_env({"TOKENSFORGE_DATABASE_URL": direct})
    assert plain.direct_dsn(direct) == direct and plain.db_statement_cache_size == 100  # asyncpg's default
    assert Settings().direct_dsn("postgresql://embedded") == "postgresql://embedded"
    with pytest.raises(ValueError, match="TOKENSFORGE_DIRECT_DATABASE_URL"):  # an embedded cluster has no pooler
        Settings.from_env({"TOKENSFORGE_DIRECT_DATABASE_URL": direct})
    assert "postgres:5432" not in repr(settings)  # it may hold a password


async def test_named_statements_break_through_transaction_pooling_unnamed_ones_work(pgbouncer: PgBouncer) -> None:
    """Why TOKENSFORGE_DB_STATEMENT_CACHE_SIZE=0: with asyncpg's default cache a statement prepared on one
    server connection is missing on the next; with 0 every query prepares the unnamed statement in the same
    server round (Parse, Describe, Flush, Bind, Execute, Sync), which PgBouncer keeps on one connection."""
    for cache_size in (100, 0):
        a = await asyncpg.connect(pgbouncer.url("tf-a"), statement_cache_size=cache_size)
        b = await asyncpg.connect(pgbouncer.url("tf-b"), statement_cache_size=cache_size)
        try:
            assert await a.fetchval("SELECT $1::int + 1", 1) == 2  # prepared on the one idle server connection
            async with b.transaction():
                await b.execute("SELECT 1")  # b holds that server connection (PgBouncer reuses the last used)
                if cache_size:
                    with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                        await a.fetchval("SELECT $1::int + 1", 2)  # a runs on another one: no such statement
                else:
                    assert await a.fetchval("SELECT $1::int + 1", 2) == 3
        finally:
            await a.close()
            await b.close()


async def test_two_gateways_through_pgbouncer(dsn: str, gw: Gw, pgbouncer: PgBouncer, tmp_path: Path) -> None:
    _, probe = await gw.account(routed=10**9)
    _, quote, _ = await gw.post("/v1/quote", probe, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                     "max_tokens": 10, "route": "routed"})
    funding = 20 * quote["reserve_nanos"]
    _, key = await gw.account(routed=funding)
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    env = {"TOKENSFORGE_DIRECT_DATABASE_URL": f"{dsn}?application_name={DIRECT_APP}",
           "TOKENSFORGE_DB_STATEMENT_CACHE_SIZE": "0", "TOKENSFORGE_DB_POOL_SIZE": "8",
           # only a NOTIFY can make a revocation visible within the second checked below
           "TOKENSFORGE_KEY_CACHE_TTL_S": "60"}
    before = pgbouncer.transactions()
    with GatewayProcess(catalog, dsn=pgbouncer.url(POOLED_APP), env=env) as a, \
            GatewayProcess(catalog, dsn=pgbouncer.url(POOLED_APP), env=env) as b:
        clients = [openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0) for s in (a, b)]
        try:
            results = await asyncio.gather(*(_one(clients[i % 2], stream=i % 4 >= 2) for i in range(80)))
        finally:
            for client in clients:
                await client.close()
        charges = [r for r in results if r is not None]
        assert len(charges) >= 20 and None in results, f"{len(charges)} served of {len(results)}"
        balances = await gw.balances(key)
        assert balances["routed"]["balance_nanos"] == funding - sum(charges) >= 0
        assert balances["routed"]["reserved_nanos"] == 0
        await assert_ledger_invariants(dsn)

        carried = pgbouncer.transactions() - before
        assert carried >= len(charges), f"PgBouncer carried {carried} transactions for {len(charges)} requests"
        await _assert_backends(dsn, pgbouncer)
        await _assert_revocation_crosses(gw, a, b)


async def _one(client: openai.AsyncOpenAI, *, stream: bool) -> int | None:
    """One chat request, checked against the mock's answer; its charge, or None for a 402 on `routed`."""
    try:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, stream=True,
                stream_options={"include_usage": True}, extra_body={"route": "routed"})]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_text(10)
            receipt = chunks[-1].model_extra["receipt"]
        else:
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, extra_body={"route": "routed"})
            assert completion.choices[0].message.content == reply_text(10)
            receipt = completion.model_extra["receipt"]
    except openai.APIStatusError as exc:
        assert exc.status_code == 402 and exc.response.json()["error"]["bucket"] == "routed", exc.response.text
        return None
    assert receipt["status"] == "succeeded" and receipt["usage"]["completion_tokens"] == 10
    assert 0 < receipt["charge_nanos"] <= receipt["reserved_nanos"]
    return int(receipt["charge_nanos"])


async def _assert_backends(dsn: str, pgbouncer: PgBouncer) -> None:
    """Each gateway's one direct session is its LISTEN; every pooled session is one of PgBouncer's."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid, application_name, query FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = ANY($1::text[])", [POOLED_APP, DIRECT_APP])
    finally:
        await conn.close()
    direct = [r for r in rows if r["application_name"] == DIRECT_APP]
    assert len(direct) == 2 and all(r["query"].startswith("LISTEN") for r in direct), [dict(r) for r in rows]
    pooled = {r["pid"] for r in rows if r["application_name"] == POOLED_APP}
    served = pgbouncer.server_pids()
    assert pooled and pooled <= served, f"pooled backends {pooled} are not all PgBouncer's {served}"


async def _assert_revocation_crosses(gw: Gw, a: GatewayProcess, b: GatewayProcess) -> None:
    """A key revoked through A (its pg_notify goes through PgBouncer) is refused by B (LISTEN, direct)."""
    account_id, fresh = await gw.account(credit=10**9)
    async with openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=fresh, max_retries=0) as client_b, \
            aiohttp.ClientSession(headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        await client_b.models.list()  # B caches the key for a minute
        async with admin.get(f"{a.url}/admin/accounts/{account_id}") as r:
            key_id = (await r.json())["keys"][0]["id"]
        revoked_at = time.monotonic()
        async with admin.post(f"{a.url}/admin/keys/{key_id}/revoke") as r:
            assert r.status == 200, await r.text()
        while True:
            try:
                await client_b.models.list()
            except openai.AuthenticationError:
                break
            assert time.monotonic() - revoked_at < 1.0, "revocation did not reach gateway B through NOTIFY"
            await asyncio.sleep(0.02)
