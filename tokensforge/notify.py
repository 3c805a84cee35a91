"""Cross-process invalidation: PostgreSQL LISTEN/NOTIFY on channel `tokensforge`.

Admin changes made through any gateway process (key revocation, catalog
reload) and circuit openings (`circuit_share.py`) reach every other process
sharing the database within milliseconds; the key cache's short TTL is the fallback if a notification is missed while
the listener reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from .catalog import CatalogError
from .circuit_share import opened_elsewhere
from .ledger.leases import PRESSURE_PREFIX
from .state import Gateway

log = logging.getLogger("tokensforge.notify")
CHANNEL = "tokensforge"


async def handle(gw: Gateway, payload: str) -> None:
    if payload.startswith(PRESSURE_PREFIX):
        await gw.wallet.on_pressure(payload[len(PRESSURE_PREFIX):])
    elif payload.startswith("circuit:"):
        opened_elsewhere(gw, payload)
    elif payload == "keys":
        gw.keys.invalidate()
    elif payload == "catalog":
        try:
            await gw.reload_catalog()
            log.info("catalog reloaded on notification")
        except CatalogError as exc:
            log.error("catalog reload refused, the old catalog keeps serving: %s", exc)


async def listen_forever(gw: Gateway, dsn: str, *, retry_s: float = 1.0) -> None:
    """Hold one LISTEN connection; reconnect after outages (caches are dropped then, to be safe)."""
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())

            def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
                asyncio.get_running_loop().create_task(handle(gw, payload))

            await conn.add_listener(CHANNEL, on_notify)
            gw.keys.invalidate()  # anything may have changed while we were not listening
            await lost.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is away; try again shortly
            log.debug("notification listener: %s", exc)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()
        await asyncio.sleep(retry_s)
