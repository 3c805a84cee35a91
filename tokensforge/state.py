"""The gateway's shared state, handed to every handler through one typed app key."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web

from . import metrics
from .accounts import AccountStore, KeyIdentity
from .catalog import Catalog, CatalogError, load_catalog
from .keys import hash_key
from .ledger.leases import Wallet
from .ledger.store import LedgerStore
from .policy import EffectivePolicy, effective
from .ratelimit import RateLimiter
from .settings import Settings
from .upstream.client import UpstreamClient
from .upstream.health import HealthRegistry


Caller = tuple[KeyIdentity, EffectivePolicy]


class KeyCache:
    """Bearer key → (identity, effective policy), kept for a fraction of a second so a revocation
    bites within one even if a NOTIFY is missed; NOTIFY clears it at once.

    Unknown (and revoked) keys are remembered apart, in a bounded LRU with a longer TTL, so a
    client hammering with a bad key costs no database query per request and a flood of random
    keys cannot push the known ones out. Key creation sends NOTIFY 'keys', which clears both.
    Concurrent lookups of one key share one query."""

    def __init__(self, accounts: AccountStore, ttl_s: float, *, unknown_ttl_s: float = 5.0,
                 unknown_max: int = 10_000) -> None:
        self.accounts = accounts
        self.ttl_s = ttl_s
        self.unknown_ttl_s = unknown_ttl_s
        self.unknown_max = unknown_max
        self._entries: dict[bytes, tuple[float, Caller]] = {}
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # digest → expiry, oldest first
        self._inflight: dict[bytes, asyncio.Task[Caller | None]] = {}
        self._generation = 0  # bumped by invalidate(): answers to older queries are not kept

    async def lookup(self, plaintext: str) -> Caller | None:
        digest = hash_key(plaintext)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        expires = self._unknown.get(digest)
        if expires is not None:
            if expires > now:
                metrics.child(metrics.KEY_LOOKUPS, "unknown_cached").inc()
                return None
            del self._unknown[digest]
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(digest, plaintext))
            self._inflight[digest] = task  # also the strong reference until it is done
            task.add_done_callback(functools.partial(self._done, digest))
        # shielded: a caller that leaves must not cancel the query others wait for
        return await asyncio.shield(task)

    async def _query(self, digest: bytes, plaintext: str) -> Caller | None:
        generation = self._generation
        identity = await self.accounts.identity(plaintext)
        caller = None
        if identity is not None and not identity.revoked:
            caller = identity, effective(identity.key_policy, identity.project_policy,
                                         key_id=identity.key_id, project_id=identity.project_id)
        metrics.child(metrics.KEY_LOOKUPS, "database").inc()
        if generation != self._generation:  # keys changed while we asked: do not keep a stale answer
            return caller
        now = time.monotonic()
        if caller is None:
            self._unknown[digest] = now + self.unknown_ttl_s
            self._unknown.move_to_end(digest)
            while len(self._unknown) > self.unknown_max:
                self._unknown.popitem(last=False)
        else:
            if len(self._entries) > 100_000:  # only real keys land here; a safety net
                self._entries.clear()
            self._entries[digest] = (now + self.ttl_s, caller)
        return caller

    def _done(self, digest: bytes, task: asyncio.Task[Caller | None]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have left before it failed

    def unknown_cached(self) -> int:
        """How many unknown keys are remembered."""
        return len(self._unknown)

    def invalidate(self) -> None:
        self._generation += 1
        self._entries.clear()
        self._unknown.clear()
        self._inflight.clear()  # later callers ask again; running queries finish for their waiters


@dataclass
class Gateway:
    settings: Settings
    catalog: Catalog
    pool: asyncpg.Pool
    ledger: LedgerStore
    wallet: Wallet
    accounts: AccountStore
    keys: KeyCache
    upstream: UpstreamClient | None = None
    health: HealthRegistry = field(default_factory=HealthRegistry)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    started_at: float = field(default_factory=time.time)
    #: the background database probe's last answer and when it came (time.monotonic()); /readyz
    #: reads these instead of querying the database on every call
    database_up: bool = False
    database_checked_at: float | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Background work that outlives a request (kept referenced; cancelled at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reload_catalog(self) -> Catalog:
        """Re-read the catalog file and swap it in; a bad file leaves the old one serving."""
        if self.settings.config_path is None:
            raise CatalogError("no catalog file configured; nothing to reload")
        catalog = load_catalog(self.settings.config_path)
        await self.accounts.ensure_buckets(catalog.buckets)
        self.catalog = catalog
        return catalog


GATEWAY = web.AppKey("gateway", Gateway)
