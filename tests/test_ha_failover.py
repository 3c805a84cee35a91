"""High availability (issue #16) on a real primary and a synchronous streaming standby (deploy/ha/pair.sh).

The gateways get a multi-host TOKENSFORGE_DATABASE_URL (`target_session_attrs=read-write`), as
`pg_autoctl show uri` prints it. First the views read from the standby (TOKENSFORGE_READ_DATABASE_URL)
while a fresh receipt is still found on the primary; then, under load from two gateway processes,
the primary is crashed and the standby promoted (`pg_ctl promote`, what a failover manager does):
every receipt a client was shown is on the new primary with its amount, the books balance to the
nano, nothing stays reserved, and both gateways serve again within seconds. The tests run in this
order on one pair (the second one promotes its standby).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest

from tokensforge.db import migrate

from .ha_load import MESSAGES, check_books, get, new_account, run_load
from .harness import Mock, free_port, write_catalog
from .procs import GatewayProcess

PAIR = Path(__file__).resolve().parents[1] / "deploy" / "ha" / "pair.sh"


@dataclass
class Pair:
    base: Path
    primary_port: int
    standby_port: int

    @property
    def url(self) -> str:
        return (f"postgresql://tokensforge@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}/tokensforge"
                "?target_session_attrs=read-write")

    def node(self, port: int) -> str:
        return f"postgresql://tokensforge@127.0.0.1:{port}/tokensforge"

    def run(self, *args: str) -> None:
        done = subprocess.run([str(PAIR), *args], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"pair.sh {' '.join(args)}: {done.stderr}{done.stdout}"


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    base = Path(tempfile.mkdtemp(prefix="tf-ha-", dir="/tmp"))
    os.chmod(base, 0o755)  # the server account must reach it
    primary_port = free_port()
    standby_port = free_port()
    while standby_port == primary_port:
        standby_port = free_port()
    cluster = Pair(base, primary_port, standby_port)
    try:
        cluster.run("start", str(base), str(primary_port), str(standby_port))
        asyncio.run(migrate(cluster.url))
        yield cluster
    finally:
        subprocess.run([str(PAIR), "stop", str(base)], capture_output=True, timeout=180)
        shutil.rmtree(base, ignore_errors=True)


async def test_views_read_from_the_standby_and_a_fresh_receipt_from_the_primary(
        pair: Pair, mock_upstream: Mock, tmp_path: Path) -> None:
    await mock_upstream.reset()
    catalog = write_catalog(tmp_path / "c.toml", mock_upstream.url)
    standby = await asyncpg.connect(pair.node(pair.standby_port))
    env = {"TOKENSFORGE_READ_DATABASE_URL": pair.node(pair.standby_port)}
    try:
        with GatewayProcess(catalog, dsn=pair.url, env=env) as gateway:
            async with aiohttp.ClientSession() as session, openai.AsyncOpenAI(
                    base_url=gateway.url + "/v1", api_key="none", max_retries=0) as anon:
                _, key = await new_account(session, gateway.url, 10**10)
                client = anon.with_options(api_key=key)
                first = (await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)).model_extra["receipt"]
                for _ in range(50):  # replicated (and applied) on the standby
                    status, usage = await get(session, gateway.url + "/v1/usage", key)
                    if status == 200 and usage["data"]:
                        break
                    await asyncio.sleep(0.1)
                assert [u["request_id"] for u in usage["data"]] == [first["request_id"]]
                # the standby stops applying WAL (it still confirms it, so the primary's commits go on)
                await standby.execute("SELECT pg_wal_replay_pause()")
                try:
                    second = (await client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)).model_extra["receipt"]
                    # the views read the standby, which has not applied it ...
                    status, usage = await get(session, gateway.url + "/v1/usage", key)
                    assert status == 200 and [u["request_id"] for u in usage["data"]] == [first["request_id"]]
                    status, ledger = await get(session, gateway.url + "/v1/ledger", key)
                    assert status == 200 and second["ledger_entry_id"] not in [e["id"] for e in ledger["data"]]
                    async with session.get(gateway.url + "/v1/usage?format=csv",
                                           headers={"authorization": f"Bearer {key}"}) as r:
                        csv = await r.text()
                    assert first["request_id"] in csv and second["request_id"] not in csv
                    # ... but the client that was just given a receipt finds it (read from the primary)
                    status, receipt = await get(session, f"{gateway.url}/v1/receipts/{second['request_id']}", key)
                    assert status == 200 and receipt["charge_nanos"] == second["charge_nanos"] > 0
                finally:
                    await standby.execute("SELECT pg_wal_replay_resume()")
                for _ in range(50):
                    status, usage = await get(session, gateway.url + "/v1/usage", key)
                    if len(usage["data"]) == 2:
                        break
                    await asyncio.sleep(0.1)
                assert [u["request_id"] for u in usage["data"]] == [second["request_id"], first["request_id"]]
                status, ready = await get(session, gateway.url + "/readyz")
                assert status == 200 and ready["database"]["primary"] == f"127.0.0.1:{pair.primary_port}"
    finally:
        await standby.close()


async def test_a_primary_killed_under_load_is_followed_by_both_gateways_and_no_receipt_is_lost(
        pair: Pair, mock_upstream: Mock, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await mock_upstream.reset()
    await mock_upstream.faults(**{"up-official": {"chunk_delay_ms": 20}})
    catalog = write_catalog(tmp_path / "c.toml", mock_upstream.url)
    env = {"TOKENSFORGE_DB_ACQUIRE_TIMEOUT_S": "1", "TOKENSFORGE_LEASE_TTL_S": "4",
           "TOKENSFORGE_RESERVATION_TTL_S": "4", "TOKENSFORGE_TRACE_GRACE_S": "1"}

    async def failover() -> None:
        await asyncio.to_thread(pair.run, "kill-primary", str(pair.base))
        await asyncio.sleep(1.0)  # no primary: what a failover manager takes to decide
        await asyncio.to_thread(pair.run, "promote", str(pair.base))

    with GatewayProcess(catalog, dsn=pair.url, env=env) as a, GatewayProcess(catalog, dsn=pair.url, env=env) as b:
        async with aiohttp.ClientSession() as session:
            account_id, key = await new_account(session, a.url, 10**11)
            seen = await run_load([a.url, b.url], key, failover)
            readies = [await get(session, g.url + "/readyz") for g in (a, b)]
            async with session.get(a.url + "/metrics") as r:
                metrics_text = await r.text()
            # the LISTEN connections (key revocations, catalog reloads, lease pressure) followed too
            listeners = 0
            conn = await asyncpg.connect(pair.node(pair.standby_port))
            try:
                for _ in range(50):
                    listeners = await conn.fetchval("SELECT count(*) FROM pg_stat_activity"
                                                    " WHERE query = 'LISTEN \"tokensforge\";'"
                                                    " OR query = 'LISTEN tokensforge'"
                                                    " OR query LIKE 'LISTEN %tokensforge%'")
                    if listeners >= 2:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await conn.close()
        # the gateways stop (SIGTERM): their leases go back, so nothing may stay reserved
    recovery = seen.recovery_s(2)
    with capsys.disabled():
        print(f"\nfailover (pg_ctl promote): {seen.summary(2)}; /readyz last_outage_s"
              f" {[r[1]['database']['last_outage_s'] for r in readies]}")
    assert listeners == 2, "a gateway's LISTEN connection did not follow the promotion"
    assert seen.before >= 20, "too little traffic before the kill"
    assert all(t is not None for t in recovery), f"a gateway did not serve again within 15 s: {recovery}"
    assert max(t for t in recovery if t is not None) < 5.0
    assert seen.refusals.get("ledger_unavailable", 0) > 0, "the failover was not felt"
    assert set(seen.refusals) <= {"ledger_unavailable"}, seen.refusals
    assert seen.slowest_refusal_s < 5.0, "a billable request waited too long for its 503"
    for status, ready in readies:
        assert status == 200 and ready["database"]["primary"] == f"127.0.0.1:{pair.standby_port}", ready
        assert ready["database"]["last_outage_s"] is not None and ready["database"]["primary_changes"] == 1
    assert f'tokensforge_database_primary{{host="127.0.0.1:{pair.standby_port}"}} 1.0' in metrics_text
    assert f'tokensforge_database_primary{{host="127.0.0.1:{pair.primary_port}"}} 0.0' in metrics_text
    await check_books(pair.node(pair.standby_port), account_id, 10**11, seen)
