"""The catalog (SPEC §3): buckets, channels, models and their priced routes.

Loaded once from TOML into frozen objects the hot path reads without locks; a
reload builds a new Catalog and swaps the reference. Validation is strict:
every problem names the file, the entry and what is wrong.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .money import parse_price, usd_to_nanos

FAILURE_CLASSES = frozenset({"timeout", "connect", "5xx", "429"})
ON_FAILURE = frozenset({"free", "charge_delivered"})
MODEL_TYPES = frozenset({"chat", "embedding"})
BUCKET_KINDS = frozenset({"prepaid", "pool"})
#: the pool every account has for the free research allowance ([research] in the catalog)
RESEARCH_FREE_BUCKET = "research-free"
#: the route kind that charges a pool (SPEC §1)
SUBSCRIPTION_ROUTE_KIND = "subscription"


class CatalogError(ValueError):
    """A catalog that cannot be served; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Bucket:
    id: str
    name: str
    kind: str = "prepaid"  # "pool": funded by a schedule (grant / expiry), never by top-ups


@dataclass(frozen=True, slots=True)
class Channel:
    id: str
    kind: str
    base_url: str
    api_key_env: str | None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float | None = None
    max_concurrency: int = 256
    anthropic_version: str | None = None  # kind "anthropic" only
    #: the client APIs this channel serves natively (SPEC §1 "native first"): "chat" and "responses" for
    #: kind "openai", "messages" for kind "anthropic"; a request in another API is translated
    apis: frozenset[str] = frozenset({"chat"})

    def speaks(self, api: str) -> bool:
        return api in self.apis


@dataclass(frozen=True, slots=True)
class ChannelRef:
    channel: str
    upstream_model: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    retry_on: frozenset[str] = FAILURE_CLASSES
    backoff_ms: int = 50

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "retry_on": sorted(self.retry_on),
            "backoff_ms": self.backoff_ms,
        }


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    kind: str
    bucket: str
    input_price: Decimal
    output_price: Decimal
    channels: tuple[ChannelRef, ...]
    retry: RetryPolicy = RetryPolicy()
    on_failure: str = "free"
    model_id: str = ""
    #: the cache-class prices as the catalog gave them (USD per 1M tokens); None: the route does not price
    #: that class, so it is billed at the input price (SPEC §1: never nothing). Read the resolved
    #: `cache_read_price` etc.; these say which were set (for /v1/models and the quote)
    cache_read_price_per_mtok: Decimal | None = None
    cache_write_price_per_mtok: Decimal | None = None  # 5-minute cache writes
    cache_write_1h_price_per_mtok: Decimal | None = None

    @property
    def cache_read_price(self) -> Decimal:
        return self.input_price if self.cache_read_price_per_mtok is None else self.cache_read_price_per_mtok

    @property
    def cache_write_price(self) -> Decimal:
        return self.input_price if self.cache_write_price_per_mtok is None else self.cache_write_price_per_mtok

    @property
    def cache_write_1h_price(self) -> Decimal:
        price = self.cache_write_1h_price_per_mtok
        return self.input_price if price is None else price

    @property
    def primary(self) -> ChannelRef:
        return self.channels[0]

    @property
    def backups(self) -> tuple[ChannelRef, ...]:
        return self.channels[1:]


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    routes: tuple[Route, ...]
    max_output_tokens: int = 4096
    type: str = "chat"
    owned_by: str = "tokensforge"

    def route(self, route_id_or_kind: str) -> Route | None:
        for route in self.routes:
            if route.id == route_id_or_kind:
                return route
        for route in self.routes:
            if route.kind == route_id_or_kind:
                return route
        return None


@dataclass(frozen=True)
class Catalog:
    source: str
    buckets: Mapping[str, Bucket]
    channels: Mapping[str, Channel]
    models: Mapping[str, Model]
    routes: Mapping[str, Route] = field(default_factory=dict)
    #: every account's daily free research allowance (bucket "research-free"); 0 turns it off
    research_free_daily_nanos: int = 0

    def bucket_kind(self, bucket_id: str) -> str:
        bucket = self.buckets.get(bucket_id)
        return bucket.kind if bucket is not None else "prepaid"


