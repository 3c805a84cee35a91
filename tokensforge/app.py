"""The aiohttp application: routes, middleware and resources in cleanup contexts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .accounts import AccountStore
from .api import admin, client, ops, views
from .api.middleware import error_middleware
from .catalog import Catalog
from .db import create_pool, migrate
from .ledger.store import LedgerStore
from .ledger.sweeper import sweep_forever
from .settings import Settings
from .state import GATEWAY, Gateway, KeyCache
from .upstream.client import UpstreamClient, new_session

log = logging.getLogger("tokensforge")


def create_app(settings: Settings, catalog: Catalog, dsn: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app.add_routes(ops.routes)
    app.add_routes(admin.routes)
    app.add_routes(views.routes)
    app.add_routes(client.routes)
    app.cleanup_ctx.append(_database(settings, catalog, dsn))
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_sweeper)
    if not settings.admin_token:
        log.warning("TOKENSFORGE_ADMIN_TOKEN is not set: the admin API is disabled")
    return app


def _database(settings: Settings, catalog: Catalog, dsn: str):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await migrate(dsn)
        pool = await create_pool(dsn, max_size=settings.db_pool_size)
        try:
            accounts = AccountStore(pool)
            await accounts.ensure_buckets(catalog.buckets)
            app[GATEWAY] = Gateway(
                settings=settings, catalog=catalog, pool=pool,
                ledger=LedgerStore(pool, reservation_ttl_s=settings.reservation_ttl_s),
                accounts=accounts, keys=KeyCache(accounts, settings.key_cache_ttl_s))
            yield
        finally:
            await pool.close()
    return ctx


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    session = new_session()
    gw.upstream = UpstreamClient(session, gw.settings.channel_env)
    yield
    await session.close()


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    task = asyncio.create_task(sweep_forever(gw.ledger, interval_s=gw.settings.sweep_interval_s))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
