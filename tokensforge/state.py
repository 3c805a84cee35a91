"""The gateway's shared state, handed to every handler through one typed app key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web

from .accounts import AccountStore, KeyIdentity
from .catalog import Catalog, CatalogError, load_catalog
from .keys import hash_key
from .ledger.store import LedgerStore
from .policy import EffectivePolicy, effective
from .ratelimit import RateLimiter
from .settings import Settings
from .upstream.client import UpstreamClient
from .upstream.health import HealthRegistry


Caller = tuple[KeyIdentity, EffectivePolicy]


class KeyCache:
    """Bearer key → (identity, effective policy), kept for a fraction of a second so a revocation
    bites within one even if a NOTIFY is missed; NOTIFY clears it at once."""

    def __init__(self, accounts: AccountStore, ttl_s: float) -> None:
        self.accounts = accounts
        self.ttl_s = ttl_s
        self._entries: dict[bytes, tuple[float, Caller | None]] = {}

    async def lookup(self, plaintext: str) -> Caller | None:
        digest = hash_key(plaintext)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        identity = await self.accounts.identity(plaintext)
        caller = None
        if identity is not None and not identity.revoked:
            caller = identity, effective(identity.key_policy, identity.project_policy,
                                         key_id=identity.key_id, project_id=identity.project_id)
        if len(self._entries) > 100_000:
            self._entries.clear()
        self._entries[digest] = (now + self.ttl_s, caller)
        return caller

    def invalidate(self) -> None:
        self._entries.clear()


@dataclass
class Gateway:
    settings: Settings
    catalog: Catalog
    pool: asyncpg.Pool
    ledger: LedgerStore
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
