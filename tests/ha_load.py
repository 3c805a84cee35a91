"""Load through a database failover and the books afterwards: shared by tests/test_ha_failover.py (a
standby promoted by the test) and tests/ha_soak.py (`make chaos-ha`: pg_auto_failover promotes it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson

from .harness import ADMIN_TOKEN
from .invariants import assert_ledger_invariants

MESSAGES = [{"role": "user", "content": "tell me about ledgers"}]


async def new_account(session: aiohttp.ClientSession, url: str, credit: int) -> tuple[str, str]:
    async def admin(path: str, body: dict[str, Any]) -> Any:
        async with session.post(url + path, data=orjson.dumps(body),
                                headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 201, await r.text()
            return await r.json()

    account = await admin("/admin/accounts", {"name": "ha"})
    await admin(f"/admin/accounts/{account['id']}/topups",
                {"bucket": "credit", "amount_nanos": credit, "idempotency_key": "fund"})
    key = await admin(f"/admin/accounts/{account['id']}/keys", {"name": "k", "policy": {}})
    return account["id"], key["key"]


async def get(session: aiohttp.ClientSession, url: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with session.get(url, headers=headers) as r:
        return r.status, await r.json()


@dataclass
class Seen:
    """What the load's clients were shown, and when the database failed over."""

    receipts: list[dict[str, Any]] = field(default_factory=list)  # every receipt a client got
    streamed_ids: list[str] = field(default_factory=list)  # x-request-id of every stream that started
    ok_at: list[tuple[float, int]] = field(default_factory=list)  # (time, gateway) of each success
    refusals: dict[str, int] = field(default_factory=dict)  # error code → count
    slowest_refusal_s: float = 0.0
    cut: int = 0
    before: int = 0  # receipts before the primary was killed
    killed_at: float = 0.0
    promoted_at: float = 0.0

    def recovery_s(self, gateways: int) -> list[float | None]:
        """Per gateway: from the promotion to its first success after it."""
        return [None if t is None else round(t - self.promoted_at, 3) for t in (
            min((t for t, g in self.ok_at if t > self.promoted_at and g == which), default=None)
            for which in range(gateways))]

    def summary(self, gateways: int) -> str:
        return (f"{self.before} receipts before the kill, {len(self.receipts)} in all; refusals {self.refusals},"
                f" slowest refusal {self.slowest_refusal_s:.3f} s, streams cut {self.cut}; no writable primary"
                f" for {self.promoted_at - self.killed_at:.2f} s (kill to promotion); first success after the"
                f" promotion per gateway: {self.recovery_s(gateways)} s")


