"""POST /v1/research/reports: the research assistant over the gateway's own billed route."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import orjson
from aiohttp import web

from ..catalog import RESEARCH_FREE_BUCKET, Route
from ..errors import InsufficientBalance, InvalidRequest, TokensForgeError
from ..money import usd
from ..dialects import openai_chat
from ..ledger.pools import PoolStore
from ..lifecycle import Lifecycle
from ..pricing import size_request
from ..research import DISCLAIMER, estimate_view, parse_request, section_body
from ..routing import find_model, select_route
from ..state import Gateway
from .auth import authenticate
from .client import complete
from .common import REQUEST_ID, STREAM, json_response, read_json

routes = web.RouteTableDef()


class ChargeCapTooLow(InsufficientBalance):
    """402 like a short bucket: the caller's own cap cannot pay for the first section."""

    def __init__(self, bucket: str, needed_nanos: int, cap_nanos: int) -> None:
        super().__init__(bucket, needed_nanos, cap_nanos)
        self.message = f"max_charge_nanos {cap_nanos} cannot cover the first section ({needed_nanos} nano-USD)"
        self.extra["max_charge_nanos"] = cap_nanos


@routes.post("/v1/research/reports")
async def create_report(request: web.Request) -> web.StreamResponse:
    gw, identity, policy = await authenticate(request)
    req = parse_request(await read_json(request))
    pin = request.headers.get("x-tokensforge-route") or req.route
    model = find_model(gw.catalog, req.model)
    if model.type != "chat":
        raise InvalidRequest(f"model {model.id!r} is not a chat model", param="model")
    route = select_route(model, policy, pin)
    reserves = [size_request(openai_chat.decode(section_body(req, i)), model, route).amount_nanos
                for i in range(len(req.sections))]
    free = await _free_allowance(gw, identity.account_id)
    available = await gw.ledger.available(identity.account_id, route.bucket)
    estimate = estimate_view(req, reserves, available, {"id": route.id, "kind": route.kind}, route.bucket, free)
    if req.dry_run:
        return json_response({"estimate": estimate})
    from_bucket = sum(reserves[estimate["free_allowance"]["covers_sections"] if free else 0:])
    if available < from_bucket:
        raise InsufficientBalance(route.bucket, from_bucket, available)
    if req.max_charge_nanos < reserves[0]:
        raise ChargeCapTooLow(route.bucket, reserves[0], req.max_charge_nanos)

    balance_before = await gw.ledger.balance(identity.account_id, route.bucket)
    report_id = "rep_" + secrets.token_hex(8)
    stream = await _open_stream(request) if req.stream else None
    if stream is not None:
        await _event(stream, "estimate", estimate)
    sections: list[dict[str, Any]] = []
    status, total = "completed", 0
    for index, title in enumerate(req.sections):
        if total + reserves[index] > req.max_charge_nanos:
            status = "stopped_at_cap"
            break
        if stream is not None:
            await _event(stream, "section_started", {"index": index, "title": title})
        failure: TokensForgeError | None = None
        payer = await _payer(gw, identity.account_id, route, reserves[index])
        try:
            async with Lifecycle(gw, identity, policy, request[REQUEST_ID] + f"_s{index + 1}",
                                 "research.section") as life:
                life.begin(model, payer, pinned=pin is not None)
                answer, receipt = await complete(gw, life, model, payer, openai_chat.decode(section_body(req, index)))
        except TokensForgeError as exc:  # refused or failed: recorded and voided by the lifecycle
            failure = exc
        if failure is not None:
            status = "failed"
            sections.append({"title": title, "content": None, "error": failure.body()["error"], "receipt": None})
            break
        content = answer.output_text
        section = {"title": title, "content": content, "receipt": receipt}
        sections.append(section)
        total += receipt["charge_nanos"]
        if stream is not None:
            await _event(stream, "section_completed", {"index": index, **section})
    balance_after = await gw.ledger.balance(identity.account_id, route.bucket)
    report = {
        "id": report_id, "object": "research.report", "topic": req.topic, "model": model.id,
        "route": {"id": route.id, "kind": route.kind}, "bucket": route.bucket, "status": status,
        "sections": sections, "total_charge_nanos": total, "total_charge_usd": usd(total),
        "balance_before_nanos": balance_before, "balance_after_nanos": balance_after,
        "disclaimer": DISCLAIMER,
    }
    if stream is None:
        return json_response(report)
    await _event(stream, "report_completed", report)
    await stream.write_eof()
    return stream


async def _free_allowance(gw: Gateway, account_id: str) -> tuple[str, int] | None:
    """(bucket, available) of the account's free research allowance, caught up to today; None if off."""
    if not gw.catalog.research_free_daily_nanos:
        return None
    await PoolStore(gw.ledger).pools(account_id)  # a new day's allowance is granted before we look
    return RESEARCH_FREE_BUCKET, await gw.ledger.available(account_id, RESEARCH_FREE_BUCKET)


async def _payer(gw: Gateway, account_id: str, route: Route, reserve_nanos: int) -> Route:
    """The route as charged for one section: from the free research allowance while it can cover the
    section's reservation, else from the route's own bucket (one request, one bucket; the receipt's
    `bucket` and `bucket_kind` say which paid)."""
    if gw.catalog.research_free_daily_nanos and (
            await gw.ledger.available(account_id, RESEARCH_FREE_BUCKET) >= reserve_nanos):
        return dataclasses.replace(route, bucket=RESEARCH_FREE_BUCKET)
    return route


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                           "x-request-id": request[REQUEST_ID]})
    await response.prepare(request)
    request[STREAM] = response
    return response


async def _event(stream: web.StreamResponse, name: str, data: Any) -> None:
    await stream.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")
