"""The aiohttp application: routes, middleware and resources in cleanup contexts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from . import circuit_share, metrics, tracing
from .accounts import AccountStore
from .api import (admin, client, messages, openapi, ops, playground, research, responses, responses_store, views,
                  webhooks as webhook_api)
from .api.middleware import error_middleware
from .catalog import Catalog
from .db import attach_replica, create_pool, migrate, probe_primary
from .ledger.leases import LeaseConfig, Wallet
from .ledger.store import LedgerStore
from .ledger.pools import PoolStore
from .research_store import ReportStore, interrupt_stale_forever
from . import history
from .ledger.sweeper import sweep_forever, tick_pools_forever
from .notify import listen_forever
from .settings import Settings
from .state import GATEWAY, Gateway, KeyCache
from .upstream.client import UpstreamClient
from .upstream.h1 import H1Pool
from .upstream.health import BreakerConfig, HealthRegistry
from .webhook_model import secrets_key
from .webhooks import Deliverer, DeliveryConfig

log = logging.getLogger("tokensforge")


def create_app(settings: Settings, catalog: Catalog, dsn: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app.add_routes(ops.routes)
    app.add_routes(admin.routes)
    app.add_routes(webhook_api.routes)
    app.add_routes(views.routes)
    app.add_routes(client.routes)
    app.add_routes(responses.routes)
    app.add_routes(responses_store.routes)
    app.add_routes(messages.routes)
    app.add_routes(research.routes)
    app.add_routes(playground.routes)
    app.add_routes(openapi.routes)
    if settings.tracing:
        app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_database(settings, catalog, dsn))
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_background(settings.direct_dsn(dsn)))  # its LISTEN needs a session of its own
    if not settings.admin_token:
        log.warning("TOKENSFORGE_ADMIN_TOKEN is not set: the admin API is disabled")
    return app


CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def _database(settings: Settings, catalog: Catalog, dsn: str) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await migrate(settings.direct_dsn(dsn))
        pool = await create_pool(dsn, max_size=settings.db_pool_size, acquire_timeout_s=settings.db_acquire_timeout_s,
                                 statement_cache_size=settings.db_statement_cache_size)
        try:
            await attach_replica(pool, max_size=settings.db_pool_size, acquire_timeout_s=settings.db_acquire_timeout_s,
                                 statement_cache_size=settings.db_statement_cache_size)  # TOKENSFORGE_READ_DATABASE_URL
            accounts = AccountStore(pool)
            await accounts.ensure_buckets(catalog.buckets)
            ledger = LedgerStore(pool, reservation_ttl_s=settings.reservation_ttl_s,
                                 acquire_timeout_s=settings.db_acquire_timeout_s)
            app[GATEWAY] = Gateway(
                settings=settings, catalog=catalog, pool=pool, ledger=ledger,
                wallet=Wallet(ledger, LeaseConfig(enabled=settings.leases, ttl_s=settings.lease_ttl_s,
                                                  fraction=settings.lease_fraction, idle_s=settings.lease_idle_s)),
                accounts=accounts, keys=KeyCache(accounts, settings.key_cache_ttl_s,
                                                 unknown_ttl_s=settings.unknown_key_cache_ttl_s,
                                                 unknown_max=settings.unknown_key_cache_size),
                health=HealthRegistry(BreakerConfig(failure_threshold=settings.breaker_failure_threshold,
                                                    cooldown_s=settings.breaker_cooldown_s)))
            gw = app[GATEWAY]
            circuit_share.attach(gw)  # breakers opened here are announced to the other processes
            gw.wallet.database_up = lambda: gw.database_up
            yield
            await gw.wallet.close()  # requests have ended: give the leases back now, not after their TTL
        finally:
            await pool.close()
    return ctx


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    tracing.setup()
    yield
    await asyncio.to_thread(tracing.shutdown)  # exports what is buffered (a blocking HTTP call)


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    pool = H1Pool()
    gw.upstream = UpstreamClient(pool, gw.settings.channel_env, max_body_bytes=gw.settings.max_upstream_body_bytes)
    yield
    await pool.close()  # every upstream connection, idle or not, is gone before the loop closes


def _background(dsn: str) -> CleanupCtx:
    """The sweepers (reservations, dead runs' reports), the pools' tick, the database probe, the NOTIFY
    listener and webhook delivery, in every process."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        gw = app[GATEWAY]
        await probe_database(gw)  # /readyz has an answer before the first request
        pools = PoolStore(gw.ledger)
        tasks = [asyncio.create_task(sweep_forever(gw.ledger, interval_s=gw.settings.sweep_interval_s)),
                 asyncio.create_task(tick_pools_forever(pools, lambda: gw.catalog.research_free_daily_nanos,
                                                        interval_s=gw.settings.sweep_interval_s)),
                 asyncio.create_task(interrupt_stale_forever(
                     ReportStore(gw.pool), idle_s=gw.settings.reservation_ttl_s,
                     interval_s=max(gw.settings.sweep_interval_s, 1.0) * 6)),
                 asyncio.create_task(_probe_database(gw)),
                 asyncio.create_task(history.partitions_forever(gw.pool)),
                 asyncio.create_task(gw.wallet.run()),
                 asyncio.create_task(listen_forever(gw, dsn))]
        if gw.settings.webhooks:
            tasks.append(asyncio.create_task(_deliverer(gw).run()))
        yield
        tasks += list(gw.tasks)  # delayed settlements still waiting: their reservations expire
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return ctx


def _deliverer(gw: Gateway) -> Deliverer:
    s = gw.settings
    return Deliverer(gw.pool, DeliveryConfig(
        poll_interval_s=s.webhook_poll_interval_s, timeout_s=s.webhook_timeout_s, retry_base_s=s.webhook_retry_base_s,
        retry_max_s=s.webhook_retry_max_s, give_up_s=s.webhook_give_up_s), secrets_key(s.secret_key, s.admin_token))


async def probe_database(gw: Gateway, timeout_s: float = 0.8) -> bool:
    """One query through the pool; its answer and time are kept on the gateway for /readyz."""
    up = await probe_primary(gw.pool, timeout_s)  # which host is the primary, and spells without one
    gw.database_up, gw.database_checked_at = up, time.monotonic()
    metrics.DATABASE_UP.set(1 if up else 0)
    return up


async def _probe_database(gw: Gateway, interval_s: float = 0.5) -> None:
    """Every interval, so /readyz answers from an answer at most ~1 s old without a query per call."""
    while True:
        await asyncio.sleep(interval_s)
        await probe_database(gw)
