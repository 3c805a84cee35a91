"""GET / DELETE /v1/responses/{id} and GET /v1/responses/{id}/input_items: stored responses (SPEC §2).

A response is stored unless it was created with `store: false` (OpenAI's default is to store); this
account's only: another account's id answers 404 like an unknown one.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..conversations import ConversationStore, ItemsPage, Order
from ..errors import InvalidRequest
from .auth import authenticate
from .common import json_response, path_param, query_limit, query_text

routes = web.RouteTableDef()


@routes.get("/v1/responses/{response_id}")
async def get_response(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    body = await ConversationStore(gw.pool).response(path_param(request, "response_id"), identity.account_id)
    return web.Response(body=body, content_type="application/json")


@routes.delete("/v1/responses/{response_id}")
async def delete_response(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    response_id = path_param(request, "response_id")
    await ConversationStore(gw.pool).delete(response_id, identity.account_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


@routes.get("/v1/responses/{response_id}/input_items")
async def list_input_items(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    response_id = path_param(request, "response_id")
    page = await ConversationStore(gw.pool).items(
        response_id, identity.account_id, limit=query_limit(request), order=_order(request),
        after=query_text(request, "after"), before=query_text(request, "before"))
    return web.Response(body=page_json(page), content_type="application/json")


def _order(request: web.Request) -> Order:
    order = request.query.get("order", "desc")
    if order == "asc":
        return "asc"
    if order == "desc":
        return "desc"
    raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")


def page_json(page: ItemsPage) -> bytes:
    """OpenAI's list shape; the items go out as stored (JSON text), without a parse and re-encode."""
    data: dict[str, Any] = {
        "object": "list",
        "data": [orjson.Fragment(item) for _, item in page.items],
        "first_id": page.items[0][0] if page.items else None,
        "last_id": page.items[-1][0] if page.items else None,
        "has_more": page.has_more,
    }
    return orjson.dumps(data)
