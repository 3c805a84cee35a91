"""Requests- and tokens-per-minute limits, per process (a sliding one-minute window).

Counters live in each gateway process: with N processes a scope can use up to
N × its limit. The README says so; shared limits would need the database or
a shared store on the hot path.

Memory is bounded: a scope keeps one slot per second it saw traffic in (at most
~61 in the window, however many requests), and scopes idle for a whole window
are dropped. A slot counts until its *last* request leaves the window, so the
limit is never exceeded; a request may be refused up to a second longer than
with one entry per request.
"""

from __future__ import annotations

import math
from collections import deque

from .errors import RateLimited

WINDOW_S = 60.0
SLOT_S = 1.0


class _Slot:
    __slots__ = ("index", "last_at", "requests", "tokens")

    def __init__(self, index: int, at: float) -> None:
        self.index, self.last_at, self.requests, self.tokens = index, at, 0, 0


class _Window:
    """One scope's requests in the last minute, in per-second slots, with running totals."""

    __slots__ = ("slots", "requests", "tokens")

    def __init__(self) -> None:
        self.slots: deque[_Slot] = deque()
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        slots = self.slots
        while slots and slots[0].last_at <= now - WINDOW_S:
            slot = slots.popleft()
            self.requests -= slot.requests
            self.tokens -= slot.tokens

    def add(self, tokens: int, now: float) -> None:
        index = math.floor(now / SLOT_S)
        if not self.slots or self.slots[-1].index != index:
            self.slots.append(_Slot(index, now))
        slot = self.slots[-1]
        slot.last_at = max(slot.last_at, now)
        slot.requests += 1
        slot.tokens += tokens
        self.requests += 1
        self.tokens += tokens

    def wait_for_tokens(self, excess: int, now: float) -> float:
        freed = 0
        for slot in self.slots:
            freed += slot.tokens
            if freed >= excess:
                return slot.last_at + WINDOW_S - now
        return WINDOW_S


class RateLimiter:
    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._next_sweep = -math.inf

    def admit(self, scope: str, rpm: int | None, tpm: int | None, tokens: int, now: float) -> None:
        """Count one request of `tokens` tokens, or raise RateLimited with when to retry."""
        if now >= self._next_sweep:
            self._sweep(now)
        window = self._windows.get(scope)
        if window is None:
            window = self._windows[scope] = _Window()
        window.expire(now)
        if rpm is not None and window.requests >= rpm:
            self._refuse(scope, "requests", rpm, window.slots[0].last_at + WINDOW_S - now)
        if tpm is not None and window.tokens + tokens > tpm:
            wait = WINDOW_S if tokens > tpm else window.wait_for_tokens(window.tokens + tokens - tpm, now)
            self._refuse(scope, "tokens", tpm, wait)
        window.add(tokens, now)

    def _sweep(self, now: float) -> None:
        """Drop scopes with nothing left in the window (one pass per window: amortised O(1))."""
        for scope in [s for s, w in self._windows.items() if not w.slots or w.slots[-1].last_at <= now - WINDOW_S]:
            del self._windows[scope]
        self._next_sweep = now + WINDOW_S

    def scopes(self) -> int:
        """How many scopes are held in memory."""
        return len(self._windows)

    def slots(self, scope: str) -> int:
        """How many per-second slots `scope` holds."""
        window = self._windows.get(scope)
        return len(window.slots) if window is not None else 0

    @staticmethod
    def _refuse(scope: str, what: str, limit: int, wait_s: float) -> None:
        kind = scope.split(":", 1)[0]
        raise RateLimited(
            f"{kind} rate limit of {limit} {what} per minute reached",
            retry_after_s=max(1, math.ceil(wait_s)), limit_scope=kind)
