"""Requests- and tokens-per-minute limits, per process (a sliding one-minute window).

Counters live in each gateway process: with N processes a scope can use up to
N × its limit. The README says so; shared limits would need the database or
a shared store on the hot path.
"""

from __future__ import annotations

import math
from collections import deque

from .errors import RateLimited

WINDOW_S = 60.0


class RateLimiter:
    def __init__(self) -> None:
        self._events: dict[str, deque[tuple[float, int]]] = {}

    def admit(self, scope: str, rpm: int | None, tpm: int | None, tokens: int, now: float) -> None:
        """Count one request of `tokens` tokens, or raise RateLimited with when to retry."""
        events = self._events.setdefault(scope, deque())
        while events and events[0][0] <= now - WINDOW_S:
            events.popleft()
        if rpm is not None and len(events) >= rpm:
            self._refuse(scope, "requests", rpm, events[0][0] + WINDOW_S - now)
        if tpm is not None:
            used = sum(t for _, t in events)
            if used + tokens > tpm:
                wait = WINDOW_S if tokens > tpm else self._wait_for_tokens(events, used + tokens - tpm, now)
                self._refuse(scope, "tokens", tpm, wait)
        events.append((now, tokens))

    @staticmethod
    def _wait_for_tokens(events: deque[tuple[float, int]], excess: int, now: float) -> float:
        freed = 0
        for at, tokens in events:
            freed += tokens
            if freed >= excess:
                return at + WINDOW_S - now
        return WINDOW_S

    @staticmethod
    def _refuse(scope: str, what: str, limit: int, wait_s: float) -> None:
        kind = scope.split(":", 1)[0]
        raise RateLimited(
            f"{kind} rate limit of {limit} {what} per minute reached",
            retry_after_s=max(1, math.ceil(wait_s)), limit_scope=kind)
