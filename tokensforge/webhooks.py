"""Webhooks: the store behind the admin endpoints, and the delivery task every gateway process runs.

Events are written by the database itself, in the transaction of the money change that caused
them (migrations/0008_webhooks.sql), into an outbox. Here each process, in the background,
claims webhooks whose oldest pending event is due (`FOR UPDATE SKIP LOCKED`, then a claim with a
deadline, so many processes share the work and a dead one's claims lapse), POSTs that event signed
with the webhook's secret, and records the attempt: delivered, or tried again after a doubling
backoff until the event is 24 h old. One event at a time per webhook, oldest first, so a receiver
sees a webhook's events in order; at least once, since a process may die between a receiver's 2xx
and the record of it (the event id de-duplicates).

Delivery runs on its own HTTP session and at most `concurrency` webhooks at once; requests never
wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg

from .errors import InvalidRequest, NotFound
from .webhook_model import (
    MAX_WEBHOOKS_PER_ACCOUNT,
    SIGNATURE_HEADER,
    NewWebhook,
    event_body,
    derive_secret,
    new_salt,
    retry_delay_s,
    signature,
)

log = logging.getLogger("tokensforge.webhooks")


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool, key: bytes | None = None) -> None:
        self.pool = pool
        self.key = key  # webhook_model.secrets_key: what signing secrets are derived from

    async def create(self, account_id: str, hook: NewWebhook) -> tuple[dict[str, Any], str]:
        """The new webhook's row and its secret (shown only now; derived again when signing, never stored)."""
        if self.key is None:
            raise InvalidRequest("webhooks need TOKENSFORGE_SECRET_KEY (or an admin token) to derive their secrets")
        webhook_id, salt = "wh_" + secrets.token_hex(12), new_salt()
        secret = derive_secret(self.key, webhook_id, salt)
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1 FOR SHARE", account_id) is None:
                raise NotFound(f"no account {account_id!r}")
            count = await conn.fetchval(
                "SELECT count(*) FROM webhooks WHERE account_id = $1 AND deleted_at IS NULL", account_id)
            if count >= MAX_WEBHOOKS_PER_ACCOUNT:
                raise InvalidRequest(f"an account has at most {MAX_WEBHOOKS_PER_ACCOUNT} webhooks")
            row = await conn.fetchrow(
                "INSERT INTO webhooks (id, account_id, url, events, thresholds, secret_salt)"
                " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, account_id, url, events, thresholds, created_at",
                webhook_id, account_id, hook.url, list(hook.events), hook.thresholds, salt)
        return dict(row), secret

    async def of_account(self, account_id: str) -> list[dict[str, Any]]:
        if await self.pool.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id) is None:
            raise NotFound(f"no account {account_id!r}")
        rows = await self.pool.fetch(
            "SELECT w.id, w.account_id, w.url, w.events, w.thresholds, w.created_at,"
            " (SELECT count(*) FROM webhook_events e WHERE e.webhook_id = w.id AND e.status = 'pending')"
            " AS pending_events FROM webhooks w WHERE w.account_id = $1 AND w.deleted_at IS NULL"
            " ORDER BY w.created_at, w.id", account_id)
        return [dict(r) for r in rows]

    async def delete(self, webhook_id: str) -> None:
        """Removes it: nothing more is written or delivered for it (pending events are cancelled)."""
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE webhooks SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL RETURNING id", webhook_id)
            if found is None:
                raise NotFound(f"no webhook {webhook_id!r}")
            await conn.execute(
                "UPDATE webhook_events SET status = 'cancelled' WHERE webhook_id = $1 AND status = 'pending'",
                webhook_id)

    async def deliveries(self, webhook_id: str, *, limit: int, after: int | None) -> list[dict[str, Any]]:
        """Attempts, newest first (`after`: a `seq` from the previous page)."""
        if await self.pool.fetchval("SELECT 1 FROM webhooks WHERE id = $1 AND deleted_at IS NULL",
                                    webhook_id) is None:
            raise NotFound(f"no webhook {webhook_id!r}")
        rows = await self.pool.fetch(
            "SELECT d.seq, d.event_id, e.type, d.attempt, d.status_code, d.error, d.duration_ms, d.created_at,"
            " e.status AS event_status FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"
            " WHERE d.webhook_id = $1 AND ($2::bigint IS NULL OR d.seq < $2) ORDER BY d.seq DESC LIMIT $3",
            webhook_id, after, limit)
        return [dict(r) for r in rows]


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    poll_interval_s: float = 1.0
    timeout_s: float = 10.0  # one POST, connection to last byte
    retry_base_s: float = 5.0
    retry_max_s: float = 3600.0
    give_up_s: float = 24 * 3600.0
    concurrency: int = 8  # webhooks delivered at once by one process

    @property
    def claim_s(self) -> float:
        """How long a claim lasts: a POST and the database round trips around it fit well inside."""
        return self.timeout_s * 2 + 1


