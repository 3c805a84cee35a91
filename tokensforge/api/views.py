"""What a key may see before and after it spends: models, quote, balance, usage, ledger, receipts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .. import history
from ..db import reads
from ..catalog import Model, Route
from ..errors import InvalidRequest, ModelNotFound, NotFound, PermissionDenied
from ..ledger.model import entry_view, parse_cursor, pool_view
from ..ledger.pools import PoolStore
from ..ledger.store import UsageFilters, translated
from ..money import ROUNDING, usd
from ..policy import EffectivePolicy
from ..accounts import KeyIdentity
from ..canonical import Request
from ..dialects import anthropic_messages, openai_chat, openai_responses
from ..ratelimit_store import shared_rates
from ..pricing import cached_turn_example, class_rates, size_embedding, size_request, unpriced_cache_classes
from ..receipts import request_id_of
from ..routing import allowed_routes, find_model, select_route
from ..state import Gateway
from .admin import account_buckets
from .auth import authenticate
from .client import route_pin
from .common import REQUEST_ID, json_response, path_param, query_limit, query_text, read_json

routes = web.RouteTableDef()


def class_prices_view(route: Route) -> dict[str, Any]:
    """Every token class's price on the route (an unpriced cache class shows the input price it costs, and
    is named in `cache_classes_at_input_price`), and what a cached agent turn costs there."""
    texts = class_rates(route).texts  # input, cache_read, cache_write, cache_write_1h, output
    return {
        "input_price_per_mtok": texts[0],
        "output_price_per_mtok": texts[4],
        "cache_read_price_per_mtok": texts[1],
        "cache_write_price_per_mtok": texts[2],
        "cache_write_1h_price_per_mtok": texts[3],
        "cache_classes_at_input_price": unpriced_cache_classes(route),
        "cached_turn_example": cached_turn_example(route),
    }


def route_view(gw: Gateway, route: Route) -> dict[str, Any]:
    return {
        "id": route.id,
        "kind": route.kind,
        "bucket": route.bucket,
        **class_prices_view(route),
        "channels": {"primary": route.primary.channel, "backups": [c.channel for c in route.backups]},
        "upstream_models": {c.channel: c.upstream_model for c in route.channels},
        "retry": route.retry.as_dict(),
        "on_failure": route.on_failure,
        "healthy": any(gw.health.healthy(c.channel) for c in route.channels),
    }


def model_view(gw: Gateway, model: Model, policy: EffectivePolicy) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": int(gw.started_at),
        "owned_by": model.owned_by,
        "type": model.type,
        "max_output_tokens": model.max_output_tokens,
        "routes": [_without_turn(route_view(gw, r)) if model.type == "embedding" else route_view(gw, r)
                   for r in allowed_routes(model, policy)],
    }


def _without_turn(view: dict[str, Any]) -> dict[str, Any]:
    """An embedding route has no agent turn to price."""
    view.pop("cached_turn_example", None)
    return view


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    gw, _, policy = await authenticate(request)
    data = [model_view(gw, m, policy) for m in gw.catalog.models.values() if policy.allows_model(m.id)]
    return json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model_id:.+}")
async def get_model(request: web.Request) -> web.Response:
    gw, _, policy = await authenticate(request)
    model = gw.catalog.models.get(request.match_info["model_id"])
    if model is None or not policy.allows_model(model.id):
        raise ModelNotFound(f"model {request.match_info['model_id']!r} does not exist", param="model")
    return json_response(model_view(gw, model, policy))


def quote_price(route: Route) -> dict[str, str]:
    """The quote's `price`: the receipt's shape (SPEC §2), every class."""
    texts = class_rates(route).texts
    return {"input_per_mtok": texts[0], "output_per_mtok": texts[4], "cache_read_per_mtok": texts[1],
            "cache_write_per_mtok": texts[2], "cache_write_1h_per_mtok": texts[3], "rounding": ROUNDING}


_DECODERS: dict[str, Callable[[dict[str, Any]], Request]] = {
    "chat": openai_chat.decode, "responses": openai_responses.decode, "messages": anthropic_messages.decode}


def _decoder(dialect: str) -> Callable[[dict[str, Any]], Request]:
    """The quote prices any of the three request shapes (`?dialect=chat|responses|messages`)."""
    decoder = _DECODERS.get(dialect)
    if decoder is None:
        raise InvalidRequest(f"'dialect' must be one of {sorted(_DECODERS)}", param="dialect")
    return decoder


@routes.post("/v1/quote")
async def quote(request: web.Request) -> web.Response:
    """What a request would do, without doing it: any dialect's shape (`?dialect=chat|responses|messages`)."""
    gw, identity, policy = await authenticate(request)
    body = await read_json(request)
    model = find_model(gw.catalog, body.get("model"))
    pin = route_pin(request, body)
    # the body is validated as its endpoint would (a 400 whatever the route), then priced on the route
    req = None if model.type == "embedding" else _decoder(request.query.get("dialect", "chat"))(body)
    out: dict[str, Any] = {"object": "quote", "model": model.id}
    try:
        route = select_route(model, policy, pin)
    except PermissionDenied as exc:
        out.update(allowed=False, reason=exc.message, code=exc.code, route=None)
        return json_response(out)
    sizing = size_embedding(body, route) if req is None else size_request(req, model, route)
    bucket_kind = gw.catalog.bucket_kind(route.bucket)
    pool = (await PoolStore(gw.ledger).pools(identity.account_id)).get(route.bucket) if bucket_kind == "pool" else None
    available = await gw.ledger.available(identity.account_id, route.bucket)
    allowed = available >= sizing.amount_nanos
    out.update({
        "route": {"id": route.id, "kind": route.kind},
        "bucket": route.bucket,
        "bucket_name": gw.catalog.buckets[route.bucket].name,
        "bucket_kind": bucket_kind,
        "pool": None if pool is None else pool_view(pool, available),
        "price": quote_price(route),
        "cached_turn_example": cached_turn_example(route),
        "channels": {"primary": route.primary.channel, "backups": [c.channel for c in route.backups]},
        "healthy": any(gw.health.healthy(c.channel) for c in route.channels),
        "retry": route.retry.as_dict(),
        "on_failure": route.on_failure,
        "allow_cross_route_fallback": policy.allow_cross_route_fallback,
        "estimated_input_tokens": sizing.input_tokens,
        "max_output_tokens": sizing.output_tokens,
        "reserve_nanos": sizing.amount_nanos,
        "reserve_usd": usd(sizing.amount_nanos),
        "available_nanos": available,
        "available_usd": usd(available),
        "allowed": allowed,
        "reason": None if allowed else (
            f"bucket {route.bucket!r} has {available} nano-USD available; this request reserves "
            f"{sizing.amount_nanos}"),
        "code": None if allowed else "insufficient_balance",
    })
    return json_response(out)


