"""One proxied request from reservation to settlement, without HTTP-server code.

`Call` carries the request through: admission (route, reservation), the walk
over the route's channel chain with retries and optional cross-route fallback,
and settlement that writes the charge, ledger entry and usage record at once.
The HTTP handlers in `api/client.py` only move bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from . import metrics
from .accounts import KeyIdentity
from .catalog import Model, Route
from .errors import (
    BudgetExceeded,
    InsufficientBalance,
    InvalidRequest,
    LedgerUnavailable,
    NoHealthyChannel,
    RateLimited,
    ReservationResolved,
    TokensForgeError,
    UpstreamError,
    UpstreamTimeout,
)
from .policy import EffectivePolicy
from .pricing import Usage, charge_for, size_reservation
from .receipts import Attempt, Trace, build_receipt, finish_receipt
from .routing import fallback_routes
from .state import Gateway
from .upstream.client import AttemptFailure
from .upstream.health import STATE_VALUE

log = logging.getLogger("tokensforge.proxy")
T = TypeVar("T")


async def shielded(coro: Awaitable[T]) -> T:
    """Run money-moving work to the end even if the client's task is cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


@dataclass
class Served:
    """A channel answered 200: what the handler needs to finish the request."""

    response: aiohttp.ClientResponse
    route: Route
    channel_id: str
    data: dict[str, Any] | None = None  # the parsed body of a non-streamed answer
    slot: asyncio.Semaphore | None = None  # the channel's concurrency slot a stream holds

    def end(self, *, abort: bool) -> None:
        """Close (abort: cut the upstream request now) or release the response, free the slot."""
        if abort:
            self.response.close()
        else:
            self.response.release()
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class Call:
    def __init__(self, gw: Gateway, identity: KeyIdentity, policy: EffectivePolicy, trace: Trace) -> None:
        assert gw.upstream is not None
        self.gw, self.upstream, self.health, self.limiter = gw, gw.upstream, gw.health, gw.limiter
        self.identity, self.policy, self.trace = identity, policy, trace
        self.started = time.perf_counter()
        self.model: Model | None = None
        self.body: dict[str, Any] = {}
        self.reservation_id: str | None = None
        self.pinned = False  # a pinned route is never swapped for another
        self._read_body = True

    # ------------------------------------------------------------------ admission

    async def admit(self, model: Model, route: Route, body: dict[str, Any]) -> None:
        """Size the reservation, apply rate limits, and hold the money; raises the refusal."""
        self.model, self.body = model, body
        self.trace.route = route
        sizing = size_reservation(body, model, route)
        now = time.monotonic()
        for scope, rpm, tpm in self.policy.rate_limits:
            self.limiter.admit(scope, rpm, tpm, sizing.input_tokens + sizing.output_tokens, now)
        await self._reserve(route, sizing.amount_nanos, self.trace.request_id)

    async def _reserve(self, route: Route, amount_nanos: int, reservation_id: str) -> None:
        """Hold the money, shielded: a client that leaves mid-call still gets its hold recorded
        here, so the caller can void it at once instead of leaving it to the sweeper."""
        self.trace.reserved_nanos = amount_nanos

        async def hold() -> None:
            await self.gw.ledger.reserve(
                reservation_id, self.identity.account_id, route.bucket, amount_nanos, self.policy.budgets,
                receipt=build_receipt(self.trace), request_id=self.trace.request_id)
            self.reservation_id = reservation_id
            metrics.RESERVATIONS_INFLIGHT.inc()

        await shielded(hold())

    async def refuse(self, error: TokensForgeError) -> None:
        """Record a request refused before any money was held (a usage record, no charge)."""
        self.trace.status = "failed"
        self.trace.error = {"code": error.code, "message": error.message}
        self._count("refused")  # the metric tells refusals (4xx, 402) from failures
        try:
            await shielded(self.gw.ledger.record(self._receipt()))
        except LedgerUnavailable:
            pass

    # ------------------------------------------------------------------ upstream

    async def serve(self, path: str, payload_for: Callable[[str], bytes], *, stream: bool) -> Served:
        """Walk the chain (and, if allowed and not pinned, other routes) until a channel answers.

        A non-streamed answer is read and parsed inside the attempt, so malformed JSON is
        retried like a 5xx; a stream is handed over at its status line.
        """
        assert self.model is not None and self.trace.route is not None
        first = self.trace.route
        self._read_body = not stream
        failure = await self._walk_chain(first, path, payload_for)
        if isinstance(failure, Served):
            return failure
        for fallback in [] if self.pinned else fallback_routes(self.model, self.policy, first):
            if not await self._move_to(fallback):
                break
            result = await self._walk_chain(fallback, path, payload_for)
            if isinstance(result, Served):
                metrics.child(metrics.FALLBACKS, "route").inc()
                return result
            failure = result
        raise failure

    async def _move_to(self, route: Route) -> bool:
        """Void the current reservation and reserve on the fallback route's bucket at its price."""
        assert self.model is not None and self.reservation_id is not None
        amount = size_reservation(self.body, self.model, route).amount_nanos
        await shielded(self.gw.ledger.finish(self.reservation_id, 0, None))
        metrics.RESERVATIONS_INFLIGHT.dec()
        self.reservation_id = None
        if self.trace.original_route is None:
            self.trace.original_route = self.trace.route
        self.trace.route = route
        try:
            await self._reserve(route, amount, f"{self.trace.request_id}/{route.id}")
        except (InsufficientBalance, BudgetExceeded) as exc:
            self.trace.attempts.append(Attempt(route.primary.channel, "not_affordable", route=route.id))
            log.info("cross-route fallback to %s refused: %s", route.id, exc.message)
            self.trace.route = self.trace.original_route
            self.trace.original_route = None
            self.trace.reserved_nanos = 0
            return False
        return True

    async def _walk_chain(
        self, route: Route, path: str, payload_for: Callable[[str], bytes],
    ) -> Served | TokensForgeError:
        chain, retry = route.channels, route.retry
        attempts = skipped_in_row = index = 0
        previous: str | None = None
        last: AttemptFailure | None = None
        tag = route.id if self.trace.original_route is not None else None
        while attempts < retry.max_attempts:
            ref = chain[index % len(chain)]
            index += 1
            health = self.health.get(ref.channel)
            if not health.allow(time.monotonic()):
                self.trace.attempts.append(Attempt(ref.channel, "skipped", route=tag, skipped="circuit_open"))
                skipped_in_row += 1
                if skipped_in_row >= len(chain):
                    break
                continue
            skipped_in_row = 0
            if attempts > 0:
                same_channel = previous == ref.channel
                if not await self._backoff(retry.backoff_ms, attempts, last if same_channel else None):
                    break
                if not same_channel:
                    metrics.child(metrics.FALLBACKS, "channel").inc()
            previous = ref.channel
            attempts += 1
            channel = self.gw.catalog.channels[ref.channel]
            started = time.perf_counter()
            data = None
            slot = self.upstream.limit(channel)  # a stream holds its slot until it ends
            await slot.acquire()
            try:
                response = await self.upstream.open(channel, path, payload_for(ref.upstream_model))
                if self._read_body:
                    data = await self.upstream.read_json(channel, response)
            except BaseException as exc:
                slot.release()
                if not isinstance(exc, AttemptFailure):
                    raise
                failure = exc
                self._attempt_done(ref.channel, failure.outcome, failure.status, started, tag, failure.message)
                last = failure
                outcome = "5xx" if failure.outcome == "malformed" else failure.outcome  # retried like a 5xx
                if outcome not in retry.retry_on:
                    break
                continue
            self.trace.upstream_model = ref.upstream_model
            self._attempt_done(ref.channel, "ok", response.status, started, tag)
            self.trace.served_by = ref.channel
            if self._read_body:
                slot.release()
                return Served(response, route, ref.channel, data)
            return Served(response, route, ref.channel, data, slot)
        return self._final_error(last)

    async def _backoff(self, backoff_ms: int, attempts: int, last: AttemptFailure | None) -> bool:
        """Sleep before the next attempt. `last` is given when retrying the channel that failed:
        its retry-after is honoured, and one beyond 10 s is not worth waiting for."""
        delay = backoff_ms / 1000 * (2 ** (attempts - 1))
        if last is not None and last.retry_after_s is not None:
            if last.retry_after_s > 10:
                return False
            delay = max(delay, last.retry_after_s)
        await asyncio.sleep(delay)
        return True

    def _attempt_done(self, channel: str, outcome: str, status: int | None, started: float,
                      route_tag: str | None, error: str | None = None) -> None:
        elapsed = time.perf_counter() - started
        self.trace.attempts.append(Attempt(channel, outcome, status, int(elapsed * 1000), route=route_tag))
        # a 4xx is the request's fault, not the channel's: it must not open the circuit for everyone
        self.record_health(channel, outcome in ("ok", "4xx"), elapsed, error)
        metrics.child(metrics.UPSTREAM_ATTEMPTS, channel, outcome).inc()
        if outcome == "ok":
            metrics.child(metrics.UPSTREAM_LATENCY, channel).observe(elapsed)

    def record_health(self, channel: str, ok: bool, elapsed_s: float, error: str | None) -> None:
        health = self.health.get(channel)
        health.record(ok, elapsed_s * 1000, time.monotonic(), error)
        metrics.child(metrics.CIRCUIT_STATE, channel).set(STATE_VALUE[health.state])
        metrics.child(metrics.CHANNEL_UP, channel).set(0 if health.state == "open" else 1)

    @staticmethod
    def _final_error(last: AttemptFailure | None) -> TokensForgeError:
        if last is None:
            return NoHealthyChannel("every channel of this route is unavailable (circuit open); nothing was charged")
        message = f"{last.message}; nothing was charged" if last.message else "the upstream failed; nothing was charged"
        if last.outcome == "timeout":
            return UpstreamTimeout(message)
        if last.outcome == "429":
            return RateLimited(message, retry_after_s=max(1, int(last.retry_after_s or 1)))
        if last.outcome == "4xx" and last.status in (400, 404, 413, 422):
            return InvalidRequest(f"the upstream rejected the request: {last.message}")
        return UpstreamError(message)

    # ------------------------------------------------------------------ settlement

    async def settle(self, status: str, usage: Usage | None, usage_source: str | None,
                     charge_usage: Usage | None = None) -> dict[str, Any]:
        """Post the charge (or void), write ledger entry + usage record, return the receipt.

        `charge_usage` is what is billed; it differs from `usage` only for a
        failed stream under charge_delivered (billed for what was delivered).
        """
        t = self.trace
        t.status, t.usage, t.usage_source = status, usage, usage_source
        route = t.route
        assert route is not None and self.reservation_id is not None
        billed = charge_usage if charge_usage is not None else (usage if status == "succeeded" else None)
        if billed is not None:
            t.charge_nanos, t.price_nanos = charge_for(billed, route, t.reserved_nanos)
        receipt = self._receipt()
        entry_id, balance = await shielded(self.gw.ledger.finish(self.reservation_id, t.charge_nanos, receipt))
        metrics.RESERVATIONS_INFLIGHT.dec()
        self.reservation_id = None
        t.ledger_entry_id, t.balance_after_nanos = entry_id, balance
        finish_receipt(receipt, entry_id, balance)
        self._count()
        if t.charge_nanos:
            metrics.child(metrics.SPEND, route.bucket, route.kind).inc(t.charge_nanos)
        if billed is not None:
            metrics.child(metrics.TOKENS, "input", route.kind).inc(billed.prompt_tokens)
            metrics.child(metrics.TOKENS, "output", route.kind).inc(billed.completion_tokens)
        return receipt

    async def keep_alive(self) -> None:
        """While the request runs, renew its reservation so the sweeper never takes a live request
        for a dead gateway's (long streams, slow upstreams and retries may outlast the TTL)."""
        interval = self.gw.settings.reservation_ttl_s / 3
        while self.reservation_id is not None:
            await asyncio.sleep(interval)
            if self.reservation_id is not None:
                try:
                    await self.gw.ledger.extend(self.reservation_id)
                except LedgerUnavailable:
                    pass  # try again next round; settlement decides

    def settle_later(self, status: str, usage: Usage | None, usage_source: str | None,
                     charge_usage: Usage | None = None) -> None:
        """A stream was delivered while the ledger was away: keep trying to post its charge until
        the reservation would expire (then the sweeper voids it and the request goes unbilled)."""
        deadline = time.monotonic() + self.gw.settings.reservation_ttl_s * 0.9

        async def retry() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                try:
                    await self.settle(status, usage, usage_source, charge_usage)
                    log.info("posted the delayed charge of %s", self.trace.request_id)
                    return
                except LedgerUnavailable:
                    continue
                except ReservationResolved:
                    return
            log.error("could not post the charge of %s before its reservation expired", self.trace.request_id)

        self.gw.spawn(retry())

    async def abandon(self, error: TokensForgeError, status: str = "failed") -> None:
        """Void the reservation of a request that failed before anything was delivered."""
        self.trace.error = {"code": error.code, "message": error.message}
        if self.reservation_id is None:
            await self.refuse(error)
            return
        try:
            await self.settle(status, None, None)
        except LedgerUnavailable:
            pass  # the sweeper voids it after its TTL

    def _receipt(self) -> dict[str, Any]:
        self.trace.latency_ms = int((time.perf_counter() - self.started) * 1000)
        return build_receipt(self.trace)

    def _count(self, status: str | None = None) -> None:
        t = self.trace
        kind = t.route.kind if t.route else "none"
        metrics.child(metrics.REQUESTS, t.selected_model or "none", kind, t.route.bucket if t.route else "none",
                                status or t.status).inc()
        metrics.child(metrics.REQUEST_DURATION, kind).observe(time.perf_counter() - self.started)