_TOP_KEYS = {"buckets", "channels", "models", "research"}
_BUCKET_KEYS = {"id", "name", "kind"}
_RESEARCH_KEYS = {"free_daily_allowance_usd"}
_CHANNEL_KEYS = {
    "id", "kind", "base_url", "api_key_env", "timeout_s", "connect_timeout_s",
    "first_byte_timeout_s", "max_concurrency", "anthropic_version", "apis",
}
#: the client APIs a channel kind can serve natively, and what it serves when `apis` is not given
CHANNEL_APIS = {"openai": frozenset({"chat", "responses"}), "anthropic": frozenset({"messages"})}
DEFAULT_APIS = {"openai": frozenset({"chat"}), "anthropic": frozenset({"messages"})}
CHANNEL_KINDS = frozenset({"openai", "anthropic"})
_MODEL_KEYS = {"id", "max_output_tokens", "routes", "type", "owned_by"}
#: the optional per-class prices of a route (SPEC §3); an absent one is the input price
CACHE_PRICE_KEYS = ("cache_read_price_per_mtok", "cache_write_price_per_mtok", "cache_write_1h_price_per_mtok")
_ROUTE_KEYS = {
    "id", "kind", "bucket", "input_price_per_mtok", "output_price_per_mtok",
    "channels", "retry", "on_failure", *CACHE_PRICE_KEYS,
}
_REF_KEYS = {"channel", "upstream_model"}
_RETRY_KEYS = {"max_attempts", "retry_on", "backoff_ms"}


