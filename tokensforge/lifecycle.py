"""One owner for one client request: `async with Lifecycle(...) as life`.

The lifecycle takes, and on every way out releases, everything a request holds: the
reservation and its renewal task, the channel slot and the upstream response of a stream
(attempt-local resources and circuit probes are owned by `ChannelWalk`), and it settles
or voids the reservation exactly once, writing the usage record in the same transaction.
Handlers only translate their API dialect to and from it:

    async with Lifecycle(gw, identity, policy, request_id, "chat.completions") as life:
        life.begin(model, route, pinned=...)
        await life.admit(sizing)
        answer = await life.call(exchange)            # or: await life.open_stream(exchange)
        receipt = await life.succeed(answer)          #     frames via next_frame(), then finish_stream()

Leaving the block any other way — an exception, a refusal, cancellation, a client that
disconnects, a crash of the upstream parser — ends in `__aexit__`: the upstream request is
cut, the renewal stops, and the reservation is settled for what reached the client (SPEC
§1: a client that leaves after content reached it pays input + delivered output on every
route; a broken upstream is charged per the route's `on_failure`) or voided.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from . import metrics, tracing
from .accounts import KeyIdentity
from .canonical import (Finish, Frame, MalformedUpstream, ReasoningDelta, Response, TextDelta, ToolCallDelta,
                        UpstreamFailure, Usage)
from .catalog import Model, Route
from .channel_walk import ChannelWalk, Exchange, Served, StreamDecoder
from .errors import (
    BudgetExceeded,
    InsufficientBalance,
    LedgerOutcomeUnknown,
    LedgerRejected,
    LedgerUnavailable,
    ReservationResolved,
    TokensForgeError,
    UpstreamError,
)
from .policy import EffectivePolicy
from .pricing import Reservation, charge_for, with_output
from .ledger.leases import Hold
from .ratelimit_store import shared_rates
from .receipts import Attempt, Trace, build_receipt, finish_receipt
from .routing import fallback_routes
from .state import Gateway
from .upstream.h1 import H1Error
from .upstream.streaming import SseReader

log = logging.getLogger("tokensforge.lifecycle")
T = TypeVar("T")

MAX_SSE_LINE_BYTES = 1024 * 1024
MAX_STREAM_BYTES = 64 * 1024 * 1024


async def shielded(coro: Awaitable[T]) -> T:
    """Run money-moving work to the end even if the client's task is cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    """How a stream ended: the receipt (None while the ledger is away) and the error to tell the client."""

    status: str
    usage: Usage
    receipt: dict[str, Any] | None
    error: TokensForgeError | None


