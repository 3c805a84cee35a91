"""Ops endpoints (no auth): liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from ..metrics import DATABASE_UP
from ..state import GATEWAY
from .common import json_response

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "pid": os.getpid()})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    gw = request.app.get(GATEWAY)
    checks = {"catalog": gw is not None and bool(gw.catalog.models), "database": False}
    if gw is not None:
        try:
            async with asyncio.timeout(1.0):
                checks["database"] = await gw.pool.fetchval("SELECT 1") == 1
        except Exception:  # any failure to answer means not ready
            checks["database"] = False
        DATABASE_UP.set(1 if checks["database"] else 0)
    ready = all(checks.values())
    return json_response({"status": "ready" if ready else "not_ready", "checks": checks},
                         status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        # process_* of the answering worker only (they cannot be summed across processes)
        ProcessCollector(registry=registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})
