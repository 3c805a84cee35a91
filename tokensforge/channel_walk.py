"""Retries over one route's channel chain (SPEC §1 retry policy), owning each attempt's resources.

An attempt takes a circuit-breaker ticket (a probe when half-open), a channel concurrency
slot and an upstream response. Whatever way the attempt ends — an answer, a classified
failure, a malformed answer, an exception nobody planned for, cancellation — the walk
releases what it took, except what it hands over in `Served`, whose one owner is then
the request's lifecycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import metrics, tracing
from .canonical import Frame, MalformedUpstream, Response, Usage
from .catalog import Channel, ChannelRef, Model, Route
from .errors import InvalidRequest, NoHealthyChannel, RateLimited, TokensForgeError, UpstreamError, UpstreamTimeout
from .pricing import Reservation
from .receipts import Attempt, Trace
from .upstream.client import AttemptFailure, UpstreamClient
from .upstream.h1 import H1Response
from .upstream.health import HALF_OPEN, STATE_VALUE, HealthRegistry


class StreamDecoder(Protocol):
    def feed(self, event: str | None, data: bytes) -> Frame | None: ...


class Exchange(Protocol):
    """What one kind of client request sends to a channel and how its answer is read."""

    stream: bool

    def native(self, channel: Channel) -> bool:
        """Whether this channel is sent the client's own body and its answer relayed as received."""

    def payload(self, channel: Channel, upstream_model: str) -> tuple[str, bytes, dict[str, str]]:
        """(path under the channel's base URL, body, extra headers)."""

    def parse(self, channel: Channel, data: dict[str, Any]) -> Response:
        """A non-streamed answer; raises MalformedUpstream if it is not one."""

    def decoder(self, channel: Channel) -> StreamDecoder: ...

    def typical_input_tokens(self) -> int:
        """Input tokens to bill when the upstream reports none (a typical count, not an upper bound)."""

    def estimate(self, response: Response) -> Usage:
        """Usage of a non-streamed answer whose upstream reported none."""

    def size(self, model: Model, route: Route) -> Reservation:
        """What this request reserves on `route` (a cross-route fallback re-prices it)."""


@dataclass(eq=False)
class Served:
    """A channel answered: the response (a stream still open) and, for a stream, its slot."""

    response: H1Response
    channel: Channel
    ref: ChannelRef
    answer: Response | None = None
    slot: asyncio.Semaphore | None = None

    def end(self, *, abort: bool) -> None:
        """Close (abort: cut the upstream request now) or release the response; free the slot. Idempotent."""
        if abort:
            self.response.close()
        else:
            self.response.release()
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class ChannelWalk:
    def __init__(self, upstream: UpstreamClient, health: HealthRegistry, channels: Mapping[str, Channel],
                 trace: Trace, *, span: Any = None) -> None:
        self.upstream, self.health, self.channels, self.trace = upstream, health, channels, trace
        self.span = span  # the request's trace span; None while tracing is off

    async def walk(self, route: Route, exchange: Exchange, tag: str | None) -> Served | TokensForgeError:
        """Try the chain (primary, backups, again) up to max_attempts; the first answer wins."""
        chain, retry = route.channels, route.retry
        attempts = skipped_in_row = index = 0
        previous: str | None = None
        last: AttemptFailure | None = None
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
            probe = health.state == HALF_OPEN
            try:
                if attempts > 0:
                    same_channel = previous == ref.channel
                    if not await _backoff(retry.backoff_ms, attempts, last if same_channel else None):
                        break
                    if not same_channel:
                        metrics.child(metrics.FALLBACKS, "channel").inc()
                previous = ref.channel
                attempts += 1
                served = await self._attempt(ref, exchange, tag)
            finally:
                if probe and health.probe_in_flight and health.state == HALF_OPEN:
                    health.abandon_probe()  # the attempt ended without an outcome (the client left)
            if isinstance(served, Served):
                return served
            last = served
            outcome = "5xx" if served.outcome == "malformed" else served.outcome  # retried like a 5xx
            if outcome not in retry.retry_on:
                break
        return final_error(last)

    async def _attempt(self, ref: ChannelRef, exchange: Exchange, tag: str | None) -> Served | AttemptFailure:
        channel = self.channels[ref.channel]
        path, body, headers = exchange.payload(channel, ref.upstream_model)
        slot = self.upstream.limit(channel)
        started = time.perf_counter()
        response: H1Response | None = None
        keep = False
        await slot.acquire()
        span = None
        if self.span is not None:
            headers = dict(headers)  # + traceparent
            span = tracing.attempt_span(self.span, channel.id, channel.kind, ref.upstream_model, self.trace.endpoint,
                                        headers)
        try:
            response = await self.upstream.open(channel, path, body, headers)
            self.trace.upstream_began = True  # its first byte is here: it has read (and bills) the prompt
            answer = None
            if not exchange.stream:
                data = await self.upstream.read_json(channel, response)
                try:
                    answer = exchange.parse(channel, data)
                except MalformedUpstream as exc:
                    raise AttemptFailure("malformed", f"channel {channel.id}: {exc}", status=response.status) from None
            self._done(ref.channel, "ok", response.status, started, tag)
            if span is not None:
                tracing.end_attempt(span, "ok", response.status, None)
            self.trace.upstream_model, self.trace.served_by = ref.upstream_model, ref.channel
            keep = exchange.stream
            return Served(response, channel, ref, answer, slot if keep else None)
        except AttemptFailure as failure:
            self._done(ref.channel, failure.outcome, failure.status, started, tag, failure.message)
            if span is not None:
                tracing.end_attempt(span, failure.outcome, failure.status, failure.message)
            return failure
        finally:
            if span is not None and span.is_recording():  # cancelled, or an error nobody planned for
                tracing.end_attempt(span, "interrupted", None, None)
            if not keep:
                if response is not None:
                    response.release()
                slot.release()

    def _done(self, channel: str, outcome: str, status: int | None, started: float, tag: str | None,
              error: str | None = None) -> None:
        elapsed = time.perf_counter() - started
        self.trace.attempts.append(Attempt(channel, outcome, status, int(elapsed * 1000), route=tag))
        # a 4xx is the request's fault, not the channel's: it must not open the circuit for everyone
        record_health(self.health, channel, outcome in ("ok", "4xx"), elapsed, error)
        metrics.child(metrics.UPSTREAM_ATTEMPTS, channel, outcome).inc()
        if outcome == "ok":
            metrics.child(metrics.UPSTREAM_LATENCY, channel).observe(elapsed)


def record_health(registry: HealthRegistry, channel: str, ok: bool, elapsed_s: float, error: str | None) -> None:
    health = registry.get(channel)
    if health.record(ok, elapsed_s * 1000, time.monotonic(), error) and registry.announce is not None:
        registry.announce(channel, health.config.cooldown_s)  # other processes skip it too
    metrics.child(metrics.CIRCUIT_STATE, channel).set(STATE_VALUE[health.state])
    metrics.child(metrics.CHANNEL_UP, channel).set(0 if health.state == "open" else 1)


async def _backoff(backoff_ms: int, attempts: int, last: AttemptFailure | None) -> bool:
    """Sleep before the next attempt. `last` is given when retrying the channel that failed:
    its retry-after is honoured, and one beyond 10 s is not worth waiting for."""
    delay = backoff_ms / 1000 * (2 ** (attempts - 1))
    if last is not None and last.retry_after_s is not None:
        if last.retry_after_s > 10:
            return False
        delay = max(delay, last.retry_after_s)
    await asyncio.sleep(delay)
    return True


def final_error(last: AttemptFailure | None) -> TokensForgeError:
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