class Deliverer:
    """The background delivery loop of one process (`run()`), on its own HTTP session."""

    def __init__(self, pool: asyncpg.Pool, config: DeliveryConfig, key: bytes | None) -> None:
        self.pool = pool
        self.config = config
        self.key = key  # None: this process cannot sign (no secret key, no admin token), so it delivers nothing
        self.holder = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.delivered = 0  # attempts that got a 2xx (tests and logs)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.concurrency * 2, limit_per_host=4)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                         auto_decompress=False) as session:
            while True:
                try:
                    busy = await self.round(session)
                except Exception as exc:  # the database away, a connection cut: this loop must outlive it
                    log.warning("webhook delivery round failed (%s); trying again", type(exc).__name__)
                    busy = False
                if not busy:
                    await asyncio.sleep(self.config.poll_interval_s)

    async def round(self, session: aiohttp.ClientSession) -> bool:
        """Claim due webhooks and deliver the oldest pending event of each; True if any was claimed."""
        if self.key is None:
            return False
        key = self.key
        claimed = await self.pool.fetch("SELECT * FROM tf_webhook_claim($1, $2, $3)", self.holder,
                                        self.config.concurrency, self.config.claim_s)
        if not claimed:
            return False
        outcomes = await asyncio.gather(*(self._deliver_head(session, r["id"], r["url"],
                                                           derive_secret(key, r["id"], r["secret_salt"]))
                                        for r in claimed),
                                        return_exceptions=True)  # one failing must not orphan the others
        failures = [o for o in outcomes if isinstance(o, Exception)]
        if failures:
            raise failures[0]  # their claims lapse after claim_s; the next round tries again
        return True

    async def _deliver_head(self, session: aiohttp.ClientSession, webhook_id: str, url: str, secret: str) -> None:
        event = await self.pool.fetchrow(
            "SELECT id, type, created_at, account_id, data, attempts FROM webhook_events"
            " WHERE webhook_id = $1 AND status = 'pending' ORDER BY seq LIMIT 1", webhook_id)
        if event is None:  # delivered or cancelled meanwhile: just let the claim go
            await self.pool.execute("UPDATE webhooks SET claimed_by = NULL, claim_until = NULL"
                                    " WHERE id = $1 AND claimed_by = $2", webhook_id, self.holder)
            return
        body = event_body(event["id"], event["type"], event["created_at"], event["account_id"], event["data"])
        status, error, elapsed_ms = await self._post(session, url, secret, event["id"], event["type"], body)
        ok = status is not None and 200 <= status < 300
        retry_s = retry_delay_s(event["attempts"] + 1, self.config.retry_base_s, self.config.retry_max_s)
        outcome = await self.pool.fetchval(
            "SELECT tf_webhook_attempted($1, $2, $3, $4, $5, $6, $7, $8, $9)", self.holder, webhook_id, event["id"],
            status, error, elapsed_ms, ok, retry_s, self.config.give_up_s)
        if ok:
            self.delivered += 1
        elif outcome == "failed":
            log.warning("webhook %s: gave up on event %s after %d attempts", webhook_id, event["id"],
                        event["attempts"] + 1)

    async def _post(self, session: aiohttp.ClientSession, url: str, secret: str, event_id: str, type_: str,
                    body: bytes) -> tuple[int | None, str | None, int]:
        headers = {"content-type": "application/json", "user-agent": "TokensForge-Webhooks/1",
                   "x-tokensforge-event-id": event_id, "x-tokensforge-event": type_,
                   SIGNATURE_HEADER: signature(secret, int(time.time()), body)}
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=self.config.timeout_s)) as response:
                status = response.status
                await response.content.read(4096)  # a little of the answer, so the connection can be reused
                if not 200 <= status < 300:
                    error = f"the receiver answered {status}"
        except TimeoutError:
            error = f"no answer within {self.config.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"could not deliver: {type(exc).__name__}"
        return status, error, int((time.perf_counter() - started) * 1000)
