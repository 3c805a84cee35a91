"""Fault injection at every await point of a request's lifecycle (issue: one owner per request).

The gateway runs for real (PostgreSQL, the simulated upstream, aiohttp on loopback). An
injector wraps what the request path awaits — the ledger's reserve / extend / finish /
record, the upstream open and body read, the channel slot, the upstream stream reader
and the gateway's own writes to the client — and raises at the Nth await, for N = 1, 2, …
until a request runs to its end untouched; once with an exception, once with a
cancellation. After each run: no open reservation, every channel slot back, no circuit
probe held, no renewal task left, exactly one usage record for the request, invariants hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from tokensforge.state import GATEWAY
from tokensforge.upstream import streaming
from tokensforge.upstream.health import HALF_OPEN

from .harness import Gw
from .invariants import assert_ledger_invariants

MESSAGES = [{"role": "user", "content": "tell me something"}]


class Injected(Exception):
    """The failure the injector raises (a stand-in for any exception nobody planned for)."""


class Injector:
    def __init__(self) -> None:
        self.target = 0  # raise at this await (1-based); 0: never
        self.count = 0
        self.mode = "exception"
        self.hit: str | None = None

    def arm(self, target: int, mode: str) -> None:
        self.target, self.count, self.mode, self.hit = target, 0, mode, None

    def point(self, name: str) -> None:
        self.count += 1
        if self.count == self.target:
            self.hit = name
            if self.mode == "cancel":
                raise asyncio.CancelledError()
            raise Injected(f"injected at {name}")


def wrap(injector: Injector, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        injector.point(name)
        return await fn(*args, **kwargs)
    return wrapped


class _Slot:
    """A channel semaphore whose acquire is an injection point; release stays the real one."""

    def __init__(self, inner: asyncio.Semaphore, injector: Injector) -> None:
        self.inner, self.injector = inner, injector

    async def acquire(self) -> bool:
        self.injector.point("slot.acquire")
        return await self.inner.acquire()

    def release(self) -> None:
        self.inner.release()


@contextlib.contextmanager
def injected(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> Iterator[Injector]:
    injector = Injector()
    gateway = gw.gateway
    ledger = gateway.ledger
    for name in ("reserve", "finish", "extend", "record", "lease_grow", "lease_finish"):
        monkeypatch.setattr(ledger, name, wrap(injector, f"ledger.{name}", getattr(ledger, name)))
    upstream = gateway.upstream
    assert upstream is not None
    for name in ("open", "read_json"):
        monkeypatch.setattr(upstream, name, wrap(injector, f"upstream.{name}", getattr(upstream, name)))
    real_limit = upstream.limit
    monkeypatch.setattr(upstream, "limit", lambda channel: _Slot(real_limit(channel), injector))
    real_next = streaming.SseReader.next

    async def next_event(self: streaming.SseReader) -> Any:
        injector.point("stream.next")
        return await real_next(self)
    monkeypatch.setattr(streaming.SseReader, "next", next_event)
    real_write = web.StreamResponse.write

    async def write(self: web.StreamResponse, data: bytes) -> None:
        req = getattr(self, "_req", None)
        if req is not None and req.app.get(GATEWAY) is gateway:  # the gateway's writes, not the upstream's
            injector.point("client.write")
        await real_write(self, data)
    monkeypatch.setattr(web.StreamResponse, "write", write)
    yield injector


async def _send(gw: Gw, key: str, body: dict[str, Any]) -> tuple[int | None, bytes]:
    try:
        async with gw.session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body),
                                   headers={"authorization": f"Bearer {key}"}) as r:
            return r.status, await r.read()
    except aiohttp.ClientError:
        return None, b""  # the gateway dropped the connection (a cancelled handler)


async def _settled_state(gw: Gw, account: str, records_before: int) -> None:
    """Everything the request took is back (waiting out the sweeper where the settlement itself failed)."""
    conn = await asyncpg.connect(gw.dsn)
    try:
        deadline = time.monotonic() + 10
        while True:
            open_count = await conn.fetchval(
                "SELECT count(*) FROM reservations WHERE status = 'open' AND kind = 'request'")
            records = await conn.fetchval("SELECT count(*) FROM usage_records WHERE account_id = $1", account)
            tasks = [t for t in asyncio.all_tasks() if "_keep_alive" in getattr(t.get_coro(), "__qualname__", "")]
            if open_count == 0 and records == records_before + 1 and not tasks:
                break
            assert time.monotonic() < deadline, (
                f"open reservations {open_count}, usage records {records - records_before}, renewal tasks {tasks}")
            await asyncio.sleep(0.05)
        await assert_ledger_invariants(conn)
    finally:
        await conn.close()
    wallet = gw.gateway.wallet
    assert all(lease.carved == lease.stuck for lease in wallet.leases()), "a hold was left carved in a lease"
    await wallet.close()  # the next run takes a new lease: its first round trip is a point to break too
    upstream = gw.gateway.upstream
    assert upstream is not None
    for channel_id, sem in upstream._limits.items():
        assert sem._value == gw.catalog.channels[channel_id].max_concurrency, f"slot of {channel_id} leaked"
    for health in gw.gateway.health.channels.values():
        assert not (health.state == HALF_OPEN and health.probe_in_flight), f"probe of {health.channel} held"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("mode", ["exception", "cancel"])
@pytest.mark.parametrize("leases", [True, False], ids=["leased", "reserved"])
async def test_every_await_point_releases_everything(gw: Gw, monkeypatch: pytest.MonkeyPatch, stream: bool,
                                                     mode: str, leases: bool) -> None:
    account, key = await gw.account(credit=10**9, routed=10**9)
    wallet = gw.gateway.wallet
    wallet.config = dataclasses.replace(wallet.config, enabled=leases)
    gw.gateway.ledger.reservation_ttl_s = 1.0  # a settlement that failed outright is swept quickly
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 3, "stream": stream,
            "stream_options": {"include_usage": True}} if stream else {
        "model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 3}
    hits: list[str] = []
    with injected(gw, monkeypatch) as injector:
        for target in range(1, 60):
            async with asyncpg.create_pool(gw.dsn, min_size=1, max_size=1) as pool:
                records = await pool.fetchval("SELECT count(*) FROM usage_records WHERE account_id = $1", account)
            injector.arm(target, mode)
            status, _ = await _send(gw, key, body)
            hit = injector.hit
            injector.arm(0, mode)
            await _settled_state(gw, account, records)
            if hit is None:
                assert status == 200, "the untouched run succeeds"
                break
            hits.append(hit)
        else:
            pytest.fail("the request never ran to its end")
    expected = {"ledger.lease_grow", "ledger.lease_finish"} if leases else {"ledger.reserve", "ledger.finish"}
    expected |= {"slot.acquire", "upstream.open"}
    expected |= {"stream.next", "client.write"} if stream else {"upstream.read_json"}
    assert expected <= set(hits), f"await points covered: {hits}"


async def test_probe_released_when_its_client_leaves(gw: Gw) -> None:
    """A half-open circuit's probe whose client disconnects is handed back, not held for ever."""
    _, key = await gw.account(credit=10**9)
    health = gw.gateway.health.get("official-a")
    health.state, health.opened_at = "open", 0.0  # cooled down: the next request is the probe
    await gw.mock.faults(**{"up-official": {"latency_ms": 2000}})
    task = asyncio.create_task(_send(gw, key, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 3}))
    for _ in range(100):
        if health.probe_in_flight:
            break
        await asyncio.sleep(0.01)
    assert health.probe_in_flight
    task.cancel()  # the client leaves while its request is the probe
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for _ in range(100):
        if not health.probe_in_flight:
            break
        await asyncio.sleep(0.02)
    assert not health.probe_in_flight, "the abandoned probe is released"
    await gw.mock.faults()
    client = gw.client(key)
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].message.content and health.state == "closed"
