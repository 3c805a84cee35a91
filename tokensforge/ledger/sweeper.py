"""Voids reservations whose gateway died (SPEC §5.5) and runs the pools' schedule (SPEC §1, §5.8);
both run in every process, harmlessly in parallel."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from ..errors import LedgerUnavailable
from .pools import TICK_BATCH, PoolStore
from .store import LedgerStore

log = logging.getLogger("tokensforge.sweeper")


#: how long after its lease ended a stream's trace waits for a settlement still being retried before the
#: sweeper records it as lost (ledger/leases.py: a leased request retries its record for up to a minute)
TRACE_GRACE_S = float(os.environ.get("TOKENSFORGE_TRACE_GRACE_S", "65"))


async def sweep_forever(store: LedgerStore, *, interval_s: float = 5.0, trace_grace_s: float | None = None) -> None:
    """Expire overdue reservations every interval, then close the traces of streams whose gateway died
    (SPEC §5.9); SKIP LOCKED keeps processes out of each other's way."""
    grace_s = TRACE_GRACE_S if trace_grace_s is None else trace_grace_s
    while True:
        try:
            while (count := await store.expire()) > 0:
                log.warning("voided %d expired reservation(s)", count)
            while (count := await store.close_lost(grace_s)) > 0:
                log.warning("recorded %d stream(s) whose gateway was lost mid-stream", count)
        except LedgerUnavailable:
            log.debug("sweeper: database unavailable, will retry")
        except Exception:  # keep sweeping whatever one pass hit
            log.exception("sweeper pass failed")
        await asyncio.sleep(interval_s)


async def tick_pools_forever(pools: PoolStore, free_allowance_nanos: Callable[[], int], *,
                             interval_s: float = 5.0) -> None:
    """Grant and lapse due pool periods every interval. SKIP LOCKED shares the work between processes;
    the grant-once index and the subscription row lock make each grant and lapse happen exactly once.
    `free_allowance_nanos` reads the current catalog, so a reload changes the next grants."""
    while True:
        try:
            while await pools.tick(free_allowance_nanos()) >= TICK_BATCH:
                pass  # a backlog (a gap, many accounts): keep going until it is worked off
        except LedgerUnavailable:
            log.debug("pool tick: database unavailable, will retry")
        except Exception:  # keep ticking whatever one pass hit
            log.exception("pool tick failed")
        await asyncio.sleep(interval_s)
