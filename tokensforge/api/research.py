"""The research assistant over the gateway's own billed route (SPEC §7).

`POST /v1/research/reports` writes a report section by section (each section one billed
request) and keeps it as it goes (`research_store`); `GET /v1/research/reports` and
`GET /v1/research/reports/{id}` read the kept reports back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from typing import Any

import orjson
from aiohttp import web

from ..accounts import KeyIdentity
from ..catalog import RESEARCH_FREE_BUCKET, Model, Route
from ..canonical import Request
from ..dialects import openai_chat
from ..exchange import ModelExchange
from ..errors import InsufficientBalance, InvalidRequest, LedgerUnavailable, NotFound, TokensForgeError
from ..ledger.model import parse_cursor
from ..ledger.pools import PoolStore
from ..lifecycle import Lifecycle, shielded
from ..policy import EffectivePolicy
from ..pricing import size_request
from ..research import (
    ResearchRequest,
    estimate_section_body,
    estimate_view,
    parse_request,
    report_list_item,
    report_markdown,
    report_view,
    section_body,
)
from ..research_store import NewReport, ReportStore, section_request_id
from ..routing import find_model, select_route
from ..state import Gateway
from .auth import authenticate
from .client import admit_model_request
from .common import REQUEST_ID, STREAM, json_response, path_param, query_limit, query_text, read_json

log = logging.getLogger("tokensforge.research")
routes = web.RouteTableDef()


class ChargeCapTooLow(InsufficientBalance):
    """402 like a short bucket: the caller's own cap cannot pay for the first section."""

    def __init__(self, bucket: str, needed_nanos: int, cap_nanos: int) -> None:
        super().__init__(bucket, needed_nanos, cap_nanos)
        self.message = f"max_charge_nanos {cap_nanos} cannot cover the first section ({needed_nanos} nano-USD)"
        self.extra["max_charge_nanos"] = cap_nanos


class _ClientGone(Exception):
    """A streamed run's client disconnected (a write failed)."""


