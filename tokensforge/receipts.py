"""Receipts (SPEC §2): what one request did, told the same way everywhere.

A `Trace` is filled in while the request runs; `build_receipt` turns it into
the JSON document that goes to the client, into the usage record, and (with
the ledger entry id and balance the database adds) to /v1/receipts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .catalog import Route
from .money import usd
from .pricing import Usage, class_rates, cost_lines


@dataclass(slots=True)
class Attempt:
    channel: str
    outcome: str  # ok | timeout | connect | 5xx | 429 | 4xx | malformed | stream_cut | skipped
    status: int | None = None
    latency_ms: int = 0
    route: str | None = None
    skipped: str | None = None  # "circuit_open"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "channel": self.channel, "outcome": self.outcome, "status": self.status, "latency_ms": self.latency_ms}
        if self.route is not None:
            out["route"] = self.route
        if self.skipped is not None:
            out["skipped"] = self.skipped
        return out


@dataclass(slots=True)
class Trace:
    request_id: str
    account_id: str
    project_id: str | None
    key_id: str
    selected_model: str | None = None
    route: Route | None = None
    original_route: Route | None = None  # set when a cross-route fallback moved the request
    upstream_model: str | None = None
    served_by: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    status: str = "failed"
    usage: Usage | None = None
    usage_source: str | None = None
    #: what was charged for, when anything was: the usage itself, or less for a failed or abandoned stream
    #: (set once settlement decides it; the receipt's cost_lines are built from it)
    billed: Usage | None = None
    reserved_nanos: int = 0
    charge_nanos: int = 0
    price_nanos: int = 0
    ledger_entry_id: str | None = None
    balance_after_nanos: int | None = None
    latency_ms: int | None = None
    error: dict[str, Any] | None = None
    endpoint: str = "chat.completions"
    notes: list[str] = field(default_factory=list)  # request fields the upstream could not take ("dropped: …")
    bucket_kind: str = "prepaid"  # "pool": funded by a schedule
    pool_period_end: str | None = None  # iso8601: the pool period the reservation was held in
    upstream_began: bool = False  # an upstream answered (status line): a client leaving now pays the input
    relay: str | None = None  # "native" (the channel speaks the client's API) | "translated"

    @property
    def fallback_kind(self) -> str:
        if self.original_route is not None:
            return "route"
        tried = [a.channel for a in self.attempts if a.skipped is None]
        return "channel" if self.served_by is not None and tried and tried[0] != self.served_by else "none"


def build_receipt(t: Trace) -> dict[str, Any]:
    route = t.route
    texts = class_rates(route) if route else None
    fallback_kind = t.fallback_kind
    receipt: dict[str, Any] = {
        "object": "receipt",
        "request_id": t.request_id,
        "status": t.status,
        "endpoint": t.endpoint,
        "selected_model": t.selected_model,
        "upstream_model": t.upstream_model,
        "route": {"id": route.id, "kind": route.kind} if route else None,
        "bucket": route.bucket if route else None,
        "bucket_kind": t.bucket_kind if route else None,
        "pool_period_end": t.pool_period_end,
        "price": dict(texts.price) if texts else None,
        "account_id": t.account_id,
        "project_id": t.project_id,
        "key_id": t.key_id,
        "channels": {
            "primary": route.primary.channel,
            "backups": list(texts.backups),
            "served_by": t.served_by,
        } if route and texts else None,
        "attempts": [a.as_dict() for a in t.attempts],
        "fallback": {
            "used": fallback_kind != "none",
            "cross_route": t.original_route is not None,
            "from_route": t.original_route.id if t.original_route else None,
        },
        "on_failure": route.on_failure if route else None,
        "relay": t.relay,
        "usage": t.usage.as_dict() if t.usage else None,
        "usage_source": t.usage_source,
        "cost_lines": cost_lines(t.billed, route) if t.billed is not None and route else [],
        "reserved_nanos": t.reserved_nanos,
        "charge_nanos": t.charge_nanos,
        "charge_usd": usd(t.charge_nanos),
        "price_nanos": t.price_nanos,
        "ledger_entry_id": t.ledger_entry_id,
        "balance_after_nanos": t.balance_after_nanos,
        "latency_ms": t.latency_ms,
    }
    if t.error is not None:
        receipt["error"] = t.error
    if t.notes:
        receipt["notes"] = list(t.notes)
    return receipt


def finish_receipt(receipt: dict[str, Any], ledger_entry_id: str | None, balance_after_nanos: int | None) -> None:
    """Add what only the database knows once the money moved."""
    receipt["ledger_entry_id"] = ledger_entry_id
    receipt["balance_after_nanos"] = balance_after_nanos


#: Prefixes of the ids the gateway gives its answers, derived from the request id ("req_<hex>"), so a
#: client that keeps only a response id can still find its receipt at /v1/receipts/{id}.
ANSWER_ID_PREFIXES = ("chatcmpl-", "resp_", "msg_")


def answer_id(request_id: str, prefix: str) -> str:
    """The id of a chat completion, Responses object or Message: `chatcmpl-<hex>`, `resp_<hex>`, `msg_<hex>`."""
    return prefix + request_id.removeprefix("req_")


def request_id_of(any_id: str) -> str:
    """The request id behind an answer id (a request id is returned as it is)."""
    for prefix in ANSWER_ID_PREFIXES:
        if any_id.startswith(prefix):
            return "req_" + any_id[len(prefix):]
    return any_id
