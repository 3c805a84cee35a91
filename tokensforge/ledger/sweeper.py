"""Voids reservations whose gateway died (SPEC §5.5); runs in every process, harmlessly in parallel."""

from __future__ import annotations

import asyncio
import logging

from ..errors import LedgerUnavailable
from .store import LedgerStore

log = logging.getLogger("tokensforge.sweeper")


async def sweep_forever(store: LedgerStore, *, interval_s: float = 5.0) -> None:
    """Expire overdue reservations every interval; SKIP LOCKED keeps processes out of each other's way."""
    while True:
        try:
            while (count := await store.expire()) > 0:
                log.warning("voided %d expired reservation(s)", count)
        except LedgerUnavailable:
            log.debug("sweeper: database unavailable, will retry")
        except Exception:  # keep sweeping whatever one pass hit
            log.exception("sweeper pass failed")
        await asyncio.sleep(interval_s)
