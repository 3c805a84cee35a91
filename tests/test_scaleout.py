"""Many processes, one ledger (SPEC §5.4): workers on one port, instances on separate ports."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import openai
from prometheus_client.parser import text_string_to_metric_families

from .harness import ADMIN_TOKEN, Gw, write_catalog
from .invariants import assert_ledger_invariants
from .procs import GatewayProcess

MESSAGES = [{"role": "user", "content": "hello from many processes"}]


async def test_two_workers_share_a_port_and_metrics_cover_both(dsn: str, gw: Gw, tmp_path: Path) -> None:
    _, key = await gw.account(credit=10**9)
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    with GatewayProcess(catalog, dsn=dsn, workers=2) as server:
        pids: set[int] = set()
        deadline = time.monotonic() + 30  # the second worker may still be starting
        while len(pids) < 2 and time.monotonic() < deadline:
            async with aiohttp.ClientSession() as session:  # a new connection each time
                async with session.get(server.url + "/healthz") as r:
                    pids.add((await r.json())["pid"])
            await asyncio.sleep(0.02)
        assert len(pids) == 2, "both workers answer on the one port"
        n = 40
        for _ in range(n):
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as client:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/metrics") as r:
                text = await r.text()
        total = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "tokensforge_requests_total" and s.labels.get("status") == "succeeded")
        assert total == n  # whichever worker answered /metrics counted both workers' requests
    assert server.proc.returncode == 0, server.log()


async def test_two_instances_one_database_no_overspend_revocation_and_reload(dsn: str, gw: Gw,
                                                                             tmp_path: Path) -> None:
    _, probe = await gw.account(routed=10**9)
    _, quote, _ = await gw.post("/v1/quote", probe, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                     "max_tokens": 10, "route": "routed"})
    funding = 25 * quote["reserve_nanos"]
    account_id, key = await gw.account(routed=funding)
    catalog = write_catalog(tmp_path / "c.toml", gw.mock.url)
    with GatewayProcess(catalog, dsn=dsn) as a, GatewayProcess(catalog, dsn=dsn) as b:
        clients = [openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0) for s in (a, b)]

        async def one(i: int) -> int:
            try:
                completion = await clients[i % 2].chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, extra_body={"route": "routed"})
                return int(completion.model_extra["receipt"]["charge_nanos"])
            except openai.APIStatusError as exc:
                assert exc.status_code == 402 and exc.response.json()["error"]["bucket"] == "routed"
                return -1

        results = await asyncio.gather(*(one(i) for i in range(120)))
        spent = sum(r for r in results if r > 0)
        assert len([r for r in results if r > 0]) >= 25 and -1 in results
        balances = await gw.balances(key)
        assert balances["routed"]["balance_nanos"] == funding - spent >= 0
        await assert_ledger_invariants(dsn)

        # a key revoked through instance A is refused by instance B within a second
        _, fresh = await gw.account(credit=10**9)
        async with openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=fresh, max_retries=0) as client_b:
            await client_b.models.list()  # cached on B now
            async with aiohttp.ClientSession(headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
                async with admin.get(f"{a.url}/admin/accounts/{(await _account_of(gw, fresh))}") as r:
                    key_id = (await r.json())["keys"][0]["id"]
                revoked_at = time.monotonic()
                async with admin.post(f"{a.url}/admin/keys/{key_id}/revoke") as r:
                    assert r.status == 200
                while True:
                    try:
                        await client_b.models.list()
                    except openai.AuthenticationError:
                        break
                    assert time.monotonic() - revoked_at < 1.0, "revocation did not reach instance B in time"
                    await asyncio.sleep(0.02)

                # a catalog reload through A reaches B: a new model appears on both
                catalog.write_text(catalog.read_text().replace('id = "fine-price"', 'id = "fine-price-v2"'))
                async with admin.post(f"{a.url}/admin/catalog/reload") as r:
                    assert r.status == 200, await r.text()
                deadline = time.monotonic() + 2
                while True:
                    ids = {m.id for m in (await clients[1].models.list()).data}
                    if "fine-price-v2" in ids:
                        break
                    assert time.monotonic() < deadline, "catalog reload did not reach instance B"
                    await asyncio.sleep(0.05)
                assert "fine-price" not in ids
        for client in clients:
            await client.close()


async def _account_of(gw: Gw, key: str) -> str:
    _, balance = await gw.get("/v1/balance", key)
    return str(balance["account_id"])