@routes.post("/v1/research/reports")
async def create_report(request: web.Request) -> web.StreamResponse:
    gw, identity, policy = await authenticate(request)
    req = parse_request(await read_json(request))
    pin = request.headers.get("x-tokensforge-route") or req.route
    model = find_model(gw.catalog, req.model)
    if model.type != "chat":
        raise InvalidRequest(f"model {model.id!r} is not a chat model", param="model")
    route = select_route(model, policy, pin)
    # each section at its largest prompt (the earlier sections at their longest excerpt)
    reserves = [size_request(openai_chat.decode(estimate_section_body(req, i)), model, route).amount_nanos
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
    run = _Run(gw, identity, policy, request, req, model, route, pinned=pin is not None)
    try:
        await run.start(balance_before, estimate)
        status = await run.write_sections(reserves)
    except _ClientGone:
        status = "interrupted"
    except asyncio.CancelledError:  # the client left a run (aiohttp cancels the handler): keep the report
        await shielded(run.finish("interrupted"))
        raise
    except BaseException:
        await shielded(run.finish("failed"))
        raise
    report = await shielded(run.finish(status))
    if run.stream is None:
        return json_response(report, headers={"x-tokensforge-report-id": run.report_id})
    if status != "interrupted":
        await _write_quietly(run.stream, "report_completed", report)
    return run.stream


class _Run:
    """One report being written: its stored row, the stream (if any) and the sections so far."""

    def __init__(self, gw: Gateway, identity: KeyIdentity, policy: EffectivePolicy, request: web.Request,
                 req: ResearchRequest, model: Model, route: Route, *, pinned: bool) -> None:
        self.gw, self.identity, self.policy = gw, identity, policy
        self.request, self.req, self.model, self.route, self.pinned = request, req, model, route, pinned
        self.report_id = "rep_" + secrets.token_hex(8)
        self.request_id = request[REQUEST_ID]
        self.store = ReportStore(gw.pool)
        self.stream: web.StreamResponse | None = None
        self.row: dict[str, Any] = {}
        self.sections: list[dict[str, Any]] = []  # as stored: title, content, receipt, error
        self.started: list[tuple[int, str, str]] = []  # (position, title, request id) of every section begun

    async def start(self, balance_before_nanos: int, estimate: dict[str, Any]) -> None:
        """Store the report (status "running") before anything is charged; open the stream."""
        req, route = self.req, self.route
        row = await shielded(self.store.create(NewReport(
            self.report_id, self.identity.account_id, self.identity.project_id, self.identity.key_id,
            self.request_id, req.topic, self.model.id, route.id, route.kind, route.bucket, req.context,
            req.sections, req.max_charge_nanos, balance_before_nanos)))
        self.row = dict(row)
        if req.stream:
            self.stream = web.StreamResponse(headers={
                "content-type": "text/event-stream", "cache-control": "no-cache",
                "x-request-id": self.request_id, "x-tokensforge-report-id": self.report_id})
            try:
                await self.stream.prepare(self.request)
            except ConnectionError:
                raise _ClientGone() from None
            self.request[STREAM] = self.stream
            await self._event("estimate", {**estimate, "report_id": self.report_id})

    async def write_sections(self, reserves: list[int]) -> str:
        """Write the sections in order; the report's status. Stops before a section that could pass the
        cap, and at the first section that fails."""
        total = 0
        for index, title in enumerate(self.req.sections):
            if total + reserves[index] > self.req.max_charge_nanos:
                return "stopped_at_cap"
            await self._event("section_started", {"report_id": self.report_id, "index": index, "title": title})
            section = await self._section(index, title)
            if section["receipt"] is None:
                await self._event("section_failed", {"report_id": self.report_id, "index": index, **section})
                return "failed"
            total += section["receipt"]["charge_nanos"]
            await self._event("section_completed", {"report_id": self.report_id, "index": index,
                                                    "title": title, "content": section["content"],
                                                    "receipt": section["receipt"]})
        return "completed"

    async def _section(self, index: int, title: str) -> dict[str, Any]:
        """One billed request, paid from the free research allowance while it covers this section's
        reservation; recorded in the report whatever its outcome."""
        request_id = section_request_id(self.request_id, index)
        self.started.append((index, title, request_id))
        earlier = [(s["title"], s["content"]) for s in self.sections if s["content"] is not None]
        body = openai_chat.decode(section_body(self.req, index, earlier))
        reserve = size_request(body, self.model, self.route).amount_nanos  # what the lifecycle will hold
        payer = await _payer(self.gw, self.identity.account_id, self.route, reserve)
        section: dict[str, Any] = {"title": title, "content": None, "receipt": None, "error": None}
        try:
            async with Lifecycle(self.gw, self.identity, self.policy, request_id, "research.section") as life:
                exchange = await self._admit(life, payer, body)
                answer = await life.call(exchange)
                receipt = await life.succeed(answer)
            section.update(content=answer.output_text, receipt=receipt)
        except TokensForgeError as exc:  # refused or failed: recorded and voided by the lifecycle
            section["error"] = exc.body()["error"]
        self.sections.append(section)
        try:
            await shielded(self.store.add_section(self.report_id, index, title, request_id, section["content"],
                                                  section["receipt"], section["error"]))
        except LedgerUnavailable:  # `finish` recovers a charged section from its usage record
            log.warning("report %s: section %d could not be stored", self.report_id, index + 1)
        return section

    async def _admit(self, life: Lifecycle, payer: Route, body: Request) -> ModelExchange:
        """Hold the section's money. The free allowance may be taken by another run between `_payer`'s
        look and this hold: then the route's own bucket pays the section (SPEC §7: one request, one
        bucket), rather than the report failing for money it never asked the free pool to guarantee."""
        life.begin(self.model, payer, pinned=self.pinned)
        try:
            return await admit_model_request(life, self.model, payer, body)
        except InsufficientBalance as exc:
            if payer is self.route or exc.extra.get("bucket") != RESEARCH_FREE_BUCKET:
                raise
        log.info("report %s: the free allowance was spent meanwhile; %r pays this section",
                 self.report_id, self.route.bucket)
        life.begin(self.model, self.route, pinned=self.pinned)
        return await admit_model_request(life, self.model, self.route, body)

    async def finish(self, status: str) -> dict[str, Any]:
        """Store the final status and totals; the report as stored (as held in memory if the
        database is away: the sections were charged, so the answer is not an error)."""
        if not self.row:  # the run never started: nothing was stored or charged
            return {}
        try:
            row, sections = await self.store.finish(self.report_id, status, self.started)
            return report_view(row, sections)
        except LedgerUnavailable:
            log.warning("report %s: its end (%s) could not be stored", self.report_id, status)
        total = sum(s["receipt"]["charge_nanos"] for s in self.sections if s["receipt"] is not None)
        balance_after = self.row["balance_before_nanos"] - total
        return report_view({**self.row, "status": status, "total_charge_nanos": total,
                            "balance_after_nanos": balance_after}, self.sections)

    async def _event(self, name: str, data: Any) -> None:
        if self.stream is None:
            return
        try:
            await self.stream.write(_sse(name, data))
        except ConnectionError:
            raise _ClientGone() from None


def _sse(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _write_quietly(stream: web.StreamResponse, name: str, data: Any) -> None:
    """The last event of a run whose report is already stored: a client that left misses only it."""
    try:
        await stream.write(_sse(name, data))
        await stream.write_eof()
    except ConnectionError:
        log.info("the end of a research stream did not reach its client")


# ---------------------------------------------------------------------- reading kept reports


@routes.get("/v1/research/reports")
async def list_reports(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    limit = query_limit(request)
    try:
        after = parse_cursor(request.query.get("after"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="after") from None
    rows = await ReportStore(gw.pool).page(identity.account_id, limit=limit + 1, after=after,
                                          project_id=identity.project_id)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"object": "list", "data": [report_list_item(r) for r in rows], "has_more": more,
                          "next_cursor": str(rows[-1]["seq"]) if more else None})


@routes.get("/v1/research/reports/{report_id}")
async def get_report(request: web.Request) -> web.Response:
    gw, identity, _ = await authenticate(request)
    report_id = path_param(request, "report_id")
    fmt = query_text(request, "format") or "json"
    if fmt not in ("json", "markdown"):
        raise InvalidRequest("'format' must be 'json' or 'markdown'", param="format")
    found = await ReportStore(gw.pool).get(identity.account_id, report_id, identity.project_id)
    if found is None:
        raise NotFound(f"no research report {report_id!r} in this "
                       + ("project" if identity.project_id else "account"), param="id")
    report = report_view(*found)
    if fmt == "json":
        return json_response(report)
    return web.Response(text=report_markdown(report), content_type="text/markdown", charset="utf-8",
                        headers={"content-disposition": f'attachment; filename="research-{report["id"]}.md"'})


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
