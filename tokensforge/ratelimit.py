"""Requests- and tokens-per-minute limits (pure: the current time is passed in).

Limits are shared by every gateway process through *rate leases*: a process takes a few
request and token permits of a scope's current one-minute window from the database
(`ratelimit_store.py`), spends them here in memory (`LeaseBook`), and gives back what it
did not use once it is idle. The database never hands out more than the limit in one
window, so all processes together never admit more.

Windows are fixed and anchored at a scope's first request after its previous window
ended (database clock): a client that used its limit is refused until that window ends
(Retry-After says when), then has a whole new minute's worth. Across a window boundary
up to 2 × the limit can pass within 60 s, as with any fixed window.

`RateLimiter` is this process's own sliding window of what it admitted. It decides alone
only while the database cannot be reached (then N processes allow up to N × the limit).
Its memory is bounded: a scope keeps one slot per second it saw traffic in (at most ~61
in the window, however many requests), and scopes idle for a whole window are dropped.
A slot counts until its *last* request leaves the window, so the limit is never exceeded;
a request may be refused up to a second longer than with one entry per request.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .errors import RateLimited

WINDOW_S = 60.0
SLOT_S = 1.0
IDLE_S = 1.0  # a lease unused this long is given back, so idle processes do not strand permits
RECHECK_S = 0.5  # what the database said is left in a window is trusted this long


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
    """This process's rate-limit state: its own sliding window of what it admitted (`admit`,
    `record`) and the rate leases it holds (`leases`)."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._next_sweep = -math.inf
        self.leases = LeaseBook()
        #: the database side (ratelimit_store.SharedRates), attached on first use
        self.shared: object | None = None

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

    def record(self, scope: str, tokens: int, now: float) -> None:
        """Count a request the shared budget admitted, so a fallback to this window knows it."""
        if now >= self._next_sweep:
            self._sweep(now)
        window = self._windows.get(scope)
        if window is None:
            window = self._windows[scope] = _Window()
        window.expire(now)
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
        raise refusal(scope, what, limit, wait_s)


def refusal(scope: str, what: str, limit: int, wait_s: float) -> RateLimited:
    kind = scope.split(":", 1)[0]
    return RateLimited(f"{kind} rate limit of {limit} {what} per minute reached",
                       retry_after_s=max(1, math.ceil(wait_s)), limit_scope=kind)


@dataclass(frozen=True, slots=True)
class Grant:
    """The database's answer to one take: permits of window `window_id` and what is left there."""

    window_id: int
    window_left_s: float
    requests: int
    tokens: int
    requests_left: int | None  # None: the scope has no such limit
    tokens_left: int | None


class _Lease:
    __slots__ = ("window_id", "usable_until", "ends_at", "requests", "tokens", "used_at", "known_until",
                 "requests_left", "tokens_left")

    def __init__(self, grant: Grant, sent_at: float, received_at: float) -> None:
        self.window_id = grant.window_id
        # permits are spent only while the window surely runs (measured from before the database
        # read its clock); a refusal's Retry-After points at when it surely ended
        self.usable_until = sent_at + grant.window_left_s
        self.ends_at = received_at + grant.window_left_s
        self.requests = self.tokens = 0
        self.used_at = received_at
        self.known_until = received_at + RECHECK_S
        self.requests_left, self.tokens_left = grant.requests_left, grant.tokens_left


class LeaseBook:
    """The rate permits this process holds, one lease per scope, for the scope's current window."""

    def __init__(self) -> None:
        self._leases: dict[str, _Lease] = {}

    def spend(self, scope: str, rpm: int | None, tpm: int | None, tokens: int, now: float) -> bool:
        """Admit one request of `tokens` tokens from permits held (True), or say the database must be
        asked (False). Raises RateLimited when the database said moments ago that this window cannot
        cover the request, or when it could never fit."""
        if tpm is not None and tokens > tpm:
            raise refusal(scope, "tokens", tpm, WINDOW_S)
        lease = self._leases.get(scope)
        if lease is None:
            return False
        if now >= lease.usable_until:
            del self._leases[scope]  # the window ended: its permits are worth nothing now
            return False
        lease.used_at = now
        short_requests = rpm is not None and lease.requests < 1
        short_tokens = tpm is not None and lease.tokens < tokens
        if not short_requests and not short_tokens:
            if rpm is not None:
                lease.requests -= 1
            if tpm is not None:
                lease.tokens -= tokens
            return True
        if now < lease.known_until:
            if rpm is not None and short_requests and (lease.requests_left or 0) < 1:
                raise refusal(scope, "requests", rpm, lease.ends_at - now)
            if tpm is not None and short_tokens and lease.tokens + (lease.tokens_left or 0) < tokens:
                raise refusal(scope, "tokens", tpm, lease.ends_at - now)
        return False

    def need(self, scope: str, rpm: int | None, tpm: int | None, tokens: int) -> tuple[int, int]:
        """(requests, tokens) to ask the database for so that a request of `tokens` fits."""
        lease = self._leases.get(scope)
        requests_held, tokens_held = (lease.requests, lease.tokens) if lease is not None else (0, 0)
        return (0 if rpm is None else max(0, 1 - requests_held),
                0 if tpm is None else max(0, tokens - tokens_held))

    def add(self, scope: str, grant: Grant, sent_at: float, received_at: float) -> None:
        """Keep what the database granted (a grant of a newer window replaces the old lease)."""
        lease = self._leases.get(scope)
        fresh = _Lease(grant, sent_at, received_at)
        if lease is not None and lease.window_id == grant.window_id:
            fresh.requests, fresh.tokens = lease.requests, lease.tokens
        fresh.requests += grant.requests
        fresh.tokens += grant.tokens
        self._leases[scope] = fresh

    def idle(self, now: float, idle_s: float = IDLE_S) -> list[tuple[str, int, int, int]]:
        """Drop leases unused for `idle_s` (or whose window ended); (scope, window, requests, tokens)
        of the permits to give back."""
        out = []
        for scope, lease in list(self._leases.items()):
            if now >= lease.usable_until or now - lease.used_at >= idle_s:
                del self._leases[scope]
                if now < lease.usable_until and (lease.requests > 0 or lease.tokens > 0):
                    out.append((scope, lease.window_id, lease.requests, lease.tokens))
        return out

    def drain(self) -> list[tuple[str, int, int, int]]:
        """Drop every lease; the permits to give back (the process is stopping)."""
        out = [(scope, lease.window_id, lease.requests, lease.tokens) for scope, lease in self._leases.items()
               if lease.requests > 0 or lease.tokens > 0]
        self._leases.clear()
        return out

    def held(self, scope: str) -> tuple[int, int]:
        """(requests, tokens) held for `scope`."""
        lease = self._leases.get(scope)
        return (lease.requests, lease.tokens) if lease is not None else (0, 0)

    def __len__(self) -> int:
        return len(self._leases)
