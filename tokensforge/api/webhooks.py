"""Admin endpoints for webhooks (SPEC §2): create (the secret shown once), list, delete, deliveries."""

from __future__ import annotations

import logging

from aiohttp import web

from ..errors import InvalidRequest
from ..ledger.model import parse_cursor
from ..webhook_model import delivery_view, parse_webhook, secrets_key, webhook_view
from ..webhooks import WebhookStore
from .admin import _gateway
from .common import check_json_text, json_response, path_param, query_limit, read_json

log = logging.getLogger("tokensforge.admin")
routes = web.RouteTableDef()


@routes.post("/admin/accounts/{account_id}/webhooks")
async def create_webhook(request: web.Request) -> web.Response:
    """`{url, events, thresholds?}` → the webhook with its signing `secret` (201; never shown again)."""
    gw = _gateway(request)
    body = check_json_text(await read_json(request), "body")
    hook = parse_webhook(body, gw.catalog.buckets)
    key = secrets_key(gw.settings.secret_key, gw.settings.admin_token)
    row, secret = await WebhookStore(gw.pool, key).create(path_param(request, "account_id"), hook)
    log.info("webhook %s for account %s (%s)", row["id"], row["account_id"], ", ".join(hook.events))
    return json_response(webhook_view(row, secret=secret), status=201)


@routes.get("/admin/accounts/{account_id}/webhooks")
async def list_webhooks(request: web.Request) -> web.Response:
    gw = _gateway(request)
    rows = await WebhookStore(gw.pool).of_account(path_param(request, "account_id"))
    return json_response({"object": "list", "data": [webhook_view(r) for r in rows], "has_more": False,
                          "next_cursor": None})


@routes.delete("/admin/webhooks/{webhook_id}")
async def delete_webhook(request: web.Request) -> web.Response:
    gw = _gateway(request)
    webhook_id = path_param(request, "webhook_id")
    await WebhookStore(gw.pool).delete(webhook_id)
    return json_response({"id": webhook_id, "object": "webhook", "deleted": True})


@routes.get("/admin/webhooks/{webhook_id}/deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    """Delivery attempts, newest first, paginated (`limit`, `after`)."""
    gw = _gateway(request)
    limit = query_limit(request)
    try:
        after = parse_cursor(request.query.get("after"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="after") from None
    rows = await WebhookStore(gw.pool).deliveries(path_param(request, "webhook_id"), limit=limit + 1, after=after)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"object": "list", "data": [delivery_view(r) for r in rows], "has_more": more,
                          "next_cursor": str(rows[-1]["seq"]) if more else None})
