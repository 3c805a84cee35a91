"""Running the gateway: database (embedded or given), the app on a socket, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .app import create_app
from .catalog import Catalog
from .embedded_pg import EmbeddedPostgres
from .settings import Settings

log = logging.getLogger("tokensforge")


@contextlib.contextmanager
def database(settings: Settings):  # type: ignore[no-untyped-def]
    """The DSN to use: TOKENSFORGE_DATABASE_URL, else an embedded cluster under --data-dir."""
    if settings.database_url:
        yield settings.database_url
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cluster = EmbeddedPostgres(settings.data_dir)
    log.info("starting embedded PostgreSQL in %s", cluster.cluster_dir)
    dsn = cluster.start()
    try:
        yield dsn
    finally:
        log.info("stopping embedded PostgreSQL")
        cluster.stop()


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running(app: web.Application, sock: socket.socket) -> AsyncIterator[web.AppRunner]:
    """Serve `app` on `sock` until the block exits; in-flight requests get 10 s to finish."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield runner
    finally:
        await runner.cleanup()


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_forever(settings: Settings, catalog: Catalog, dsn: str,
                        on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    sock = listening_socket(settings.host, settings.port)
    async with running(create_app(settings, catalog, dsn), sock):
        log.info("tokensforge listening on http://%s:%d", settings.host, settings.port)
        if on_ready is not None:
            await on_ready()
        await wait_for_signal()