@routes.get("/v1/balance")
async def balance(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    return json_response({"object": "balance", "account_id": identity.account_id,
                          "buckets": await account_buckets(gw, identity.account_id)})


def _page(rows: list[Any], limit: int, view: Any) -> dict[str, Any]:
    more = len(rows) > limit
    rows = rows[:limit]
    return {"object": "list", "data": [view(r) for r in rows], "has_more": more,
            "next_cursor": str(rows[-1]["seq"]) if more else None}


def _cursor(request: web.Request) -> int | None:
    try:
        return parse_cursor(request.query.get("after"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="after") from None


def _usage_view(row: Any) -> dict[str, Any]:
    record = dict(row["receipt"])
    record["created_at"] = row["created_at"].isoformat()
    record["latency_ms"] = row["latency_ms"]
    return record


def _time(request: web.Request, name: str) -> datetime | None:
    """An RFC 3339 instant from the query string (`2026-12-07T10:00:00Z`); one without an offset is UTC."""
    raw = query_text(request, name)
    if raw is None or raw == "":
        return None
    try:
        when = datetime.fromisoformat(raw.replace("z", "Z"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an RFC 3339 time like 2026-12-07T10:00:00Z", param=name) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def usage_filters(request: web.Request, identity: KeyIdentity) -> UsageFilters:
    """`GET /v1/usage`'s filters; `id` takes any id a client holds (`req_…`, `chatcmpl-…`, `resp_…`,
    `msg_…`); a project's key sees its project's records only."""
    text = {k: query_text(request, k) or None for k in ("model", "route_kind", "bucket", "status", "key_id", "id")}
    return UsageFilters(model=text["model"], route_kind=text["route_kind"], bucket=text["bucket"],
                        status=text["status"], key_id=text["key_id"], project_id=identity.project_id,
                        since=_time(request, "since"), until=_time(request, "until"),
                        request_id=request_id_of(text["id"].strip()) if text["id"] else None)


@routes.get("/v1/usage")
async def usage(request: web.Request) -> web.StreamResponse:
    gw, identity, policy = await authenticate(request)
    output = request.query.get("format", "json")
    if output not in ("json", "csv"):
        raise InvalidRequest("'format' must be 'json' or 'csv'", param="format")
    filters = usage_filters(request, identity)
    if output == "csv":
        return await usage_csv(request, gw, identity, filters, policy)
    limit = query_limit(request)
    rows = await gw.ledger.usage(identity.account_id, limit=limit + 1, after=_cursor(request), filters=filters)
    return json_response(_page(rows, limit, _usage_view))


# --- the CSV export: every matching row, streamed (tokensforge/history.py) ---

CSV_COLUMNS = history.CSV_COLUMNS


async def usage_csv(request: web.Request, gw: Gateway, identity: KeyIdentity, filters: UsageFilters,
                    policy: EffectivePolicy) -> web.StreamResponse:
    """Every usage record matching the filters, `since` ≤ created_at < `until` and older than the `after`
    cursor, newest first. An export counts against the key's rpm like any request, and a key runs at most
    history.EXPORTS_PER_KEY at once."""
    if policy.rate_limits:
        await shared_rates(gw).admit(policy.rate_limits, 0)
    response = web.StreamResponse(headers={
        "x-request-id": request[REQUEST_ID],  # prepared here, before the middleware could add it
        "content-type": "text/csv; charset=utf-8", "cache-control": "no-store",
        "content-disposition": 'attachment; filename="tokensforge-usage.csv"'})

    async def write(chunk: bytes) -> None:
        if not response.prepared:
            await response.prepare(request)
        await response.write(chunk)

    async with translated("read"):
        await history.stream_usage_csv(reads(gw.pool), identity.key_id, identity.account_id, write, filters=filters,
                                       after=_cursor(request),
                                       acquire_timeout_s=gw.ledger.acquire_timeout_s)
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


#: window → (bin size in seconds, number of bins)
SUMMARY_WINDOWS = {"24h": (3600, 24), "30d": (86400, 30)}


@routes.get("/v1/usage/summary")
async def usage_summary(request: web.Request) -> web.Response:
    """Where the account's money went: spend per bucket over time, top models and routes, typical tokens."""
    gw, identity, _ = await authenticate(request)
    window = request.query.get("window", "24h")
    if window not in SUMMARY_WINDOWS:
        raise InvalidRequest("'window' must be '24h' or '30d'", param="window")
    bin_s, bins = SUMMARY_WINDOWS[window]
    found = await gw.ledger.spend_summary(identity.account_id, bin_s=bin_s, bins=bins,
                                          project_id=identity.project_id)
    return json_response(summary_view(window, bin_s, found))


def summary_view(window: str, bin_s: int, found: dict[str, list[Any]]) -> dict[str, Any]:
    series: dict[str, list[dict[str, Any]]] = {}
    for row in found["series"]:
        series.setdefault(row["bucket"], []).append(
            {"t": row["t"].isoformat(), "charge_nanos": int(row["charge_nanos"])})
    typical = found["typical"][0] if found["typical"] else None
    return {
        "object": "usage.summary",
        "window": window,
        "bucket_size_s": bin_s,
        "series": [{"bucket": b, "total_nanos": sum(p["charge_nanos"] for p in points), "points": points}
                   for b, points in series.items()],
        "top_models": [{"model": r["model"], "charge_nanos": int(r["charge_nanos"]), "requests": int(r["requests"])}
                       for r in found["models"]],
        "top_routes": [{"route_id": r["route_id"], "route_kind": r["route_kind"],
                        "charge_nanos": int(r["charge_nanos"]), "requests": int(r["requests"])}
                       for r in found["routes"]],
        "typical": {
            "prompt_tokens": None if typical is None else typical["prompt_tokens"],
            "completion_tokens": None if typical is None else typical["completion_tokens"],
            "requests": 0 if typical is None else int(typical["requests"]),
        },
    }


@routes.get("/v1/ledger")
async def ledger(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    limit = query_limit(request)
    rows = await gw.ledger.ledger(identity.account_id, limit=limit + 1, after=_cursor(request),
                                  bucket=query_text(request, "bucket") or None, project_id=identity.project_id)
    return json_response(_page(rows, limit, entry_view))


@routes.get("/v1/receipts/{request_id}")
async def receipt(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    request_id = path_param(request, "request_id")
    row = await gw.ledger.receipt(identity.account_id, request_id_of(request_id), identity.project_id)
    if row is None:
        raise NotFound(f"no finished request {request_id!r} in this "
                       + ("project" if identity.project_id else "account"))
    return json_response(_usage_view(row))