class Lifecycle:
    def __init__(self, gw: Gateway, identity: KeyIdentity, policy: EffectivePolicy, request_id: str,
                 endpoint: str) -> None:
        assert gw.upstream is not None
        self.gw, self.identity, self.policy = gw, identity, policy
        self.trace = Trace(request_id, identity.account_id, identity.project_id, identity.key_id, endpoint=endpoint)
        self.started = time.perf_counter()
        self.model: Model | None = None
        self.pinned = False
        self.native = False  # the serving channel speaks the client's API: its answer is relayed as received
        # the request's span (None while tracing is off: then nothing below creates a span)
        self._span, self._own_span = tracing.request_span(endpoint) if tracing.ON else (None, False)
        self._walk = ChannelWalk(gw.upstream, gw.health, gw.catalog.channels, self.trace, span=self._span)
        self._hold: Hold | None = None
        self._later = False  # a retry task owns the settlement (and the hold)
        self._renewal: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None
        self._served: Served | None = None
        self._reader: SseReader | None = None
        self._decoder: StreamDecoder | None = None
        self._settled = False
        self._client_gone = False
        self._interruption: BaseException | None = None
        # what a stream delivered so far
        self._pending = 0  # content events in the frame handed out, counted once the caller comes back
        self.delivered = 0
        self.upstream_usage: Usage | None = None
        self._upstream_input: Usage | None = None  # the input classes an upstream told before its final usage
        self.stream_error: str | None = None
        self._stream_done = False
        self._stream_ok = False

    # ------------------------------------------------------------------ scope

    async def __aenter__(self) -> Lifecycle:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        exc = exc or self._interruption
        if self._settled and self._renewal is None:
            # the common way out: settled, nothing renews a hold; what is left never awaits, so no task is
            # made to shield it (one per request was ~15 µs of CPU, a measurable share of a proxied request)
            self._end_upstream(abort=exc is not None or self.stream_error is not None)
            self._let_go()
            return
        await shielded(self._exit(exc))

    async def _exit(self, exc: BaseException | None) -> None:
        self._end_upstream(abort=exc is not None or self.stream_error is not None or not self._settled)
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()
        try:
            if not self._settled:
                await self._settle_on_exit(exc)
        finally:
            self._let_go()
            if renewal is not None:
                await asyncio.wait([renewal])

    def _let_go(self) -> None:
        """Give back a hold nobody will settle; end the request's span."""
        if self._hold is not None and not self._later:  # not settled, and nobody will: let the money go
            self.gw.wallet.discard(self._hold)
        if self._span is not None:
            tracing.finish_request(self._span, self.trace, end=self._own_span)

    def _end_upstream(self, *, abort: bool) -> None:
        served, self._served = self._served, None
        if served is not None:
            served.end(abort=abort)

    async def _settle_on_exit(self, exc: BaseException | None) -> None:
        t = self.trace
        gone = self._client_gone or isinstance(exc, (asyncio.CancelledError, ConnectionError))
        if isinstance(exc, TokensForgeError):
            t.error = {"code": exc.code, "message": exc.message}
        elif exc is not None and not gone:
            log.error("request %s failed unexpectedly", t.request_id, exc_info=exc)
            t.error = {"code": "internal_error", "message": "the request was interrupted by a gateway error"}
        elif t.error is None:
            t.error = {"code": "client_cancelled" if gone else "internal_error",
                       "message": "the client disconnected" if gone else "the request ended without an answer"}
        if self._hold is None:
            if t.selected_model is not None:
                await self._record_refusal("client_cancelled" if gone else "failed")
            return
        status = "client_cancelled" if gone else "failed"
        # SPEC §1: a client that leaves once the upstream began answering (it has read, and bills, the
        # prompt) pays the input and what reached it, on every route; a broken upstream per on_failure
        if gone and t.upstream_began:
            billed = self._delivered_usage()
        elif self.delivered and self.route.on_failure == "charge_delivered":
            billed = self._delivered_usage()
        else:
            billed = Usage(0, 0)
        usage, source = self._stream_usage() if self.delivered or billed.total_tokens else (None, None)
        try:
            await self._settle(status, usage, source, billed)
        except LedgerUnavailable:
            # a charge to post, or the usage record of a request carved from a lease (no row of its own
            # would let the sweeper write it): retry until the ledger is back
            if billed.total_tokens or (self._hold is not None and self._hold.lease is not None):
                self._settle_later(status, usage, source, billed)
            # else: nothing to post; the sweeper voids the reservation after its TTL
        except ReservationResolved:
            pass

    # ------------------------------------------------------------------ admission

    @property
    def route(self) -> Route:
        assert self.trace.route is not None
        return self.trace.route

    def begin(self, model: Model, route: Route, *, pinned: bool) -> None:
        """The model and the route this request is charged on (refusals from here on leave a usage record)."""
        self.model, self.pinned = model, pinned
        self.trace.selected_model = model.id
        self.trace.route = route

    async def admit(self, sizing: Reservation) -> None:
        """Apply rate limits and hold the money (raises the refusal); keeps the hold alive while the request runs."""
        if self._span is not None:
            return await self._admit_traced(sizing)
        if self.policy.rate_limits:  # keys without rpm/tpm cost nothing here
            await shared_rates(self.gw).admit(self.policy.rate_limits, sizing.input_tokens + sizing.output_tokens)
        await self._reserve(self.route, sizing.amount_nanos, self.trace.request_id)

    async def _admit_traced(self, sizing: Reservation) -> None:
        with tracing.child(self._span, "tokensforge.admission") as admission:
            if self.policy.rate_limits:
                await shared_rates(self.gw).admit(self.policy.rate_limits, sizing.input_tokens + sizing.output_tokens)
            with tracing.child(admission, "tokensforge.hold") as span:
                assert span is not None
                span.set_attributes({"tokensforge.bucket": self.route.bucket,
                                     "tokensforge.reserved_nanos": sizing.amount_nanos})
                await self._reserve(self.route, sizing.amount_nanos, self.trace.request_id)

    async def _reserve(self, route: Route, amount_nanos: int, reservation_id: str) -> None:
        """Hold the money, shielded: a client that leaves mid-call still has its hold recorded, so the
        exit can void it at once instead of leaving it to the sweeper."""
        self.trace.reserved_nanos = amount_nanos
        self.trace.bucket_kind, self.trace.pool_period_end = self.gw.catalog.bucket_kind(route.bucket), None
        leasable = self.trace.bucket_kind == "prepaid"
        carved = self.gw.wallet.carve_now(reservation_id, self.trace.request_id, self.identity.account_id,
                                          route.bucket, amount_nanos, self.policy.budgets, leasable=leasable)
        if carved is not None:  # the common case: no await, so nothing to shield
            self._hold = carved
            metrics.RESERVATIONS_INFLIGHT.inc()
            return

        async def hold() -> None:
            held = await self.gw.wallet.reserve(
                reservation_id, self.trace.request_id, self.identity.account_id, route.bucket, amount_nanos,
                self.policy.budgets, lambda: build_receipt(self.trace), leasable=leasable)
            if held.pool_period_end is not None:  # the receipt names the period the charge is made in
                self.trace.pool_period_end = held.pool_period_end.isoformat()
            self._hold = held
            metrics.RESERVATIONS_INFLIGHT.inc()
            if held.lease is None and self._renewal is None:  # a lease is renewed by its process
                self._renewal = asyncio.get_running_loop().create_task(self._keep_alive())

        await shielded(hold())

    async def _keep_alive(self) -> None:
        """Renew the reservation while the request runs, so the sweeper never takes a live request for a
        dead gateway's (long streams, slow upstreams and retries may outlast the TTL)."""
        interval = self.gw.settings.reservation_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            hold = self._hold
            if hold is None:
                return
            if hold.lease is not None:
                continue
            try:
                await self.gw.ledger.extend(hold.reservation_id)
            except LedgerUnavailable:
                pass  # try again next round; settlement decides

    async def _record_refusal(self, status: str) -> None:
        self.trace.status = status
        self._settled = True
        self._count("refused" if status == "failed" else status)
        try:
            await self.gw.ledger.record(self._receipt())
        except LedgerUnavailable:
            pass  # the refusal stands; its usage record is lost with the database
        except LedgerRejected:
            log.error("request %s: the ledger refused the usage record of a refusal", self.trace.request_id)

    # ------------------------------------------------------------------ upstream

    async def call(self, exchange: Exchange) -> Response:
        """Serve a non-streamed request; the parsed answer (its slot already released)."""
        served = await self._serve(exchange)
        served.end(abort=False)
        assert served.answer is not None
        return served.answer

    async def open_stream(self, exchange: Exchange) -> None:
        """Walk until a channel's stream opens; its slot and response now belong to this lifecycle.
        A stream carved from a lease is traced (SPEC §5.9) while the walk runs, durable before it starts."""
        assert self._hold is not None
        tracing = self.gw.wallet.trace_stream(self._hold, self._receipt())
        served = await self._serve(exchange)
        self._served = served
        if tracing is not None:  # LedgerUnavailable: the client gets a 503 and the exit ends the upstream
            # meanwhile the response keeps what the upstream sends (bounded by its flow control), and a cut
            # is raised only after what came before it was read
            await tracing
        self._reader = SseReader(served.response.content, max_line_bytes=MAX_SSE_LINE_BYTES,
                                 max_total_bytes=MAX_STREAM_BYTES)
        self._decoder = exchange.decoder(served.channel)

    async def _serve(self, exchange: Exchange) -> Served:
        """The route's chain, then (if the policy allows and nothing is pinned) other routes."""
        assert self.model is not None and self._hold is not None
        self._exchange = exchange
        first = self.route
        result: Served | TokensForgeError
        result = await self._walk.walk(first, exchange, None)
        if isinstance(result, Served):
            return self._served_by(result)
        for fallback in [] if self.pinned else fallback_routes(self.model, self.policy, first):
            if not await self._move_to(fallback):
                break
            moved = await self._walk.walk(fallback, exchange, fallback.id)
            if isinstance(moved, Served):
                metrics.child(metrics.FALLBACKS, "route").inc()
                return self._served_by(moved)
            result = moved
        raise result

    def _served_by(self, served: Served) -> Served:
        """Note whether the answer comes from a channel that speaks the client's API (relayed as received)."""
        assert self._exchange is not None
        self.native = self._exchange.native(served.channel)
        self.trace.relay = "native" if self.native else "translated"
        return served

    async def _move_to(self, route: Route) -> bool:
        """Void the current reservation and hold the fallback route's price in its bucket."""
        assert self.model is not None and self._hold is not None and self._exchange is not None
        amount = self._exchange.size(self.model, route).amount_nanos  # the same request at the fallback's price
        await shielded(self.gw.wallet.finish(self._hold, 0, None))
        metrics.RESERVATIONS_INFLIGHT.dec()
        self._hold = None
        if self.trace.original_route is None:
            self.trace.original_route = self.trace.route
        self.trace.route = route
        try:
            await self._reserve(route, amount, f"{self.trace.request_id}/{route.id}")
        except (InsufficientBalance, BudgetExceeded) as exc:
            self.trace.attempts.append(Attempt(route.primary.channel, "not_affordable", route=route.id))
            log.info("cross-route fallback to %s refused: %s", route.id, exc.message)
            self.trace.route, self.trace.original_route = self.trace.original_route, None
            self.trace.reserved_nanos = 0  # nothing is held any more: the exit records the request
            return False
        return True

    # ------------------------------------------------------------------ streams

    async def next_frame(self) -> Frame | None:
        """The next upstream frame, or None when the stream ended (well or not: see `stream_error`).

        Calling again means the previous frame reached the client: that is what a client that leaves
        is billed for."""
        self.delivered += self._pending
        self._pending = 0
        if self._stream_done:
            return None
        assert self._reader is not None and self._decoder is not None
        try:
            while True:
                item = await self._reader.next()
                if item is None:
                    self._end_stream(None if self._stream_ok else "the upstream stream ended early")
                    return None
                frame = self._decoder.feed(*item)
                if frame is None:  # [DONE]
                    self._stream_ok = True
                    self._end_stream(None)
                    return None
                if self._absorb(frame):
                    return None
                if frame.events or frame.raw is not None or frame.wire is not None:
                    return frame
        except MalformedUpstream as exc:
            self._end_stream(f"the upstream stream is malformed: {exc}")
        except (TimeoutError, H1Error) as exc:
            self._end_stream(f"the upstream stream broke ({type(exc).__name__})")
        return None

    def frame_ready(self) -> bool:
        """Whether the next frame is already buffered (`next_frame` will not wait for the upstream)."""
        return self._reader is not None and not self._stream_done and self._reader.event_ready()

    def _absorb(self, frame: Frame) -> bool:
        """Account for a frame's events; True if it ended the stream (an upstream error)."""
        for event in frame.events:
            if isinstance(event, (TextDelta, ToolCallDelta, ReasoningDelta)):
                self._pending += 1
            elif isinstance(event, Finish):
                self._stream_ok = True
            elif isinstance(event, UpstreamFailure):
                self._pending = 0
                self._end_stream(f"the upstream reported an error mid-stream: {event.message}"[:500])
                return True
            elif event.final:
                self.upstream_usage = event.usage
            else:
                self._upstream_input = event.usage
        return False

    def _end_stream(self, error: str | None) -> None:
        self._stream_done = True
        if error is not None:
            self.stream_error = error
        self._end_upstream(abort=error is not None)  # the slot is free as soon as the upstream is done

    def interrupted(self, exc: BaseException) -> None:
        """The handler hit an unexpected error after the answer started; the exit settles as failed."""
        self._interruption = exc

    def client_gone(self) -> None:
        """The client disconnected (a write failed): the exit bills what reached it."""
        self._client_gone = True

    def _delivered_usage(self) -> Usage:
        """The upstream's input (every class, so cache reads keep their price) + the output delivered."""
        reported = self.upstream_usage if self.upstream_usage is not None else self._upstream_input
        if reported is None:
            return Usage(self._typical_input(), self.delivered)
        return with_output(reported, self.delivered)

    def _typical_input(self) -> int:
        return self._exchange.typical_input_tokens() if self._exchange is not None else 0

    def _stream_usage(self) -> tuple[Usage, str]:
        if self.upstream_usage is not None:
            return self.upstream_usage, "upstream"
        return self._delivered_usage(), "estimated"

    async def finish_stream(self) -> StreamOutcome:
        """Settle a stream that ran to its end (well or broken); the client is still there."""
        usage, source = self._stream_usage()
        if self.stream_error is None:
            return await self._settle_answered("succeeded", usage, source, None)
        self.trace.error = {"code": "upstream_error", "message": self.stream_error}
        billed = self._delivered_usage() if self.delivered and self.route.on_failure == "charge_delivered" \
            else Usage(0, 0)
        return await self._settle_answered("failed", usage, source, billed, UpstreamError(self.stream_error))

    async def _settle_answered(self, status: str, usage: Usage, source: str, billed: Usage | None,
                               error: TokensForgeError | None = None) -> StreamOutcome:
        try:
            receipt = await self._settle(status, usage, source, billed)
        except LedgerUnavailable:  # the answer is out: its charge is posted when the ledger returns
            self._settle_later(status, usage, source, billed)
            return StreamOutcome(status, usage, None, error or LedgerUnavailable(
                "the answer was delivered but the ledger is unavailable: no receipt yet; the charge is posted "
                f"when the ledger is back (GET /v1/receipts/{self.trace.request_id})"))
        return StreamOutcome(status, usage, receipt, error)

    # ------------------------------------------------------------------ settlement

    async def succeed(self, answer: Response) -> dict[str, Any]:
        """Settle a non-streamed answer; raises LedgerUnavailable if the charge could not be posted
        (the answer is then withheld, and nothing was charged)."""
        usage, source = answer.usage, "upstream"
        if usage is None:
            assert self._exchange is not None
            usage, source = self._exchange.estimate(answer), "estimated"
            log.info("request %s: the upstream reported no usable usage; estimated", self.trace.request_id)
        try:
            return await self._settle("succeeded", usage, source)
        except LedgerOutcomeUnknown:
            self._settled = True  # it may have committed: never void it from here; the sweeper decides if not
            raise LedgerUnavailable(
                "the ledger stopped answering while the charge was being posted, so the answer is withheld; "
                f"whether it was charged shows at GET /v1/receipts/{self.trace.request_id} once the ledger is "
                "back") from None
        except LedgerUnavailable:
            raise LedgerUnavailable("the ledger is unavailable, so the answer is withheld; nothing was charged") \
                from None

    async def _settle(self, status: str, usage: Usage | None, source: str | None,
                      billed: Usage | None = None) -> dict[str, Any]:
        """Post the charge (or void) with the usage record, once; returns the receipt.

        `billed` is what is charged when it differs from `usage` (a failed or abandoned stream)."""
        t = self.trace
        t.status, t.usage, t.usage_source = status, usage, source
        route = self.route
        hold = self._hold
        assert hold is not None
        charged = billed if billed is not None else (usage if status == "succeeded" else None)
        t.billed = charged  # the receipt's cost_lines tell what this charge was for
        if charged is not None:
            t.charge_nanos, t.price_nanos = charge_for(charged, route, t.reserved_nanos)
        receipt = self._receipt()
        with tracing.child(self._span, "tokensforge.settlement") as span:
            if span is not None:
                span.set_attributes({"tokensforge.status": status, "tokensforge.charge_nanos": t.charge_nanos})
            try:
                entry_id, balance = await shielded(self.gw.wallet.finish(hold, t.charge_nanos, receipt))
            except LedgerRejected:  # the database refused this receipt's data: post the money with the bare facts
                log.error("request %s: the ledger refused its receipt; settling with a minimal one", t.request_id)
                t.attempts, t.notes = [], []
                t.error = {"code": "receipt_rejected", "message": "receipt details dropped"}
                receipt = self._receipt()
                entry_id, balance = await shielded(self.gw.wallet.finish(hold, t.charge_nanos, receipt))
        self._settled = True
        self._hold = None
        metrics.RESERVATIONS_INFLIGHT.dec()
        t.ledger_entry_id, t.balance_after_nanos = entry_id, balance
        finish_receipt(receipt, entry_id, balance)
        self._count()
        if t.charge_nanos:
            metrics.child(metrics.SPEND, route.bucket, route.kind).inc(t.charge_nanos)
        if t.price_nanos > t.charge_nanos:
            metrics.child(metrics.UNDERCHARGED, route.kind).inc(t.price_nanos - t.charge_nanos)
            log.warning("request %s: the upstream served more than was reserved (%d > %d nano-USD)",
                        t.request_id, t.price_nanos, t.charge_nanos)
        if charged is not None:
            metrics.child(metrics.TOKENS, "input", route.kind).inc(charged.prompt_tokens)
            metrics.child(metrics.TOKENS, "output", route.kind).inc(charged.completion_tokens)
            metrics.count_classes(charged, route.kind)
        return receipt

    def _settle_later(self, status: str, usage: Usage | None, source: str | None, billed: Usage | None) -> None:
        """A delivered answer whose charge could not be posted: keep trying until its hold would expire
        (then the sweeper voids it and the request goes unbilled, which the log says). A request carved
        from a lease with nothing to charge gives its hold back at once and keeps trying only to write
        its usage record, for up to a minute: no row of its own would let the sweeper write it."""
        hold = self._hold
        settings = self.gw.settings
        if hold is not None and hold.lease is not None and billed is not None and not billed.total_tokens:
            self.gw.wallet.discard(hold)
            window_s = max(settings.lease_ttl_s, 60.0)
        else:
            window_s = (settings.lease_ttl_s if hold is not None and hold.lease is not None
                        else settings.reservation_ttl_s) * 0.9
        deadline = time.monotonic() + window_s

        async def retry() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                try:
                    await self._settle(status, usage, source, billed)
                    log.info("posted the delayed charge of %s", self.trace.request_id)
                    return
                except LedgerUnavailable:
                    continue
                except ReservationResolved:
                    return
            log.error("could not post the charge of %s before its reservation expired", self.trace.request_id)
            if self._hold is not None:
                self.gw.wallet.discard(self._hold)

        self._settled = self._later = True  # the retry task owns the settlement now
        self.gw.spawn(retry())

    def _receipt(self) -> dict[str, Any]:
        self.trace.latency_ms = int((time.perf_counter() - self.started) * 1000)
        return build_receipt(self.trace)

    def _count(self, status: str | None = None) -> None:
        t = self.trace
        kind = t.route.kind if t.route else "none"
        metrics.child(metrics.REQUESTS, t.selected_model or "none", kind, t.route.bucket if t.route else "none",
                      status or t.status).inc()
        metrics.child(metrics.REQUEST_DURATION, kind).observe(time.perf_counter() - self.started)
