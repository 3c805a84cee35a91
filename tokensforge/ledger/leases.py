"""Money held in memory, safely: per-process leases (escrow) carved into per-request holds.

A process takes a *lease* on an account's bucket from PostgreSQL in one round trip (a
reservation row of kind 'lease', 0005_leases.sql) and carves each request's hold out of
it in memory, so admitting a request costs no database round trip. Settlements stay
durable before the client sees a receipt (group-committed, each posting its charge
against the lease). Everything a lease holds is counted in the bucket's reserved amount,
so no process can spend what another holds, and a crashed process's leases expire like
any reservation (the sweeper), costing the account nothing but the wait.

Sizing: a grant is what recent demand needs for `horizon_s` (at least `min_requests`
holds of the current size), capped by the database at `fraction` of the bucket's
available balance and by every budget's remaining amount. Below that the bucket is
"small" for leasing and the request takes a per-request reservation, exactly as before
leases (so a nearly empty account is shared request by request, not lease by lease).

Giving back: unused lease money is returned after `idle_s` without use and whenever a
lease holds far more than demand needs. A request refused for money or budget is
refused only after this process has returned its own unused lease on that bucket and
asked the database again; it also tells the other processes (NOTIFY `lease_pressure:`),
which return theirs within milliseconds and lease nothing on that bucket for
`pressure_s`, and when others still hold leases it waits up to `giveback_wait_s` for
them before the final answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import metrics
from ..errors import BudgetExceeded, InsufficientBalance, LedgerOutcomeUnknown, LedgerUnavailable, ReservationResolved
from .model import BudgetLimit
from .store import LedgerStore

log = logging.getLogger("tokensforge.leases")

PRESSURE_PREFIX = "lease_pressure:"
_SEP = "\t"
_INT64_MAX = 2**63 - 1

LeaseKey = tuple[str, str, tuple[BudgetLimit, ...]]  # account, bucket, budgets the holds must fit


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    enabled: bool = True
    ttl_s: float = 60.0  # a dead holder's leases expire after this; live ones are renewed every ttl_s / 4
    fraction: float = 0.25  # of the bucket's available balance, at most, per grant
    horizon_s: float = 2.0  # a grant covers this long of recent demand
    min_requests: int = 8  # and at least this many holds of the current size
    idle_s: float = 5.0  # unused money goes back after this long without a hold
    tick_s: float = 1.0
    pressure_s: float = 5.0  # after a refusal on a bucket, lease nothing there for this long
    giveback_wait_s: float = 0.3  # how long a refusal waits for other processes to give back


@dataclass(slots=True)
class Lease:
    """One process's lease on (account, bucket, budgets), as this process knows it."""

    key: LeaseKey
    id: str
    held: int = 0  # what the lease row holds in the database
    carved: int = 0  # held for requests in flight
    stuck: int = 0  # part of `carved` whose settlement outcome is unknown: released only when the lease closes
    retired: bool = False  # no new holds; closed once its holds are settled
    in_db: bool = False  # its row exists (a grant was made)
    last_used: float = field(default_factory=time.monotonic)
    window_nanos: int = 0  # carved since the last tick
    waiting: int = 0  # holds waiting for a grant on its way
    rate: float = 0.0  # nano-USD carved per second (smoothed)
    growing: asyncio.Future[None] | None = None

    @property
    def free(self) -> int:
        return self.held - self.carved


@dataclass(slots=True)
class Hold:
    """The money held for one request: carved from a lease, or a per-request reservation row."""

    reservation_id: str
    request_id: str
    amount_nanos: int
    lease: Lease | None = None
    pool_period_end: datetime | None = None
    open: bool = True


