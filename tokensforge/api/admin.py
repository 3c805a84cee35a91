"""Admin endpoints (SPEC §2), behind TOKENSFORGE_ADMIN_TOKEN."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web

from ..catalog import RESEARCH_FREE_BUCKET, CatalogError
from ..errors import InvalidApiKey, InvalidRequest, TokensForgeError
from ..ledger.model import bucket_view, entry_view, pool_view, subscription_view
from ..ledger.pools import PoolStore, parse_subscription
from ..state import GATEWAY, Gateway
from .common import check_json_text, check_text, json_response, optional_str, path_param, read_json, require_str

log = logging.getLogger("tokensforge.admin")
routes = web.RouteTableDef()


class AdminDisabled(TokensForgeError):
    status, code, type, final = 403, "admin_disabled", "permission_error", True


def _gateway(request: web.Request) -> Gateway:
    """The gateway, once the admin token checked out (constant-time)."""
    gw = request.app[GATEWAY]
    token = gw.settings.admin_token
    if not token:
        raise AdminDisabled("the admin API is disabled: set TOKENSFORGE_ADMIN_TOKEN to enable it")
    header = request.headers.get("authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise InvalidApiKey("a valid admin token is required")
    return gw


def _policy_field(body: dict[str, Any]) -> dict[str, Any]:
    policy = body.get("policy") or {}
    if not isinstance(policy, dict):
        raise InvalidRequest("'policy' must be an object", param="policy")
    check_json_text(policy, "policy")  # stored as jsonb
    return policy


@routes.post("/admin/accounts")
async def create_account(request: web.Request) -> web.Response:
    gw = _gateway(request)
    body = await read_json(request)
    name = require_str(body, "name")
    account = await gw.accounts.create_account(name, gw.catalog.buckets)
    account["buckets"] = [{**bucket_view(b.id, b.name, 0, 0), "kind": b.kind, "pool": None}
                          for b in gw.catalog.buckets.values()]
    return json_response(account, status=201)


@routes.get("/admin/accounts/{account_id}")
async def get_account(request: web.Request) -> web.Response:
    gw = _gateway(request)
    account_id = path_param(request, "account_id")
    account = await gw.accounts.get_account(account_id)
    account["buckets"] = await account_buckets(gw, account_id)
    account["subscriptions"] = [subscription_view(r) for r in await PoolStore(gw.ledger).subscriptions(account_id)]
    return json_response(account)


async def account_buckets(gw: Gateway, account_id: str) -> list[dict[str, Any]]:
    """Every bucket of the account with its kind; a pool also shows its current period (SPEC §1)."""
    pools = await PoolStore(gw.ledger).pools(account_id)  # first: catches due pools up
    rows = {r["bucket"]: r for r in await gw.ledger.balances(account_id)}
    named = [(b.id, b.name, b.kind) for b in gw.catalog.buckets.values()]
    # a bucket the catalog no longer lists still holds money
    named += [(b, b, "pool" if b in pools else "prepaid") for b in rows if b not in gw.catalog.buckets]
    views = []
    for bucket_id, name, kind in named:
        row = rows.get(bucket_id)
        view = bucket_view(bucket_id, name, row["balance_nanos"] if row else 0, row["reserved_nanos"] if row else 0,
                           row["leased_nanos"] if row else 0)
        view["kind"] = kind
        pool = pools.get(bucket_id)
        view["pool"] = pool_view(pool, view["available_nanos"]) if pool is not None and kind == "pool" else None
        views.append(view)
    return views


@routes.post("/admin/accounts/{account_id}/projects")
async def create_project(request: web.Request) -> web.Response:
    gw = _gateway(request)
    body = await read_json(request)
    name = require_str(body, "name")
    project = await gw.accounts.create_project(path_param(request, "account_id"), name, _policy_field(body))
    return json_response(project, status=201)


@routes.post("/admin/accounts/{account_id}/keys")
async def create_key(request: web.Request) -> web.Response:
    gw = _gateway(request)
    body = await read_json(request)
    name = require_str(body, "name")
    project_id = optional_str(body, "project_id")
    key = await gw.accounts.create_key(path_param(request, "account_id"), name, project_id, _policy_field(body))
    log.info("created key %s (%s) for account %s", key["id"], key["prefix"], key["account_id"])
    # every process may have this key cached as unknown (someone tried it early): forget that
    gw.keys.invalidate()
    await notify(gw, "keys")
    return json_response(key, status=201)


@routes.post("/admin/keys/{key_id}/revoke")
async def revoke_key(request: web.Request) -> web.Response:
    gw = _gateway(request)
    key = await gw.accounts.revoke_key(path_param(request, "key_id"))
    gw.keys.invalidate()
    await notify(gw, "keys")
    return json_response(key)


@routes.post("/admin/accounts/{account_id}/topups")
async def topup(request: web.Request) -> web.Response:
    gw = _gateway(request)
    body = await read_json(request)
    bucket = require_str(body, "bucket")
    if bucket not in gw.catalog.buckets:
        raise InvalidRequest(
            f"unknown bucket {bucket!r} (buckets: {', '.join(gw.catalog.buckets)})", param="bucket")
    if gw.catalog.bucket_kind(bucket) == "pool":
        raise InvalidRequest(f"bucket {bucket!r} is a pool: it is funded by subscriptions "
                             "(POST /admin/accounts/{id}/subscriptions), never by top-ups", param="bucket")
    amount = body.get("amount_nanos")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidRequest("'amount_nanos' must be a positive integer (nano-USD)", param="amount_nanos")
    key = require_str(body, "idempotency_key")
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise InvalidRequest("'note' must be a string", param="note")
    if note is not None:
        check_text(note, "note")
    entry, created = await gw.ledger.topup(path_param(request, "account_id"), bucket, amount, key, note)
    view = entry_view(entry)
    view["replayed"] = not created
    return json_response(view, status=201 if created else 200)


@routes.post("/admin/accounts/{account_id}/subscriptions")
async def create_subscription(request: web.Request) -> web.Response:
    """`{plan, bucket, allowance_nanos, period: "day"|"month", starts_at?}` → the subscription (201)."""
    gw = _gateway(request)
    body = await read_json(request)
    pools = {b.id for b in gw.catalog.buckets.values() if b.kind == "pool" and b.id != RESEARCH_FREE_BUCKET}
    plan, bucket, allowance, period, starts_at = parse_subscription(body, pools)
    row = await PoolStore(gw.ledger).create(path_param(request, "account_id"), bucket, plan, allowance, period,
                                            starts_at)
    log.info("subscription %s (%s, %s) for account %s", row["id"], plan, bucket, row["account_id"])
    return json_response(subscription_view(row), status=201)


@routes.post("/admin/subscriptions/{subscription_id}/cancel")
async def cancel_subscription(request: web.Request) -> web.Response:
    """Ends the subscription at the end of its current period: that period's allowance stays usable."""
    gw = _gateway(request)
    row = await PoolStore(gw.ledger).cancel(path_param(request, "subscription_id"))
    return json_response(subscription_view(row))


