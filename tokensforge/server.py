"""Running the gateway: database (embedded or given), the app on a socket, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import uvloop
from aiohttp import web
from prometheus_client import multiprocess

from .app import create_app
from .catalog import Catalog, load_catalog
from .embedded_pg import ClusterHome, EmbeddedPostgres, cluster_home
from .settings import Settings

log = logging.getLogger("tokensforge")


@dataclass(frozen=True)
class Database:
    dsn: str
    #: the embedded cluster's home; None when TOKENSFORGE_DATABASE_URL names the database
    home: ClusterHome | None = None

    def describe(self) -> str:
        """Where the data lives, for people (never the URL: it may hold a password)."""
        return "the database at TOKENSFORGE_DATABASE_URL" if self.home is None else str(self.home.cluster_dir)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[Database]:
    """TOKENSFORGE_DATABASE_URL, else an embedded cluster under --data-dir (or, when the
    server account cannot reach that dir, in a home it can reach: see `cluster_home`)."""
    if settings.database_url:
        yield Database(settings.database_url)
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    home = cluster_home(settings.data_dir)
    if home.moved:
        log.warning("embedded PostgreSQL for %s lives in %s: %s", home.requested, home.path, home.reason)
    cluster = EmbeddedPostgres(home.path)
    log.info("starting embedded PostgreSQL in %s", cluster.cluster_dir)
    dsn = cluster.start()
    try:
        yield Database(dsn, home)
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
    sock.listen(4096)  # the kernel caps it at net.core.somaxconn; a burst of new streams must not overflow it
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running(app: web.Application, sock: socket.socket, *, keepalive_timeout_s: float = 75.0,
                  lingering_s: float = 2.0) -> AsyncIterator[web.AppRunner]:
    """Serve `app` on `sock` until the block exits; in-flight requests get 10 s to finish.

    Slow clients are bounded (slowloris): aiohttp starts the keep-alive timer when a connection
    opens and after each response, and does not restart it on partial data, so a client gets
    `keepalive_timeout_s` to send a whole request head (and an idle one is closed after it).
    The body is bounded by `read_json` (settings.body_read_timeout_s); the unread rest of a
    body is drained for at most `lingering_s`, then the connection is closed."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=10.0,
                           keepalive_timeout=keepalive_timeout_s, lingering_time=lingering_s)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield runner
    finally:
        await runner.cleanup()


def quiet_gc() -> None:
    """Once a serving process has started: what exists now (modules, catalog, pools) lives as long as the
    process, so it is frozen out of the collector's reach, and young objects are collected in larger
    rounds. A full collection otherwise walks every object of the import graph again, and the default
    first-generation threshold (700 allocations) runs a collection every couple of proxied requests."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_forever(settings: Settings, catalog: Catalog, dsn: str,
                        on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    sock = listening_socket(settings.host, settings.port)
    async with running(create_app(settings, catalog, dsn), sock, keepalive_timeout_s=settings.http_keepalive_timeout_s):
        log.info("tokensforge listening on http://%s:%d", settings.host, settings.port)
        if on_ready is not None:
            await on_ready()
        quiet_gc()
        await wait_for_signal()


def serve_workers(settings: Settings, dsn: str) -> int:
    """N worker processes on one port (SO_REUSEPORT); the kernel spreads connections.

    Metrics use prometheus_client's multiprocess mode, so any worker's /metrics
    reports all of them. A worker that dies is replaced; SIGINT/SIGTERM stop all.
    """
    metrics_dir = tempfile.mkdtemp(prefix="tokensforge-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by each worker at import
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def spawn(index: int) -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(settings, dsn), name=f"tokensforge-worker-{index}")
        proc.start()
        return proc

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers = [spawn(i) for i in range(settings.workers)]
    log.info("tokensforge: %d workers on http://%s:%d", settings.workers, settings.host, settings.port)
    try:
        while not stopping:
            time.sleep(0.2)
            for i, proc in enumerate(workers):
                if not proc.is_alive() and not stopping:
                    log.error("worker %s exited with %s; starting a new one", proc.pid, proc.exitcode)
                    multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                    workers[i] = spawn(i)
    finally:
        for proc in workers:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in workers:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _die_with_parent() -> None:
    """A worker whose supervisor dies (SIGKILL, OOM) is told to stop (SIGTERM: it drains and returns its
    leases) instead of serving on as an orphan. Linux only; elsewhere the supervisor's shutdown does it."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _worker_main(settings: Settings, dsn: str) -> None:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    assert settings.config_path is not None
    catalog = load_catalog(settings.config_path)
    uvloop.run(_worker(settings, catalog, dsn))


async def _worker(settings: Settings, catalog: Catalog, dsn: str) -> None:
    sock = listening_socket(settings.host, settings.port, reuse_port=True)
    async with running(create_app(settings, catalog, dsn), sock, keepalive_timeout_s=settings.http_keepalive_timeout_s):
        quiet_gc()
        await wait_for_signal()