class Wallet:
    """Where a request's money is held: a lease when the bucket can be leased, else a reservation."""

    def __init__(self, store: LedgerStore, config: LeaseConfig | None = None, holder: str | None = None) -> None:
        self.store = store
        self.config = config or LeaseConfig()
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._leases: dict[LeaseKey, Lease] = {}
        self._retired: dict[str, Lease] = {}  # lease id → retired lease still holding requests' money
        self._pressure: dict[tuple[str, str], float] = {}  # (account, bucket) → monotonic time it ends
        self._tasks: set[asyncio.Task[None]] = set()
        #: whether the database answered lately (the gateway's probe): while it does not, nothing is
        #: carved from leases, so no upstream is called for a request that could not be settled
        self.database_up: Callable[[], bool] = lambda: True

    # ------------------------------------------------------------------ holding

    def carve_now(self, reservation_id: str, request_id: str, account_id: str, bucket: str, amount_nanos: int,
                  budgets: Sequence[BudgetLimit], *, leasable: bool) -> Hold | None:
        """The hold, carved at once from a lease with room for it; None when `reserve` must be awaited."""
        if not (leasable and self.config.enabled and amount_nanos > 0):
            return None
        lease = self._leases.get((account_id, bucket, tuple(budgets)))
        if lease is None or lease.free < amount_nanos or self._pressed(account_id, bucket) or not self.database_up():
            return None
        self._take(lease, amount_nanos)
        return Hold(reservation_id, request_id, amount_nanos, lease)

    def _take(self, lease: Lease, amount: int) -> None:
        lease.carved += amount
        lease.window_nanos += amount
        lease.last_used = time.monotonic()
        metrics.child(metrics.HOLDS, "lease").inc()

    async def reserve(self, reservation_id: str, request_id: str, account_id: str, bucket: str, amount_nanos: int,
                      budgets: Sequence[BudgetLimit], receipt: Callable[[], dict[str, Any]], *,
                      leasable: bool) -> Hold:
        """Hold `amount_nanos` for a request (raises InsufficientBalance / BudgetExceeded per the rule above)."""
        pressed = self._pressed(account_id, bucket)
        if leasable and self.config.enabled and amount_nanos > 0 and not pressed and self.database_up():
            lease = await self._carve((account_id, bucket, tuple(budgets)), amount_nanos)
            if lease is not None:
                return Hold(reservation_id, request_id, amount_nanos, lease)
        try:
            return await self._reserve_row(reservation_id, request_id, account_id, bucket, amount_nanos, budgets,
                                           receipt)
        except (InsufficientBalance, BudgetExceeded):
            # under pressure this process already gave its leases there back and told the others (and
            # leases nothing there): the reservation just refused was the recheck, so a client hammering
            # an empty account costs one query per request, not a give-back round each
            if not (leasable and self.config.enabled) or pressed:
                raise
        # refused: give back what this process holds there, tell the others, ask again
        self._press(account_id, bucket)
        await self._give_back(account_id, bucket)
        try:
            await self.store.notify(f"{PRESSURE_PREFIX}{account_id}{_SEP}{bucket}")
        except LedgerUnavailable:
            pass
        deadline = time.monotonic() + self.config.giveback_wait_s
        delay_s = 0.02
        while True:
            try:
                return await self._reserve_row(reservation_id, request_id, account_id, bucket, amount_nanos,
                                               budgets, receipt)
            except (InsufficientBalance, BudgetExceeded):
                if time.monotonic() + delay_s > deadline or \
                        not await self.store.leased_by_others(account_id, bucket, self.holder):
                    metrics.LEASE_REFUSALS.inc()
                    raise
            await asyncio.sleep(delay_s)
            delay_s *= 2

    async def _reserve_row(self, reservation_id: str, request_id: str, account_id: str, bucket: str,
                           amount_nanos: int, budgets: Sequence[BudgetLimit],
                           receipt: Callable[[], dict[str, Any]]) -> Hold:
        held = await self.store.reserve(reservation_id, account_id, bucket, amount_nanos, budgets,
                                        receipt=receipt(), request_id=request_id)
        metrics.child(metrics.HOLDS, "reservation").inc()
        return Hold(reservation_id, request_id, amount_nanos, None, held.pool_period_end)

    async def _carve(self, key: LeaseKey, amount: int) -> Lease | None:
        """Carve `amount` from this process's lease on `key`, growing it if needed; None if the bucket
        cannot be leased now (small, a pool, budgets short): the caller reserves per request."""
        for _ in range(8):
            lease = self._leases.get(key)
            if lease is None:
                lease = self._leases[key] = Lease(key, f"lease_{secrets.token_hex(8)}")
            if lease.free >= amount:
                self._take(lease, amount)
                return lease
            if lease.growing is not None:  # someone is already asking: wait for that answer
                lease.waiting += amount  # and tell the next grant it is needed
                try:
                    await asyncio.shield(lease.growing)
                finally:
                    lease.waiting -= amount
                continue
            if not await self._grow(lease, amount):
                return None
        return None

    async def _grow(self, lease: Lease, amount: int) -> bool:
        cfg = self.config
        need = amount - lease.free
        # recent demand, at least a few holds, and twice what is in flight or waiting right now (a burst)
        want = max(int(lease.rate * cfg.horizon_s), amount * cfg.min_requests,
                   2 * (lease.carved + lease.waiting + amount)) - lease.free
        want = max(want, need)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lease.growing = future
        try:
            account, bucket, budgets = lease.key
            grant = await self.store.lease_grow(
                lease.id, self.holder, account, bucket, want_nanos=want, min_nanos=need,
                fraction_ppm=int(cfg.fraction * 1_000_000), ttl_s=cfg.ttl_s, budgets=budgets)
        finally:
            lease.growing = None
            future.set_result(None)
        metrics.child(metrics.LEASE_GRANTS, grant.outcome).inc()
        if grant.outcome == "ok":  # deltas only: settlements in flight subtract their own charges
            lease.held += grant.granted_nanos
            lease.in_db = True
            if lease.retired:  # given up while the grant was on its way: hand it straight back
                self._retired[lease.id] = lease
                if lease.carved == lease.stuck:
                    self._spawn_close(lease)
            return True
        if grant.outcome == "stale":  # swept (we were away too long) or a budget period turned
            self._retire(lease)
            return True  # the next round opens a new lease
        if lease.held == 0 and lease.carved == 0:
            if lease.in_db:
                self._retire(lease)
            else:
                self._leases.pop(lease.key, None)
        return False

    def trace_stream(self, hold: Hold, receipt: dict[str, Any]) -> asyncio.Task[None] | None:
        """A stream carved from a lease is about to start: write its trace (SPEC §5.9) in the background,
        group-committed, so the caller awaits it only before the client sees the stream (by then the
        upstream call has usually taken longer). None for a per-request reservation: its row carries
        the receipt and the sweeper records it if the gateway dies."""
        if hold.lease is None:
            return None
        task = asyncio.get_running_loop().create_task(self.store.trace(hold.lease.id, receipt))
        task.add_done_callback(_retrieve)  # a stream that never opens does not await it
        return task

    # ------------------------------------------------------------------ settling

    async def finish(self, hold: Hold, charge_nanos: int, record: dict[str, Any] | None) -> tuple[str | None, int]:
        """Settle (charge > 0) or void a hold, with its usage record when given; returns (entry id, balance)."""
        lease = hold.lease
        if lease is None:
            result = await self.store.finish(hold.reservation_id, charge_nanos, record)
            hold.open = False
            return result
        if charge_nanos == 0 and record is None:  # a void: nothing was written for it
            self._release(hold, 0)
            return None, 0
        try:
            result = await self.store.lease_finish(lease.id, hold.request_id, charge_nanos, record)
        except ReservationResolved:
            self._release(hold, 0)
            if self._leases.get(lease.key) is lease:
                self._retire(lease)  # the lease is gone from the database
            if charge_nanos <= 0:
                raise
            # voided under us (this process was away longer than its TTL): charge what is still there
            return await self.store.lease_charge_late(lease.id, hold.request_id, charge_nanos, record, lease.key[2])
        except LedgerOutcomeUnknown:
            lease.stuck += hold.amount_nanos  # maybe posted: keep it held until the lease closes
            hold.open = False
            self._retire(lease)
            raise
        # LedgerUnavailable: not posted; the hold stays and the caller may try again
        self._release(hold, charge_nanos)
        return result

    def _release(self, hold: Hold, charged: int) -> None:
        lease = hold.lease
        if lease is None or not hold.open:
            return
        hold.open = False
        lease.carved -= hold.amount_nanos
        lease.held -= charged
        if lease.retired and lease.carved == lease.stuck:
            self._spawn_close(lease)

    def discard(self, hold: Hold) -> None:
        """The request ends without settling here (its settlement went to a retry task that gave up)."""
        self._release(hold, 0)

    # ------------------------------------------------------------------ giving back

    def _pressed(self, account: str, bucket: str) -> bool:
        until = self._pressure.get((account, bucket))
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._pressure[(account, bucket)]
        return False

    def _press(self, account: str, bucket: str) -> None:
        self._pressure[(account, bucket)] = time.monotonic() + self.config.pressure_s

    async def on_pressure(self, payload: str) -> None:
        """Another process ran short on a bucket: give back what this one holds there."""
        account, _, bucket = payload.partition(_SEP)
        if not any(k[0] == account and k[1] == bucket for k in self._leases):
            return
        self._press(account, bucket)
        await self._give_back(account, bucket)

    async def _give_back(self, account: str, bucket: str) -> None:
        leases = [lease for key, lease in list(self._leases.items()) if key[0] == account and key[1] == bucket]
        for lease in leases:
            self._retire(lease)
        await self._return_unused(leases)

    def _retire(self, lease: Lease) -> None:
        if self._leases.get(lease.key) is lease:
            del self._leases[lease.key]
        if lease.retired:
            return
        lease.retired = True
        self._retired[lease.id] = lease
        if lease.carved == lease.stuck:
            self._spawn_close(lease)

    def _spawn_close(self, lease: Lease) -> None:
        task = asyncio.get_running_loop().create_task(self._close(lease))
        self._tasks.add(task)  # a strong reference until done
        task.add_done_callback(self._tasks.discard)

    async def _close(self, lease: Lease) -> None:
        """Return everything a retired lease still holds once none of it is carved (stuck holds
        included: whatever of theirs was posted is already out of the lease in the database)."""
        if self._retired.get(lease.id) is not lease or lease.carved != lease.stuck:
            return
        try:
            left = await self.store.lease_return({lease.id: _INT64_MAX}, close=True)
        except LedgerUnavailable:
            return  # the tick tries again; else the sweeper ends it after its TTL
        self._retired.pop(lease.id, None)
        lease.held = lease.carved  # nothing free: it is closed
        if left.get(lease.id) not in (None, 0):
            log.warning("lease %s did not close (%s nano-USD left)", lease.id, left.get(lease.id))

    async def _return_unused(self, leases: list[Lease]) -> None:
        """Shrink leases to what their requests in flight hold."""
        for lease in leases:
            if lease.retired and lease.carved == lease.stuck:
                await self._close(lease)
        # computed after the awaits above, and taken out of reach before the next one
        amounts = {lease.id: lease.free for lease in leases if lease.free > 0}
        if not amounts:
            return
        by_id = {lease.id: lease for lease in leases}
        for lease_id, given in amounts.items():
            by_id[lease_id].held -= given  # out of reach at once: holds carved meanwhile cannot use it
        try:
            left = await self.store.lease_return(amounts, close=False)
        except LedgerUnavailable:
            for lease_id, given in amounts.items():
                by_id[lease_id].held += given  # nothing moved: the database still holds it for us
            return
        for lease_id in amounts:
            if left.get(lease_id) is None:
                self._retire(by_id[lease_id])

    # ------------------------------------------------------------------ upkeep

    async def run(self) -> None:
        """Renew live leases, return idle money, close drained retired leases; every `tick_s`."""
        cfg = self.config
        next_renew = time.monotonic() + cfg.ttl_s / 4
        while True:
            await asyncio.sleep(cfg.tick_s)
            try:
                await self._tick()
                if time.monotonic() >= next_renew:
                    await self._renew()
                    next_renew = time.monotonic() + cfg.ttl_s / 4
            except LedgerUnavailable:
                log.debug("lease upkeep: database unavailable, will retry")
            except Exception:
                log.exception("lease upkeep failed")

    async def _tick(self) -> None:
        cfg = self.config
        now = time.monotonic()
        shrink: list[Lease] = []
        for lease in list(self._leases.values()):
            lease.rate = 0.5 * lease.rate + 0.5 * lease.window_nanos / cfg.tick_s
            lease.window_nanos = 0
            idle = now - lease.last_used >= cfg.idle_s
            if lease.growing is not None:
                continue  # a grant on its way is not idleness
            if idle and lease.carved == 0:
                self._retire(lease)  # closes it
            elif lease.free > 0 and (idle or lease.free > 4 * max(lease.rate * cfg.horizon_s, 1)):
                shrink.append(lease)
        for lease in list(self._retired.values()):
            if lease.carved == lease.stuck:
                await self._close(lease)
        if shrink:
            await self._return_unused(shrink)
        metrics.LEASED.set(sum(lease.held for lease in self._leases.values()))

    async def _renew(self) -> None:
        leases = {lease.id: lease for lease in [*self._leases.values(), *self._retired.values()] if lease.held > 0}
        if not leases:
            return
        alive = await self.store.lease_renew(sorted(leases), self.config.ttl_s)
        for lease_id, lease in leases.items():
            if lease_id not in alive:
                log.warning("lease %s expired while this process held it (away longer than its TTL)", lease_id)
                self._retire(lease)

    async def close(self) -> None:
        """At shutdown: return every lease's unused money (requests in flight have ended by now); closes
        still under way are superseded by this one."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        leases = [*self._leases.values(), *self._retired.values()]
        if not leases:
            return
        try:
            await self.store.lease_return({lease.id: _INT64_MAX for lease in leases}, close=True)
        except LedgerUnavailable:
            log.warning("could not return %d lease(s) at shutdown; they expire after %.0f s",
                        len(leases), self.config.ttl_s)
        self._leases.clear()
        self._retired.clear()

    # ------------------------------------------------------------------ views

    def leases(self) -> list[Lease]:
        return [*self._leases.values(), *self._retired.values()]


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()