class _Checker:
    """Collects the context (file and entry) every error message carries."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, entry: str, problem: str) -> CatalogError:
        return CatalogError(f"{self.source}: {entry}: {problem}")

    def table(self, value: Any, entry: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(entry, "must be a table")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(entry, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
        return value

    def text(self, table: dict[str, Any], key: str, entry: str, default: str | None = None) -> str:
        value = table.get(key, default)
        if value is None:
            raise self.fail(entry, f"missing {key!r}")
        if not isinstance(value, str) or not value.strip():
            raise self.fail(entry, f"{key!r} must be a non-empty string")
        return value

    def number(self, table: dict[str, Any], key: str, entry: str, default: float, *, integer: bool = False) -> Any:
        value = table.get(key, default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            raise self.fail(entry, f"{key!r} must be a positive {'integer' if integer else 'number'}")
        return value

    def entries(self, data: dict[str, Any], key: str) -> list[Any]:
        value = data.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, "must be an array of tables")
        return value

    def unique(self, seen: set[str], ident: str, entry: str) -> None:
        if ident in seen:
            raise self.fail(entry, f"duplicate id {ident!r}")
        seen.add(ident)


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: invalid TOML: {exc}") from None
    return parse_catalog(data, str(path))


def parse_catalog(data: dict[str, Any], source: str = "<catalog>") -> Catalog:
    check = _Checker(source)
    check.table(data, "catalog", _TOP_KEYS)
    buckets = _parse_buckets(check, data)
    free_daily_nanos = _parse_research(check, data)
    if free_daily_nanos:
        buckets[RESEARCH_FREE_BUCKET] = Bucket(RESEARCH_FREE_BUCKET, "Free research allowance", "pool")
    channels = _parse_channels(check, data)
    models: dict[str, Model] = {}
    routes: dict[str, Route] = {}
    for i, raw in enumerate(check.entries(data, "models")):
        model = _parse_model(check, raw, i, buckets, channels, routes)
        check.unique(set(models), model.id, f"models[{i}]")
        models[model.id] = model
    if not models:
        raise check.fail("models", "the catalog defines no model")
    return Catalog(source, buckets, channels, models, routes, free_daily_nanos)


def _parse_research(check: _Checker, data: dict[str, Any]) -> int:
    table = check.table(data.get("research", {}), "research", _RESEARCH_KEYS)
    raw = table.get("free_daily_allowance_usd", "0")
    if not isinstance(raw, str):
        raise check.fail("research", "'free_daily_allowance_usd' must be a decimal string like \"0.05\"")
    try:
        nanos = usd_to_nanos(raw)
    except ValueError as exc:
        raise check.fail("research", f"'free_daily_allowance_usd': {exc}") from None
    if nanos < 0:
        raise check.fail("research", "'free_daily_allowance_usd' must not be negative")
    return nanos


def _parse_buckets(check: _Checker, data: dict[str, Any]) -> dict[str, Bucket]:
    buckets: dict[str, Bucket] = {}
    for i, raw in enumerate(check.entries(data, "buckets")):
        entry = f"buckets[{i}]"
        table = check.table(raw, entry, _BUCKET_KEYS)
        ident = check.text(table, "id", entry)
        check.unique(set(buckets), ident, f"bucket {ident!r}")
        if ident == RESEARCH_FREE_BUCKET:
            raise check.fail(f"bucket {ident!r}", "this id is reserved for the free research allowance "
                             "(set [research] free_daily_allowance_usd instead)")
        kind = check.text(table, "kind", f"bucket {ident!r}", default="prepaid")
        if kind not in BUCKET_KINDS:
            raise check.fail(f"bucket {ident!r}", f"'kind' must be one of {sorted(BUCKET_KINDS)}")
        buckets[ident] = Bucket(ident, check.text(table, "name", f"bucket {ident!r}", default=ident), kind)
    if not buckets:
        raise check.fail("buckets", "the catalog defines no bucket")
    return buckets


def _parse_channels(check: _Checker, data: dict[str, Any]) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    for i, raw in enumerate(check.entries(data, "channels")):
        table = check.table(raw, f"channels[{i}]", _CHANNEL_KEYS)
        ident = check.text(table, "id", f"channels[{i}]")
        entry = f"channel {ident!r}"
        check.unique(set(channels), ident, entry)
        base_url = check.text(table, "base_url", entry)
        if not base_url.startswith(("http://", "https://")):
            raise check.fail(entry, "'base_url' must start with http:// or https://")
        api_key_env = table.get("api_key_env")
        if api_key_env is not None:
            api_key_env = check.text(table, "api_key_env", entry)
        first_byte = table.get("first_byte_timeout_s")
        kind = check.text(table, "kind", entry, default="openai")
        if kind not in CHANNEL_KINDS:
            raise check.fail(entry, f"'kind' must be one of {sorted(CHANNEL_KINDS)}")
        version = table.get("anthropic_version")
        if version is not None:
            version = check.text(table, "anthropic_version", entry)
        apis = _channel_apis(check, table, kind, entry)
        channels[ident] = Channel(
            apis=apis,
            id=ident,
            kind=kind,
            anthropic_version=version,
            base_url=base_url.rstrip("/"),
            api_key_env=api_key_env,
            timeout_s=float(check.number(table, "timeout_s", entry, 60.0)),
            connect_timeout_s=float(check.number(table, "connect_timeout_s", entry, 5.0)),
            first_byte_timeout_s=None if first_byte is None
            else float(check.number(table, "first_byte_timeout_s", entry, 1.0)),
            max_concurrency=check.number(table, "max_concurrency", entry, 256, integer=True),
        )
    if not channels:
        raise check.fail("channels", "the catalog defines no channel")
    return channels


def _channel_apis(check: _Checker, table: dict[str, Any], kind: str, entry: str) -> frozenset[str]:
    raw = table.get("apis")
    if raw is None:
        return DEFAULT_APIS[kind]
    allowed = CHANNEL_APIS[kind]
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
        raise check.fail(entry, f"'apis' must be a non-empty list of API names ({sorted(allowed)})")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise check.fail(entry, f"'apis' names {unknown}: a {kind}-kind channel serves {sorted(allowed)}")
    return frozenset(raw)


def _parse_model(
    check: _Checker, raw: Any, index: int, buckets: Mapping[str, Bucket],
    channels: Mapping[str, Channel], all_routes: dict[str, Route],
) -> Model:
    table = check.table(raw, f"models[{index}]", _MODEL_KEYS)
    ident = check.text(table, "id", f"models[{index}]")
    entry = f"model {ident!r}"
    model_type = check.text(table, "type", entry, default="chat")
    if model_type not in MODEL_TYPES:
        raise check.fail(entry, f"'type' must be one of {sorted(MODEL_TYPES)}")
    raw_routes = table.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise check.fail(entry, "has no routes")
    routes = []
    for i, raw_route in enumerate(raw_routes):
        route = _parse_route(check, raw_route, f"{entry} routes[{i}]", ident, buckets, channels)
        check.unique(set(all_routes), route.id, f"route {route.id!r}")
        all_routes[route.id] = route
        routes.append(route)
    if model_type == "embedding":
        for route in routes:
            for ref in route.channels:
                if channels[ref.channel].kind != "openai":
                    raise check.fail(f"route {route.id!r}", f"channel {ref.channel!r} cannot serve embeddings "
                                     "(only kind \"openai\" channels can)")
    return Model(
        id=ident,
        routes=tuple(routes),
        max_output_tokens=check.number(table, "max_output_tokens", entry, 4096, integer=True),
        type=model_type,
        owned_by=check.text(table, "owned_by", entry, default="tokensforge"),
    )


def _parse_route(
    check: _Checker, raw: Any, where: str, model_id: str,
    buckets: Mapping[str, Bucket], channels: Mapping[str, Channel],
) -> Route:
    table = check.table(raw, where, _ROUTE_KEYS)
    ident = check.text(table, "id", where)
    entry = f"route {ident!r}"
    bucket = check.text(table, "bucket", entry)
    kind = check.text(table, "kind", entry)
    _check_route_bucket(check, entry, kind, bucket, buckets)
    input_price = _price(check, table, "input_price_per_mtok", entry)
    output_price = _price(check, table, "output_price_per_mtok", entry)
    cache = {key: _price(check, table, key, entry) if key in table else None for key in CACHE_PRICE_KEYS}
    on_failure = check.text(table, "on_failure", entry, default="free")
    if on_failure not in ON_FAILURE:
        raise check.fail(entry, f"'on_failure' must be one of {sorted(ON_FAILURE)}")
    return Route(
        id=ident,
        kind=kind,
        bucket=bucket,
        input_price=input_price,
        output_price=output_price,
        cache_read_price_per_mtok=cache["cache_read_price_per_mtok"],
        cache_write_price_per_mtok=cache["cache_write_price_per_mtok"],
        cache_write_1h_price_per_mtok=cache["cache_write_1h_price_per_mtok"],
        channels=_parse_refs(check, table.get("channels"), entry, channels),
        retry=_parse_retry(check, table.get("retry", {}), entry),
        on_failure=on_failure,
        model_id=model_id,
    )


def _price(check: _Checker, table: dict[str, Any], key: str, entry: str) -> Decimal:
    """One exact USD-per-1M-tokens price of a route (negative or float: refused, naming the key)."""
    if key not in table:
        raise check.fail(entry, f"missing {key!r}")
    try:
        return parse_price(table[key])
    except ValueError as exc:
        raise check.fail(entry, f"{key!r}: {exc}") from None


def _check_route_bucket(check: _Checker, entry: str, kind: str, bucket: str, buckets: Mapping[str, Bucket]) -> None:
    """A subscription route charges a pool, and only subscription routes charge pools (SPEC §1, §5.8)."""
    if bucket == RESEARCH_FREE_BUCKET:
        raise check.fail(entry, f"bucket {bucket!r} is the free research allowance: only the research "
                         "assistant may spend it")
    if bucket not in buckets:
        raise check.fail(entry, f"unknown bucket {bucket!r}")
    pool = buckets[bucket].kind == "pool"
    if kind == SUBSCRIPTION_ROUTE_KIND and not pool:
        raise check.fail(entry, f"a route of kind {kind!r} must charge a pool bucket; {bucket!r} is "
                         f"{buckets[bucket].kind!r}")
    if pool and kind != SUBSCRIPTION_ROUTE_KIND:
        raise check.fail(entry, f"pool bucket {bucket!r} may only be charged by routes of kind "
                         f"{SUBSCRIPTION_ROUTE_KIND!r}, not {kind!r}")


def _parse_refs(check: _Checker, raw: Any, entry: str, channels: Mapping[str, Channel]) -> tuple[ChannelRef, ...]:
    if not isinstance(raw, list) or not raw:
        raise check.fail(entry, "has no channels")
    refs = []
    for i, item in enumerate(raw):
        where = f"{entry} channels[{i}]"
        table = check.table(item, where, _REF_KEYS)
        channel = check.text(table, "channel", where)
        if channel not in channels:
            raise check.fail(entry, f"unknown channel {channel!r}")
        refs.append(ChannelRef(channel, check.text(table, "upstream_model", where)))
    return tuple(refs)


def _parse_retry(check: _Checker, raw: Any, entry: str) -> RetryPolicy:
    where = f"{entry} retry"
    table = check.table(raw, where, _RETRY_KEYS)
    retry_on = table.get("retry_on", sorted(FAILURE_CLASSES))
    if not isinstance(retry_on, list) or not all(isinstance(c, str) and c in FAILURE_CLASSES for c in retry_on):
        raise check.fail(where, f"'retry_on' must be a list drawn from {sorted(FAILURE_CLASSES)}")
    backoff = table.get("backoff_ms", 50)
    if isinstance(backoff, bool) or not isinstance(backoff, int) or backoff < 0:
        raise check.fail(where, "'backoff_ms' must be a non-negative integer")
    return RetryPolicy(
        max_attempts=check.number(table, "max_attempts", where, 3, integer=True),
        retry_on=frozenset(retry_on),
        backoff_ms=backoff,
    )
