"""GET /openapi.json: the machine-readable contract (OpenAPI 3.1) of every endpoint (SPEC §2)."""

from __future__ import annotations

import orjson
from aiohttp import web

from ..openapi import DOCUMENT

routes = web.RouteTableDef()

_BODY = orjson.dumps(DOCUMENT)  # the document is static: serialised once


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json",
                        headers={"cache-control": "public, max-age=300", "access-control-allow-origin": "*"})
