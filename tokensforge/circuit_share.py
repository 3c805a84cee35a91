"""Circuit openings shared between gateway processes over the NOTIFY channel `tokensforge`.

When a process's breaker for channel C opens from its own failures, it sends
`circuit:<C>:<cooldown_ms>`; every process (the sender included, where it changes nothing)
opens its breaker for C, so one process's discovery protects the others within a round
trip. A process that opened from a peer does not announce it again. The send runs in the
background: a request never waits for it, and a lost notice only costs the others the
failures they would have seen without it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import asyncpg

from . import metrics
from .state import Gateway
from .upstream.health import STATE_VALUE

log = logging.getLogger("tokensforge.circuit")
PREFIX = "circuit:"
SEND_TIMEOUT_S = 2.0


def notice(channel: str, cooldown_s: float) -> str:
    return f"{PREFIX}{channel}:{round(cooldown_s * 1000)}"


def parse(payload: str) -> tuple[str, int] | None:
    """(channel, cooldown_ms) of a notice, None if it is not one (channel ids may hold ':')."""
    if not payload.startswith(PREFIX):
        return None
    channel, _, cooldown = payload[len(PREFIX):].rpartition(":")
    if not channel or not cooldown.isdigit():
        return None
    return channel, int(cooldown)


def attach(gw: Gateway) -> None:
    """Let this gateway's breakers announce their openings (idempotent)."""
    if gw.health.announce is None:
        gw.health.announce = functools.partial(_announce, gw)


def _announce(gw: Gateway, channel: str, cooldown_s: float) -> None:
    gw.spawn(_send(gw.pool, notice(channel, cooldown_s)))


async def _send(pool: asyncpg.Pool, payload: str) -> None:
    try:
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await pool.execute("SELECT pg_notify('tokensforge', $1)", payload)
        metrics.child(metrics.CIRCUIT_NOTICES, "sent").inc()
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("could not tell other processes that a circuit opened: %s", exc)


def opened_elsewhere(gw: Gateway, payload: str) -> None:
    """Apply a peer's notice: open this process's breaker for a channel of its catalog."""
    parsed = parse(payload)
    if parsed is None or parsed[0] not in gw.catalog.channels:
        return
    health = gw.health.get(parsed[0])
    if health.open_from_peer(time.monotonic()):
        metrics.child(metrics.CIRCUIT_NOTICES, "applied").inc()
        metrics.child(metrics.CIRCUIT_STATE, parsed[0]).set(STATE_VALUE[health.state])
        metrics.child(metrics.CHANNEL_UP, parsed[0]).set(0)
