"""Ops endpoints (no auth): liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import os
import time

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from ..db import PRIMARY
from ..state import GATEWAY
from .common import json_response

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "pid": os.getpid()})


#: /readyz trusts the background probe's last answer (app.py: every 0.5 s, each ≤ 0.8 s) for this
#: long; an older one means the probe is stuck (the database hangs, or the event loop does)
PROBE_MAX_AGE_S = 2.0


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """From the cached probe, never a query per call: probes from many load balancers cost nothing."""
    gw = request.app.get(GATEWAY)
    checks = {"catalog": gw is not None and bool(gw.catalog.models), "database": False}
    age_ms = None
    if gw is not None and gw.database_checked_at is not None:
        age_s = time.monotonic() - gw.database_checked_at
        checks["database"] = gw.database_up and age_s <= PROBE_MAX_AGE_S
        age_ms = round(age_s * 1000)
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks, "database_checked_ms_ago": age_ms,
            # high availability: the primary this process writes to (host:port, the last one seen while
            # there is none), how long it has gone without one so far, and how long the last spell lasted
            "database": {"primary": PRIMARY.host, "without_primary_s": round(PRIMARY.without_s(), 3),
                         "last_outage_s": None if PRIMARY.last_outage_s is None else round(PRIMARY.last_outage_s, 3),
                         "primary_changes": PRIMARY.changes}}
    return json_response(body, status=200 if ready else 503)


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
