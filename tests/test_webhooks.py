"""Webhooks (SPEC §2): events written in the money transaction, delivered signed, at least once, in order.

A real receiver (an aiohttp server on 127.0.0.1) checks every signature; the gateway is killed while a
delivery is in flight and its successor still delivers; a receiver that is down for a while gets
everything once it is back, in order."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from tokensforge.errors import InvalidRequest
from tokensforge.webhook_model import parse_webhook, retry_delay_s, secrets_key, signature, verify

from .harness import ADMIN_TOKEN, Gw, Mock, free_port, gateway_of, gateway_settings, start_gateway, write_catalog
from .procs import GatewayProcess
from .test_pools import POOL_CATALOG

FAST = dict(webhook_poll_interval_s=0.05, webhook_timeout_s=1.0, webhook_retry_base_s=0.1, webhook_retry_max_s=0.4)


# ------------------------------------------------------------------ pure parts

def test_signature_is_an_hmac_of_timestamp_and_body_and_verifies() -> None:
    import hashlib
    import hmac as hmac_

    body = b'{"id":"evt_1"}'
    header = signature("whsec_abc", 1_700_000_000, body)
    expected = hmac_.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("whsec_abc", header, body, now_s=1_700_000_010)
    assert not verify("whsec_abd", header, body, now_s=1_700_000_010)  # another secret
    assert not verify("whsec_abc", header, body + b" ", now_s=1_700_000_010)  # another body
    assert not verify("whsec_abc", header, body, now_s=1_700_000_000 + 3600)  # replayed an hour later
    assert not verify("whsec_abc", "v1=00", body, now_s=1_700_000_000)


def test_retry_delay_doubles_from_the_base_to_the_cap() -> None:
    assert [retry_delay_s(n, 5, 3600) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert retry_delay_s(30, 5, 3600) == 3600 and retry_delay_s(10_000, 5, 3600) == 3600


@pytest.mark.parametrize(("body", "param"), [
    ({"events": ["pool.granted"]}, "url"),
    ({"url": "", "events": ["pool.granted"]}, "url"),
    ({"url": "ftp://127.0.0.1/x", "events": ["pool.granted"]}, "url"),
    ({"url": "http:///nohost", "events": ["pool.granted"]}, "url"),
    ({"url": "http://127.0.0.1/a b", "events": ["pool.granted"]}, "url"),
    ({"url": "http://127.0.0.1/", "events": []}, "events"),
    ({"url": "http://127.0.0.1/", "events": ["balance.high"]}, "events"),
    ({"url": "http://127.0.0.1/", "events": "pool.granted"}, "events"),
    ({"url": "http://127.0.0.1/", "events": ["balance.low"]}, "thresholds"),
    ({"url": "http://127.0.0.1/", "events": ["balance.low"], "thresholds": {"nope": 1}}, "thresholds"),
    ({"url": "http://127.0.0.1/", "events": ["balance.low"], "thresholds": {"credit": -1}}, "thresholds"),
    ({"url": "http://127.0.0.1/", "events": ["balance.low"], "thresholds": {"credit": 1.5}}, "thresholds"),
    ({"url": "http://127.0.0.1/", "events": ["balance.low"], "thresholds": []}, "thresholds"),
])
def test_bad_webhook_bodies_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_webhook(body, ["credit", "routed"])
    assert caught.value.param == param


# ------------------------------------------------------------------ a real receiver

class Receiver:
    """An aiohttp server on 127.0.0.1 that checks signatures and keeps what it was sent, per path."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secrets: dict[str, str] = {}  # path → secret
        self.received: dict[str, list[dict[str, Any]]] = {}  # path → event bodies, in arrival order
        self.bad_signatures = 0
        self.arrivals: list[str] = []  # every event id that arrived, answered or not
        self.status = 200
        self.hold: asyncio.Event | None = None  # set: requests wait for it (a slow receiver)
        self.holding = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        secret = self.secrets[request.path]
        if not verify(secret, request.headers.get("x-tokensforge-signature", ""), body, now_s=time.time()):
            self.bad_signatures += 1
            return web.Response(status=400)
        event = orjson.loads(body)
        assert set(event) == {"id", "type", "created_at", "account_id", "data"}
        assert request.headers["x-tokensforge-event-id"] == event["id"]
        self.arrivals.append(event["id"])
        if self.hold is not None:  # held until the sender is gone: it never learns the outcome
            self.holding.set()
            await self.hold.wait()
            return web.Response(status=200)
        if self.status == 200:
            self.received.setdefault(request.path, []).append(event)
        return web.Response(status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def types(self, path: str) -> list[str]:
        return [e["type"] for e in self.received.get(path, [])]

    async def wait_for(self, path: str, count: int, timeout_s: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.received.get(path, [])) < count:
            assert time.monotonic() < deadline, f"{path}: got {self.types(path)}, waited for {count}"
            await asyncio.sleep(0.05)
        return self.received[path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        if r.hold is not None:
            r.hold.set()
        await r.stop()


@pytest.fixture
async def hgw(dsn: str, mock_upstream: Mock, tmp_path: Path) -> AsyncIterator[Gw]:
    """A gateway with a pool bucket, delivering webhooks quickly (tests' backoff)."""
    await mock_upstream.reset()
    path = tmp_path / "catalog.toml"
    catalog = POOL_CATALOG.replace('free_daily_allowance_usd = "0.00026"', 'free_daily_allowance_usd = "0"')
    path.write_text(catalog.format(mock=mock_upstream.url, dead=f"http://127.0.0.1:{free_port()}/v1",
                                        timeout_s=5), encoding="utf-8")
    ctx, url, app = await start_gateway(gateway_settings(path, **FAST), dsn)
    async with ctx, aiohttp.ClientSession() as session:
        harness = Gw(url, dsn, gateway_of(app), mock_upstream, session)
        try:
            yield harness
        finally:
            for client in harness.clients:
                await client.close()


async def add_webhook(gw: Gw, receiver: Receiver, account_id: str, name: str, events: list[str],
                      thresholds: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": f"{receiver.url}/{name}", "events": events}
    if thresholds is not None:
        body["thresholds"] = thresholds
    status, hook = await gw.admin("POST", f"/admin/accounts/{account_id}/webhooks", body)
    assert status == 201, hook
    receiver.secrets[f"/{name}"] = hook["secret"]
    return hook


async def chat(gw: Gw, key: str, model: str = "gpt-4o-mini", route: str = "routed") -> dict[str, Any]:
    status, answer, _ = await gw.post("/v1/chat/completions", key, {
        "model": model, "route": route, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, answer
    return dict(answer["receipt"])


async def topup(gw: Gw, account_id: str, bucket: str, amount: int, ikey: str) -> None:
    status, entry = await gw.admin("POST", f"/admin/accounts/{account_id}/topups",
                                   {"bucket": bucket, "amount_nanos": amount, "idempotency_key": ikey})
    assert status == 201, entry


async def outbox(dsn: str, webhook_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT id, type, status, attempts FROM webhook_events WHERE webhook_id = $1"
                                     " ORDER BY seq", webhook_id))
    finally:
        await conn.close()


# ------------------------------------------------------------------ admin endpoints

async def test_admin_creates_lists_and_deletes_webhooks_and_shows_the_secret_once(
        hgw: Gw, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    account_id, _ = await hgw.account(routed=1_000_000)
    hook = await add_webhook(hgw, receiver, account_id, "a", ["balance.low", "pool.granted"],
                             {"routed": 500_000})
    assert hook["id"].startswith("wh_") and hook["secret"].startswith("whsec_") and len(hook["secret"]) > 40
    assert hook["events"] == ["balance.low", "pool.granted"] and hook["thresholds"] == {"routed": 500_000}
    status, listed = await hgw.admin("GET", f"/admin/accounts/{account_id}/webhooks")
    assert status == 200 and [h["id"] for h in listed["data"]] == [hook["id"]]
    assert "secret" not in listed["data"][0] and hook["secret"] not in orjson.dumps(listed).decode()
    assert all(hook["secret"] not in r.getMessage() for r in caplog.records)  # never logged
    conn = await asyncpg.connect(hgw.dsn)  # nor stored: the database keeps a salt the secret is derived from
    try:
        columns = await conn.fetchrow("SELECT * FROM webhooks WHERE id = $1", hook["id"])
    finally:
        await conn.close()
    assert hook["secret"] not in orjson.dumps(dict(columns), default=str).decode()

    status, error = await hgw.admin("POST", f"/admin/accounts/{account_id}/webhooks",
                                    {"url": "http://127.0.0.1:1/x", "events": ["balance.low"]})
    assert status == 400 and error["error"]["param"] == "thresholds"
    status, error = await hgw.admin("POST", "/admin/accounts/acct_nope/webhooks",
                                    {"url": "http://127.0.0.1:1/x", "events": ["pool.granted"]})
    assert status == 404
    status, page = await hgw.admin("GET", f"/admin/webhooks/{hook['id']}/deliveries")
    assert status == 200 and page["data"] == [] and page["has_more"] is False

    status, gone = await hgw.admin("DELETE", f"/admin/webhooks/{hook['id']}")
    assert status == 200 and gone["deleted"] is True
    assert (await hgw.admin("DELETE", f"/admin/webhooks/{hook['id']}"))[0] == 404
    assert (await hgw.admin("GET", f"/admin/webhooks/{hook['id']}/deliveries"))[0] == 404
    status, listed = await hgw.admin("GET", f"/admin/accounts/{account_id}/webhooks")
    assert listed["data"] == []
    async with hgw.session.post(hgw.url + f"/admin/accounts/{account_id}/webhooks", json={}) as r:
        assert r.status == 401  # no admin token


# ------------------------------------------------------------------ events end to end

async def test_every_event_type_is_written_with_its_money_change_and_delivered_signed(
        hgw: Gw, receiver: Receiver) -> None:
    account_id, key = await hgw.account(routed=10_000_000)
    first = await chat(hgw, key)
    cost = first["charge_nanos"]
    assert cost > 0
    balance = 10_000_000 - cost
    hook = await add_webhook(hgw, receiver, account_id, "all", ["balance.low", "budget.threshold", "pool.granted",
                                                                "pool.expired"], {"routed": balance - cost // 2})
    other_account, other_key = await hgw.account(routed=10_000_000)
    await add_webhook(hgw, receiver, other_account, "other", ["balance.low"], {"routed": 1})

    low = await chat(hgw, key)  # falls below the threshold: one event
    await chat(hgw, key)  # still below: none
    await topup(hgw, account_id, "routed", 5_000_000, "again")  # back above: re-armed, no event
    await chat(hgw, key)  # stays above
    events = await receiver.wait_for("/all", 1)
    assert events[0]["type"] == "balance.low" and events[0]["account_id"] == account_id
    data = events[0]["data"]
    assert data["bucket"] == "routed" and data["threshold_nanos"] == balance - cost // 2
    assert data["ledger_entry_id"] == low["ledger_entry_id"]
    assert data["balance_after_nanos"] == low["balance_after_nanos"] == data["available_nanos"]

    # a subscription's grant, then its period's end: pool.granted, pool.expired and the next grant
    status, sub = await hgw.admin("POST", f"/admin/accounts/{account_id}/subscriptions", {
        "plan": "pro", "bucket": "plan", "allowance_nanos": 3_000_000, "period": "day"})
    assert status == 201, sub
    events = await receiver.wait_for("/all", 2)
    assert events[1]["type"] == "pool.granted" and events[1]["data"]["amount_nanos"] == 3_000_000
    conn = await asyncpg.connect(hgw.dsn)
    try:
        await conn.execute("UPDATE tf_clock SET offset_interval = $1", timedelta(days=1, minutes=1))
        events = await receiver.wait_for("/all", 4)  # the sweeper's tick lapses the day and grants the next
    finally:
        await conn.execute("UPDATE tf_clock SET offset_interval = interval '0'")
        await conn.close()
    assert [e["type"] for e in events[2:4]] == ["pool.expired", "pool.granted"]
    assert events[2]["data"]["amount_nanos"] == -3_000_000 and events[2]["data"]["period_end"] is not None

    # a key's budget: n requests and room for one more reservation; the last one crosses 80 %
    held = first["reserved_nanos"]
    n = max(0, math.ceil((0.8 * held / cost - 1) / 0.2))
    limit = n * cost + held
    status, budget_key = await hgw.admin("POST", f"/admin/accounts/{account_id}/keys", {
        "name": "budgeted", "policy": {"budget_nanos": limit, "budget_period": "total"}})
    assert status == 201
    for _ in range(n + 2):
        status, answer, _ = await hgw.post("/v1/chat/completions", budget_key["key"], {
            "model": "gpt-4o-mini", "route": "routed", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]})
        if status != 200:
            assert status == 403 and answer["error"]["code"] == "budget_exceeded"
            break
    events = await receiver.wait_for("/all", 5)
    budget = [e for e in events if e["type"] == "budget.threshold"]
    assert budget[0]["data"]["percent"] == 80 and budget[0]["data"]["key_id"] == budget_key["id"]
    assert budget[0]["data"]["budget_nanos"] == limit and budget[0]["data"]["spent_nanos"] >= limit * 0.8

    assert receiver.bad_signatures == 0
    assert "/other" not in receiver.received  # the other account fell below nothing
    ids = [e["id"] for e in receiver.received["/all"]]
    assert len(ids) == len(set(ids))
    rows = await outbox(hgw.dsn, hook["id"])
    assert [r["id"] for r in rows] == ids  # delivered in the outbox's order
    assert all(r["status"] == "delivered" for r in rows)
    status, page = await hgw.admin("GET", f"/admin/webhooks/{hook['id']}/deliveries?limit=2")
    assert status == 200 and len(page["data"]) == 2 and page["has_more"] is True
    assert page["data"][0]["ok"] is True and page["data"][0]["status_code"] == 200
    status, rest = await hgw.admin("GET", f"/admin/webhooks/{hook['id']}/deliveries?after={page['next_cursor']}")
    assert {d["event_id"] for d in page["data"] + rest["data"]} == set(ids)


async def test_budget_reaching_100_percent_is_an_event_in_the_same_transaction(hgw: Gw, receiver: Receiver) -> None:
    account_id, _ = await hgw.account()
    status, key = await hgw.admin("POST", f"/admin/accounts/{account_id}/keys", {
        "name": "b", "policy": {"budget_nanos": 1000, "budget_period": "total"}})
    hook = await add_webhook(hgw, receiver, account_id, "budget", ["budget.threshold"])
    conn = await asyncpg.connect(hgw.dsn)
    try:
        await conn.execute("INSERT INTO budgets (scope, period) VALUES ($1, 'total')", f"key:{key['id']}")
        async with conn.transaction():
            await conn.execute("UPDATE budgets SET spent_nanos = 1000 WHERE scope = $1", f"key:{key['id']}")
            inside = await conn.fetchval("SELECT count(*) FROM webhook_events WHERE webhook_id = $1", hook["id"])
        try:
            async with conn.transaction():  # rolled back: its events go with it
                await conn.execute("UPDATE budgets SET spent_nanos = 2000 WHERE scope = $1", f"key:{key['id']}")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        # a project's budget: 80 % only, once
        status, project = await hgw.admin("POST", f"/admin/accounts/{account_id}/projects", {
            "name": "p", "policy": {"budget_nanos": 10_000, "budget_period": "month"}})
        assert status == 201, project
        scope = f"project:{project['id']}"
        await conn.execute("INSERT INTO budgets (scope, period) VALUES ($1, '2026-12')", scope)
        for spent in (7_000, 8_500, 9_000):
            await conn.execute("UPDATE budgets SET spent_nanos = $2 WHERE scope = $1", scope, spent)
        await conn.execute("UPDATE budgets SET spent_nanos = 0")  # no request spent it: the books stay true
    finally:
        await conn.close()
    assert inside == 2  # 80 % and 100 % crossed at once
    events = await receiver.wait_for("/budget", 3)
    assert [e["data"]["percent"] for e in events] == [80, 100, 80]
    assert events[2]["data"] == {"scope": "project", "project_id": project["id"], "period": "2026-12", "percent": 80,
                                 "budget_nanos": 10_000, "spent_nanos": 8_500}
    await asyncio.sleep(0.3)
    assert len(receiver.received["/budget"]) == 3


async def test_a_receiver_down_for_a_while_gets_every_event_in_order_once_back(hgw: Gw, receiver: Receiver) -> None:
    account_id, key = await hgw.account(routed=10_000_000)
    cost = (await chat(hgw, key))["charge_nanos"]
    hook = await add_webhook(hgw, receiver, account_id, "late", ["balance.low"], {"routed": 1})
    await receiver.stop()  # down: connections refused
    balance = 10_000_000 - cost
    for i in range(4):  # each round: fall below the threshold (an event), then a top-up re-arms it
        conn = await asyncpg.connect(hgw.dsn)
        try:
            await conn.execute("UPDATE webhooks SET thresholds = $1 WHERE id = $2",
                               orjson.dumps({"routed": balance - cost // 2}).decode(), hook["id"])
        finally:
            await conn.close()
        await chat(hgw, key)
        balance -= cost
        await topup(hgw, account_id, "routed", cost * 3, f"up-{i}")
        balance += cost * 3
    await asyncio.sleep(1.0)  # several failed attempts, backing off
    rows = await outbox(hgw.dsn, hook["id"])
    assert len(rows) == 4 and all(r["status"] == "pending" for r in rows) and rows[0]["attempts"] >= 2
    assert all(r["attempts"] == 0 for r in rows[1:])  # one at a time: the others wait their turn
    receiver.status = 503  # up, but failing
    await receiver.start()
    await asyncio.sleep(0.6)
    assert receiver.received.get("/late") is None
    receiver.status = 200
    events = await receiver.wait_for("/late", 4)
    assert [e["id"] for e in events] == [r["id"] for r in rows]
    status, page = await hgw.admin("GET", f"/admin/webhooks/{hook['id']}/deliveries?limit=100")
    first = [d for d in page["data"] if d["event_id"] == rows[0]["id"]]
    assert any(d["status_code"] is None and "could not deliver" in d["error"] for d in first)
    assert any(d["status_code"] == 503 for d in first) and any(d["ok"] for d in first)
    assert receiver.bad_signatures == 0


# ------------------------------------------------------------------ a gateway killed mid-delivery

def _admin(url: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(url + path, method=method, data=orjson.dumps(body) if body is not None else None,
                                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return orjson.loads(r.read())


async def test_a_gateway_killed_between_commit_and_delivery_leaves_it_to_its_successor(
        dsn: str, mock_upstream: Mock, tmp_path: Path, receiver: Receiver) -> None:
    catalog = write_catalog(tmp_path / "catalog.toml", mock_upstream.url)
    env = {"TOKENSFORGE_WEBHOOK_POLL_INTERVAL_S": "0.05", "TOKENSFORGE_WEBHOOK_TIMEOUT_S": "1",
           "TOKENSFORGE_WEBHOOK_RETRY_BASE_S": "0.1", "TOKENSFORGE_WEBHOOK_RETRY_MAX_S": "0.3"}
    receiver.hold = asyncio.Event()  # the first delivery is held at the receiver: in flight
    first = GatewayProcess(catalog, dsn=dsn, env=env)
    with first:
        account = await asyncio.to_thread(_admin, first.url, "POST", "/admin/accounts", {"name": "k"})
        hook = await asyncio.to_thread(_admin, first.url, "POST", f"/admin/accounts/{account['id']}/webhooks",
                                       {"url": f"{receiver.url}/hook", "events": ["balance.low"],
                                        "thresholds": {"credit": 10_000, "routed": 10_000}})
        receiver.secrets["/hook"] = hook["secret"]
        for bucket in ("credit", "routed"):  # each top-up below the threshold: an event each
            await asyncio.to_thread(_admin, first.url, "POST", f"/admin/accounts/{account['id']}/topups",
                                    {"bucket": bucket, "amount_nanos": 5_000, "idempotency_key": bucket})
        await asyncio.wait_for(receiver.holding.wait(), 10)
        first.stop(signal.SIGKILL)  # committed, in flight, never acknowledged
    receiver.hold.set()
    receiver.hold = None
    assert receiver.received.get("/hook") is None and len(receiver.arrivals) == 1
    with GatewayProcess(catalog, dsn=dsn, env=env):
        events = await receiver.wait_for("/hook", 2, timeout_s=20)
    assert [e["data"]["bucket"] for e in events] == ["credit", "routed"]
    assert receiver.arrivals[0] == receiver.arrivals[1] == events[0]["id"]  # at least once: sent again
    assert receiver.bad_signatures == 0
    rows = await outbox(dsn, hook["id"])
    assert [r["id"] for r in rows] == [e["id"] for e in events] and all(r["status"] == "delivered" for r in rows)


async def test_several_processes_share_delivery_each_event_once_in_order_per_webhook(
        dsn: str, receiver: Receiver) -> None:
    """Three deliverers (as in three gateway processes) on one outbox: SKIP LOCKED claims give each webhook to
    one of them at a time, so every event arrives once and each webhook's in order."""
    from tokensforge.db import create_pool
    from tokensforge.webhook_model import NewWebhook
    from tokensforge.webhooks import Deliverer, DeliveryConfig, WebhookStore

    pool = await create_pool(dsn, min_size=1, max_size=6)
    tasks: list[asyncio.Task[None]] = []
    try:
        await pool.execute("INSERT INTO accounts (id, name) VALUES ('acct_w', 'w')")
        key = secrets_key("test-secret-key", None)
        store = WebhookStore(pool, key)
        hooks = []
        for n in range(4):
            row, secret = await store.create("acct_w", NewWebhook(f"{receiver.url}/w{n}", ("pool.granted",), {}))
            receiver.secrets[f"/w{n}"] = secret
            hooks.append(row["id"])
        for i in range(10):  # 10 events, each to all four webhooks, in one transaction each
            await pool.execute("SELECT tf_webhook_emit('acct_w', 'pool.granted', $1::jsonb)", {"n": i})
        # one webhook per claim: three deliverers must share four webhooks
        config = DeliveryConfig(poll_interval_s=0.02, timeout_s=1, retry_base_s=0.05, retry_max_s=0.1, concurrency=1)
        deliverers = [Deliverer(pool, config, key) for _ in range(3)]
        tasks = [asyncio.create_task(d.run()) for d in deliverers]
        for n in range(4):
            events = await receiver.wait_for(f"/w{n}", 10)
            assert [e["data"]["n"] for e in events] == list(range(10))
        await asyncio.sleep(0.3)
        assert sum(len(v) for v in receiver.received.values()) == 40 and len(set(receiver.arrivals)) == 40
        assert sum(d.delivered for d in deliverers) == 40
        assert sum(1 for d in deliverers if d.delivered) >= 2  # the work was shared
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
