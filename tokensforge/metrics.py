"""Prometheus metric families (SPEC §2 names and labels; never account or key ids)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from .canonical import Usage

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LEDGER_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

REQUESTS = Counter(
    "tokensforge_requests", "Client requests by outcome.", ["model", "route_kind", "bucket", "status"])
REQUEST_DURATION = Histogram(
    "tokensforge_request_duration_seconds", "Whole request time.", ["route_kind"], buckets=_LATENCY_BUCKETS)
UPSTREAM_ATTEMPTS = Counter(
    "tokensforge_upstream_attempts", "Upstream attempts by channel and outcome.", ["channel", "outcome"])
UPSTREAM_LATENCY = Histogram(
    "tokensforge_upstream_latency_seconds", "Upstream time to headers.", ["channel"], buckets=_LATENCY_BUCKETS)
FALLBACKS = Counter("tokensforge_fallbacks", "Fallbacks taken (channel or route).", ["kind"])
SPEND = Counter("tokensforge_spend_nanos", "Charged nano-USD.", ["bucket", "route_kind"])
UNDERCHARGED = Counter(
    "tokensforge_undercharged_nanos", "Price of usage beyond the reservation, not charged (the cap held).",
    ["route_kind"])
TOKENS = Counter("tokensforge_tokens", "Tokens billed.", ["direction", "route_kind"])
CLASS_TOKENS = Counter(
    "tokensforge_class_tokens", "Tokens billed by token class (input = fresh input, cache_read, cache_write,"
    " cache_write_1h, output): each class has its own price.", ["token_class", "route_kind"])
CHANNEL_UP = Gauge(
    "tokensforge_channel_up", "1 when the channel's circuit is not open.", ["channel"], multiprocess_mode="livemax")
CIRCUIT_STATE = Gauge(
    "tokensforge_circuit_state", "0 closed, 1 half-open, 2 open.", ["channel"], multiprocess_mode="livemax")
RESERVATIONS_INFLIGHT = Gauge(
    "tokensforge_reservations_inflight", "Open reservations held by this process.", multiprocess_mode="livesum")
HOLDS = Counter("tokensforge_holds", "Requests' money holds, by where they came from: carved from this process's"
                " lease (no database round trip) or a per-request reservation.", ["kind"])
LEASE_GRANTS = Counter("tokensforge_lease_grants", "Lease take/grow answers by outcome (ok, small, stale,"
                       " insufficient_balance, budget_exceeded, pool).", ["outcome"])
LEASED = Gauge("tokensforge_leased_nanos", "Nano-USD held in this process's leases.", multiprocess_mode="livesum")
LEASE_REFUSALS = Counter("tokensforge_lease_refusals", "Requests refused for money or budget after this process"
                         " returned its own lease and asked the database again.")
LEDGER_OP_DURATION = Histogram(
    "tokensforge_ledger_op_duration_seconds", "Ledger database operation time.", ["op"], buckets=_LEDGER_BUCKETS)
DATABASE_UP = Gauge(
    "tokensforge_database_up", "1 when this process reaches the ledger database.", multiprocess_mode="livemin")
DATABASE_PRIMARY = Gauge(
    "tokensforge_database_primary", "1 for the database host (host:port) this process writes to: the primary it"
    " found last (a multi-host TOKENSFORGE_DATABASE_URL follows a promotion).", ["host"], multiprocess_mode="livemax")
DATABASE_WITHOUT_PRIMARY = Gauge(
    "tokensforge_database_without_primary_seconds", "Seconds this process has gone without a primary so far"
    " (0 while it reaches one).", multiprocess_mode="livemax")
DATABASE_LAST_OUTAGE = Gauge(
    "tokensforge_database_last_outage_seconds", "How long this process's last spell without a primary lasted"
    " (a failover's recovery time, as the gateway saw it).", multiprocess_mode="livemax")
DATABASE_PRIMARY_CHANGES = Counter(
    "tokensforge_database_primary_changes", "Times this process found the primary on another host than before"
    " (a failover or switchover).")
KEY_LOOKUPS = Counter(
    "tokensforge_key_lookups", "API key lookups that missed the in-memory cache, by who answered: the database"
    " or the unknown-key cache (a flood of bad keys shows here).", ["source"])

RATE_LEASES = Counter(
    "tokensforge_rate_leases", "Rate-permit takes from the shared budget, by result: granted, exhausted (the"
    " window is used up) or unavailable (the database did not answer).", ["result"])
RATE_LOCAL_ADMISSIONS = Counter(
    "tokensforge_rate_local_admissions", "Rate-limited requests decided by this process's own window alone,"
    " because the shared budget's database was unreachable.")
CIRCUIT_NOTICES = Counter(
    "tokensforge_circuit_notices", "Circuit openings shared between processes: sent (this process's breaker"
    " opened) and applied (a peer's opening opened this process's breaker).", ["direction"])


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, memoised: the hot path skips prometheus_client's lock and lookup."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def count_classes(usage: Usage, route_kind: str) -> None:
    """Count billed tokens per class (classes with no tokens are skipped)."""
    for token_class, tokens in (("input", max(usage.fresh_input_tokens, 0)), ("cache_read", usage.cache_read_tokens),
                                ("cache_write", usage.cache_write_tokens),
                                ("cache_write_1h", usage.cache_write_1h_tokens),
                                ("output", usage.completion_tokens)):
        if tokens:
            child(CLASS_TOKENS, token_class, route_kind).inc(tokens)