@routes.get("/admin/routes/health")
async def routes_health(request: web.Request) -> web.Response:
    """Per channel: circuit state, rolling success rate and latency, last error; and the routes using it."""
    gw = _gateway(request)
    used_by: dict[str, list[str]] = {c: [] for c in gw.catalog.channels}
    for route in gw.catalog.routes.values():
        for ref in route.channels:
            used_by[ref.channel].append(route.id)
    channels = []
    for channel_id in gw.catalog.channels:
        view = gw.health.get(channel_id).view()
        view["routes"] = used_by[channel_id]
        channels.append(view)
    return json_response({"object": "list", "data": channels})


@routes.post("/admin/catalog/reload")
async def reload_catalog(request: web.Request) -> web.Response:
    gw = _gateway(request)
    try:
        catalog = await gw.reload_catalog()
    except CatalogError as exc:
        raise InvalidRequest(f"catalog not reloaded, the old one keeps serving: {exc}") from None
    await notify(gw, "catalog")
    return json_response({"reloaded": True, "source": catalog.source, "models": len(catalog.models)})


async def notify(gw: Gateway, what: str) -> None:
    """Tell every other gateway process (LISTEN/NOTIFY) that `what` changed."""
    try:
        await gw.pool.execute("SELECT pg_notify('tokensforge', $1)", what)
    except Exception:  # the local change is done; peers still expire caches by TTL
        log.warning("could not notify peers of %s change", what)
