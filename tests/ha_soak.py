"""The failover soak with a failover manager (`make chaos-ha`, about two minutes): a pg_auto_failover
formation (deploy/ha/autofailover.sh: monitor, primary, synchronous standby), two gateway processes
with the multi-host URL, unary and streamed clients; the primary node is SIGKILLed (keeper and
PostgreSQL) and the monitor promotes the standby; then the old node rejoins as a standby and a planned
`pg_autoctl perform failover` moves the primary back under load. After each: every receipt a client
was shown is on the new primary with its amount, every stream that started has a usage record,
nothing stays reserved, the books balance to the nano. Prints the recovery times.

    python -m tests.ha_soak [--dir /tmp/tokensforge-ha-soak] [--port 6300] [--demote-ms 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

from tokensforge.db import migrate

from .ha_load import check_books, get, new_account, run_load
from .harness import start_mock, write_catalog
from .procs import GatewayProcess

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "ha" / "autofailover.sh"


def formation(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"autofailover.sh {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
    return done.stdout


async def primary_port(ports: list[int]) -> int | None:
    for port in ports:
        try:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/tokensforge", timeout=1)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            continue
        try:
            if not await conn.fetchval("SELECT pg_is_in_recovery()") and \
                    await conn.fetchval("SHOW default_transaction_read_only") == "off":
                return port
        finally:
            await conn.close()
    return None


async def soak(base: Path, port: int, demote_ms: int) -> int:
    env = {"TF_HA_DEMOTE_MS": str(demote_ms), "TF_HA_UNHEALTHY_MS": "2000"}
    lines = formation("start", str(base), str(port), env=env).splitlines()
    urls = dict(line.split("=", 1) for line in lines if "=" in line)
    url = urls["TOKENSFORGE_DATABASE_URL"]
    ports = [port + 1, port + 2]
    await migrate(url)
    mock, mock_url = await start_mock()
    try:
        async with mock:
            catalog = write_catalog(Path(tempfile.mkdtemp(prefix="tf-ha-soak-")) / "c.toml", mock_url)
            gw_env = {"TOKENSFORGE_DB_ACQUIRE_TIMEOUT_S": "1", "TOKENSFORGE_LEASE_TTL_S": "6",
                      "TOKENSFORGE_RESERVATION_TTL_S": "6", "TOKENSFORGE_TRACE_GRACE_S": "2"}
            results = []
            with GatewayProcess(catalog, dsn=url, env=gw_env) as a, GatewayProcess(catalog, dsn=url, env=gw_env) as b:
                async with aiohttp.ClientSession() as session:
                    for round_name in ("kill -9 of the primary node", "pg_autoctl perform failover"):
                        before = await primary_port(ports)
                        account_id, key = await new_account(session, a.url, 10**11)

                        async def failover(round_name: str = round_name, before: int | None = before) -> None:
                            if round_name.startswith("kill"):
                                await asyncio.to_thread(formation, "kill-primary", str(base))
                            else:
                                await asyncio.to_thread(formation, "failover", str(base))
                            deadline = time.monotonic() + 120
                            while time.monotonic() < deadline:
                                now = await primary_port(ports)
                                if now is not None and now != before:
                                    return
                                await asyncio.sleep(0.1)
                            raise SystemExit("no new primary within 120 s")

                        seen = await run_load([a.url, b.url], key, failover, warmup_s=3.0, after_s=3.0,
                                              recover_within_s=30)
                        readies = [await get(session, g.url + "/readyz") for g in (a, b)]
                        after = await primary_port(ports)
                        print(f"{round_name}: primary 127.0.0.1:{before} -> 127.0.0.1:{after}; {seen.summary(2)};"
                              f" /readyz {[r[1]['database'] for r in readies]}", flush=True)
                        assert after is not None
                        await check_books(f"postgresql://postgres@127.0.0.1:{after}/tokensforge", account_id, 10**11,
                                          seen, settle_within_s=30)
                        assert None not in seen.recovery_s(2), "a gateway did not serve again"
                        assert set(seen.refusals) <= {"ledger_unavailable"}, f"refusals other than 503: {seen.refusals}"
                        assert seen.slowest_refusal_s < 5.0, "a billable request waited too long for its 503"
                        results.append(seen)
                        if round_name.startswith("kill"):  # the killed node comes back as a standby
                            formation("start", str(base), str(port), env=env)
            print("ha soak: ok; recovery after the promotion per gateway: "
                  + "; ".join(str(s.recovery_s(2)) for s in results), flush=True)
            return 0
    finally:
        formation("stop", str(base))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--port", type=int, default=6300)
    parser.add_argument("--demote-ms", type=int, default=3000,
                        help="pgautofailover.primary_demote_timeout (pg_auto_failover's default is 30000)")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="tokensforge-ha-soak-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    return asyncio.run(soak(base, args.port, args.demote_ms))


if __name__ == "__main__":
    sys.exit(main())
