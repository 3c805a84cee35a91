"""Per-channel circuit breakers and rolling health, pure (time is passed in).

closed → open after `failure_threshold` consecutive failures, or when the error
rate over the last `window` outcomes passes `error_rate_threshold`; open →
half_open after `cooldown_s`, where one probe request is let through; the
probe's success closes the circuit, its failure opens it again.

A breaker that opened from this process's own failures is announced to the other
processes (`HealthRegistry.announce`, set by the I/O side); a peer's announcement opens
the breaker here too (`open_from_peer`) for this process's own cooldown, then the usual
half-open probe decides. Announcements are not passed on, so they cannot echo.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    error_rate_threshold: float = 0.5
    window: int = 20
    min_window: int = 10
    cooldown_s: float = 5.0
    probe_timeout_s: float = 120.0  # a probe that never reported (its request vanished) is given up


@dataclass(slots=True)
class ChannelHealth:
    channel: str
    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: str = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False
    probe_started_at: float = 0.0
    last_error: str | None = None
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=100))
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def allow(self, now: float) -> bool:
        """May a request go to this channel now? Half-open admits one probe at a time.

        The caller that gets the probe must end it: `record()` its outcome, or `abandon_probe()`
        if the attempt ended without one (the client left). A probe older than `probe_timeout_s`
        is given up anyway, so a lost ticket cannot shut the channel for ever."""
        if self.state == OPEN and now - self.opened_at >= self.config.cooldown_s:
            self.state = HALF_OPEN
            self.probe_in_flight = False
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and (not self.probe_in_flight
                                        or now - self.probe_started_at >= self.config.probe_timeout_s):
            self.probe_in_flight = True
            self.probe_started_at = now
            return True
        return False

    def abandon_probe(self) -> None:
        """The probe's request ended without telling whether the channel works: let the next one probe."""
        if self.state == HALF_OPEN:
            self.probe_in_flight = False

    def record(self, ok: bool, latency_ms: float, now: float, error: str | None = None) -> bool:
        """Count one outcome; True when it opened the circuit (it was not open before)."""
        self.outcomes.append(ok)
        if ok:
            self.latencies_ms.append(latency_ms)
            self.consecutive_failures = 0
            if self.state != CLOSED:
                self.state = CLOSED
            self.probe_in_flight = False
            return False
        self.consecutive_failures += 1
        self.last_error = error
        if self.state == HALF_OPEN or self._should_open():
            # a request let through before the circuit opened may fail into an open one: the cooldown
            # restarts, but nothing new opened
            opened = self.state != OPEN
            self.state = OPEN
            self.opened_at = now
            self.probe_in_flight = False
            return opened
        return False

    def open_from_peer(self, now: float) -> bool:
        """Another process's breaker for this channel opened: skip it here too, for this breaker's own
        cooldown. A circuit already open keeps its time; a half-open one whose probe is out lets the
        probe decide. True when this opened the circuit."""
        if self.state == OPEN or (self.state == HALF_OPEN and self.probe_in_flight):
            return False
        self.state = OPEN
        self.opened_at = now
        self.last_error = "opened by another gateway process"
        return True

    def _should_open(self) -> bool:
        if self.consecutive_failures >= self.config.failure_threshold:
            return True
        recent = list(self.outcomes)[-self.config.window:]
        if len(recent) < self.config.min_window:
            return False
        return recent.count(False) / len(recent) > self.config.error_rate_threshold

    def success_rate(self) -> float | None:
        recent = list(self.outcomes)[-self.config.window:]
        return None if not recent else recent.count(True) / len(recent)

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def view(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "state": self.state,
            "success_rate": self.success_rate(),
            "latency_p50_ms": self.percentile_ms(0.50),
            "latency_p95_ms": self.percentile_ms(0.95),
            "consecutive_failures": self.consecutive_failures,
            "probe_in_flight": self.probe_in_flight,
            "last_error": self.last_error,
        }


class HealthRegistry:
    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self.channels: dict[str, ChannelHealth] = {}
        #: told (channel, cooldown_s) when a breaker opens from this process's own failures; must not block
        self.announce: Callable[[str, float], None] | None = None

    def get(self, channel: str) -> ChannelHealth:
        health = self.channels.get(channel)
        if health is None:
            health = self.channels[channel] = ChannelHealth(channel, self.config)
        return health

    def healthy(self, channel: str) -> bool:
        return self.get(channel).state != OPEN