async def run_load(urls: list[str], key: str, failover: Callable[[], Awaitable[None]], *,
                   unary: int = 6, streamed: int = 4, warmup_s: float = 2.0, after_s: float = 1.5,
                   recover_within_s: float = 15.0, min_before: int = 20) -> Seen:
    """Unary and streamed clients over every gateway; after `warmup_s` (and `min_before` receipts) the
    primary is killed: `failover()` kills it and returns once a standby is writable (that moment is
    `promoted_at`). The load goes on until every gateway served once after it (at most
    `recover_within_s`), then `after_s` more."""
    seen = Seen()
    clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20) for url in urls]
    stop = asyncio.Event()

    def refused(exc: openai.APIStatusError, started: float) -> None:
        code = exc.response.json()["error"]["code"]
        seen.refusals[code] = seen.refusals.get(code, 0) + 1
        seen.slowest_refusal_s = max(seen.slowest_refusal_s, time.monotonic() - started)

    async def unary_worker(worker: int) -> None:
        for i in range(5000):
            if stop.is_set():
                return
            which = (worker + i) % len(clients)
            started = time.monotonic()
            try:
                done = await clients[which].chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
                seen.receipts.append(done.model_extra["receipt"])
                seen.ok_at.append((time.monotonic(), which))
            except openai.APIStatusError as exc:
                refused(exc, started)
                await asyncio.sleep(0.02)

    async def stream_worker(worker: int) -> None:
        for i in range(5000):
            if stop.is_set():
                return
            which = (worker + i) % len(clients)
            started = time.monotonic()
            try:
                stream = await clients[which].chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=8, stream=True,
                    stream_options={"include_usage": True})
                seen.streamed_ids.append(stream.response.headers["x-request-id"])
                receipt = None
                async for chunk in stream:
                    if not chunk.choices and chunk.model_extra and "receipt" in chunk.model_extra:
                        receipt = chunk.model_extra["receipt"]
                if receipt is not None:
                    seen.receipts.append(receipt)
                    seen.ok_at.append((time.monotonic(), which))
            except openai.APIStatusError as exc:
                refused(exc, started)
                await asyncio.sleep(0.02)
            except openai.APIError:  # the stream ended with an error event (the ledger went away)
                seen.cut += 1

    load = [asyncio.create_task(unary_worker(w)) for w in range(unary)] + \
        [asyncio.create_task(stream_worker(w)) for w in range(streamed)]
    try:
        await asyncio.sleep(warmup_s)
        warm_until = time.monotonic() + 10  # a busy machine: at least some traffic before the kill
        while len(seen.receipts) < min_before and time.monotonic() < warm_until:
            await asyncio.sleep(0.1)
        seen.before = len(seen.receipts)
        seen.killed_at = time.monotonic()
        await failover()
        seen.promoted_at = time.monotonic()
        deadline = seen.promoted_at + recover_within_s
        while time.monotonic() < deadline and None in seen.recovery_s(len(clients)):
            await asyncio.sleep(0.05)
        await asyncio.sleep(after_s)  # some traffic on the new primary
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
        for client in clients:
            await client.close()
    return seen


async def check_books(dsn: str, account_id: str, funded: int, seen: Seen, *, settle_within_s: float = 20) -> None:
    """On the new primary: every receipt a client was shown, with its amount and entry; a usage record for
    every stream that started; nothing open or reserved; the balance is funding − charges; SPEC §5."""
    conn = await asyncpg.connect(dsn)
    try:
        assert not await conn.fetchval("SELECT pg_is_in_recovery()")
        deadline = time.monotonic() + settle_within_s  # delayed settlements, expiries, lost streams' traces
        while time.monotonic() < deadline and (
                await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'")
                or await conn.fetchval("SELECT count(*) FROM stream_traces")):
            await asyncio.sleep(0.2)
        rows = {r["request_id"]: r for r in await conn.fetch(
            "SELECT request_id, charge_nanos, ledger_entry_id, status FROM usage_records WHERE account_id = $1",
            account_id)}
        missing = [r["request_id"] for r in seen.receipts if r["request_id"] not in rows]
        assert not missing, f"{len(missing)} receipt(s) shown to clients are not on the new primary: {missing[:5]}"
        wrong = [(r["request_id"], r["charge_nanos"], rows[r["request_id"]]["charge_nanos"]) for r in seen.receipts
                 if (rows[r["request_id"]]["charge_nanos"], rows[r["request_id"]]["ledger_entry_id"])
                 != (r["charge_nanos"], r["ledger_entry_id"])]
        assert not wrong, f"receipts disagree with the new primary: {wrong[:5]}"
        unrecorded = [rid for rid in seen.streamed_ids if rid not in rows]
        assert not unrecorded, f"streams that started have no usage record: {unrecorded[:5]}"
        assert await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'") == 0
        assert await conn.fetchval("SELECT reserved_nanos FROM buckets WHERE account_id = $1 AND bucket = 'credit'",
                                   account_id) == 0
        charged = sum(r["charge_nanos"] for r in rows.values())
        assert await conn.fetchval("SELECT balance_nanos FROM buckets WHERE account_id = $1 AND bucket = 'credit'",
                                   account_id) == funded - charged
        await assert_ledger_invariants(conn)
    finally:
        await conn.close()
