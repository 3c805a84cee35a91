"""The catalog file (SPEC §3): a valid one loads exactly; every bad one is refused with file, entry, problem."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tokensforge.catalog import (
    FAILURE_CLASSES, Catalog, CatalogError, ChannelRef, RetryPolicy, load_catalog, parse_catalog,
)

SPEC_CATALOG = """
[[buckets]]
id = "credit"
name = "Official Credit"

[[buckets]]
id = "routed"
name = "Routed balance"

[[channels]]
id = "openai-direct"
kind = "openai"                 # any OpenAI-compatible HTTP API
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"  # the secret stays in the environment
timeout_s = 60
connect_timeout_s = 5
max_concurrency = 256

[[channels]]
id = "relay-a"
kind = "openai"
base_url = "http://127.0.0.1:9101/v1"
api_key_env = "RELAY_A_KEY"
{relay_b}
[[models]]
id = "gpt-4o-mini"
max_output_tokens = 16384

  [[models.routes]]
  id = "gpt-4o-mini/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.15"
  output_price_per_mtok = "0.60"
  channels = [{{ channel = "openai-direct", upstream_model = "gpt-4o-mini-2024-07-18" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 50 }}
  on_failure = "free"

  [[models.routes]]
  id = "gpt-4o-mini/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.06"
  output_price_per_mtok = "0.24"
  channels = [{{ channel = "relay-a", upstream_model = "gpt-4o-mini" }},
              {{ channel = "relay-b", upstream_model = "openai/gpt-4o-mini" }}]
  on_failure = "charge_delivered"

[[models]]
id = "text-embedding-3-small"
type = "embedding"

  [[models.routes]]
  id = "text-embedding-3-small/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.02"
  output_price_per_mtok = 0
  channels = [{{ channel = "openai-direct", upstream_model = "text-embedding-3-small" }}]
"""

RELAY_B = """
[[channels]]
id = "relay-b"
base_url = "http://127.0.0.1:9102/v1/"
"""


def _write(tmp_path: Path, text: str, name: str = "catalog.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- a valid catalog


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load_catalog(_write(tmp_path, SPEC_CATALOG.format(relay_b=RELAY_B)))


def test_valid_catalog_loads_buckets_channels_models(catalog: Catalog, tmp_path: Path) -> None:
    assert catalog.source == str(tmp_path / "catalog.toml")
    assert list(catalog.buckets) == ["credit", "routed"]
    assert catalog.buckets["credit"].name == "Official Credit"
    assert list(catalog.channels) == ["openai-direct", "relay-a", "relay-b"]
    assert list(catalog.models) == ["gpt-4o-mini", "text-embedding-3-small"]
    assert set(catalog.routes) == {
        "gpt-4o-mini/official", "gpt-4o-mini/routed", "text-embedding-3-small/official"}


def test_prices_are_exact_decimals(catalog: Catalog) -> None:
    official, routed = catalog.models["gpt-4o-mini"].routes
    for price in (official.input_price, official.output_price, routed.input_price, routed.output_price):
        assert type(price) is Decimal
    assert official.input_price == Decimal("0.15") and official.output_price == Decimal("0.60")
    assert routed.input_price == Decimal("0.06") and routed.output_price == Decimal("0.24")
    emb = catalog.models["text-embedding-3-small"].routes[0]
    assert emb.output_price == Decimal(0) and type(emb.output_price) is Decimal


def test_routes_keep_file_order_and_know_their_model(catalog: Catalog) -> None:
    model = catalog.models["gpt-4o-mini"]
    assert [r.id for r in model.routes] == ["gpt-4o-mini/official", "gpt-4o-mini/routed"]
    assert [r.kind for r in model.routes] == ["official", "routed"]
    assert [r.bucket for r in model.routes] == ["credit", "routed"]
    assert all(r.model_id == "gpt-4o-mini" for r in model.routes)
    assert catalog.routes["gpt-4o-mini/routed"] is model.routes[1]
    assert model.max_output_tokens == 16384 and model.type == "chat"


def test_primary_and_backups(catalog: Catalog) -> None:
    official, routed = catalog.models["gpt-4o-mini"].routes
    assert official.primary == ChannelRef("openai-direct", "gpt-4o-mini-2024-07-18")
    assert official.backups == ()
    assert routed.primary == ChannelRef("relay-a", "gpt-4o-mini")
    assert routed.backups == (ChannelRef("relay-b", "openai/gpt-4o-mini"),)


def test_retry_and_failure_policies(catalog: Catalog) -> None:
    official, routed = catalog.models["gpt-4o-mini"].routes
    assert official.retry == RetryPolicy(2, frozenset({"timeout", "connect", "5xx", "429"}), 50)
    assert official.on_failure == "free"
    assert routed.retry == RetryPolicy()  # defaults
    assert routed.retry.max_attempts == 3 and routed.retry.retry_on == FAILURE_CLASSES
    assert routed.on_failure == "charge_delivered"
    assert catalog.models["text-embedding-3-small"].routes[0].on_failure == "free"  # default
    assert official.retry.as_dict() == {
        "max_attempts": 2, "retry_on": ["429", "5xx", "connect", "timeout"], "backoff_ms": 50}


def test_channel_fields_and_defaults(catalog: Catalog) -> None:
    direct = catalog.channels["openai-direct"]
    assert direct.base_url == "https://api.openai.com/v1"
    assert direct.api_key_env == "OPENAI_API_KEY"
    assert (direct.timeout_s, direct.connect_timeout_s, direct.max_concurrency) == (60.0, 5.0, 256)
    relay_b = catalog.channels["relay-b"]
    assert relay_b.kind == "openai" and relay_b.api_key_env is None
    assert relay_b.base_url == "http://127.0.0.1:9102/v1"  # trailing slash stripped
    assert relay_b.timeout_s == 60.0 and relay_b.first_byte_timeout_s is None


def test_model_route_lookup_by_id_then_kind(catalog: Catalog) -> None:
    model = catalog.models["gpt-4o-mini"]
    assert model.route("gpt-4o-mini/routed") is model.routes[1]
    assert model.route("routed") is model.routes[1]
    assert model.route("official") is model.routes[0]
    assert model.route("backup") is None


def test_embedding_model(catalog: Catalog) -> None:
    emb = catalog.models["text-embedding-3-small"]
    assert emb.type == "embedding" and emb.max_output_tokens == 4096


def test_the_spec_excerpt_itself_names_an_undefined_channel(tmp_path: Path) -> None:
    # SPEC §3 references relay-b without defining it: the loader must say so.
    path = _write(tmp_path, SPEC_CATALOG.format(relay_b=""))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    msg = str(info.value)
    assert str(path) in msg and "gpt-4o-mini/routed" in msg and "unknown channel 'relay-b'" in msg


# ---------------------------------------------------------------- rejections
#
# Each bad catalog is a mutation of a small valid one, written as TOML to tmp_path.


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _dump(data: dict[str, Any]) -> str:
    return "\n".join(f"{k} = {_toml(v)}" for k, v in data.items()) + "\n"


def _base() -> dict[str, Any]:
    return {
        "buckets": [{"id": "credit", "name": "Official Credit"}, {"id": "routed", "name": "Routed"}],
        "channels": [
            {"id": "direct", "base_url": "https://api.example.com/v1", "api_key_env": "K"},
            {"id": "relay-a", "base_url": "http://127.0.0.1:9101/v1"},
        ],
        "models": [
            {"id": "m1", "max_output_tokens": 1000, "routes": [
                {"id": "m1/official", "kind": "official", "bucket": "credit",
                 "input_price_per_mtok": "0.15", "output_price_per_mtok": "0.60",
                 "channels": [{"channel": "direct", "upstream_model": "m1-up"}],
                 "retry": {"max_attempts": 2, "retry_on": ["5xx"], "backoff_ms": 10}},
                {"id": "m1/routed", "kind": "routed", "bucket": "routed",
                 "input_price_per_mtok": "0.06", "output_price_per_mtok": "0.24",
                 "channels": [{"channel": "relay-a", "upstream_model": "m1"}],
                 "on_failure": "charge_delivered"},
            ]},
            {"id": "m2", "routes": [
                {"id": "m2/official", "kind": "official", "bucket": "credit",
                 "input_price_per_mtok": "1", "output_price_per_mtok": "2",
                 "channels": [{"channel": "direct", "upstream_model": "m2"}]},
            ]},
        ],
    }


def _refused(tmp_path: Path, data: dict[str, Any]) -> str:
    path = _write(tmp_path, _dump(data), "bad-catalog.toml")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg  # names the file
    return msg


def _route(data: dict[str, Any], model: int = 0, route: int = 0) -> dict[str, Any]:
    return data["models"][model]["routes"][route]


def test_base_catalog_is_valid(tmp_path: Path) -> None:
    data = _base()
    catalog = load_catalog(_write(tmp_path, _dump(data)))
    assert set(catalog.routes) == {"m1/official", "m1/routed", "m2/official"}
    assert catalog.models["m1"].routes[0].retry == RetryPolicy(2, frozenset({"5xx"}), 10)
    # the same data through parse_catalog gives an equal result
    assert parse_catalog(copy.deepcopy(data), "x").models["m1"] == catalog.models["m1"]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = _base()
    data["pricing"] = "cheap"
    msg = _refused(tmp_path, data)
    assert "catalog" in msg and "unknown key 'pricing'" in msg


def test_unknown_key_in_bucket(tmp_path: Path) -> None:
    data = _base()
    data["buckets"][1]["colour"] = "red"
    msg = _refused(tmp_path, data)
    assert "buckets[1]" in msg and "unknown key 'colour'" in msg


def test_unknown_key_in_channel(tmp_path: Path) -> None:
    data = _base()
    data["channels"][1]["api_key"] = "sk-should-be-in-env"
    msg = _refused(tmp_path, data)
    assert "channels[1]" in msg and "unknown key 'api_key'" in msg


def test_unknown_key_in_model(tmp_path: Path) -> None:
    data = _base()
    data["models"][1]["context_window"] = 8192
    msg = _refused(tmp_path, data)
    assert "models[1]" in msg and "unknown key 'context_window'" in msg


def test_unknown_key_in_route(tmp_path: Path) -> None:
    data = _base()
    _route(data, 0, 1)["price"] = "0.1"
    msg = _refused(tmp_path, data)
    assert "model 'm1' routes[1]" in msg and "unknown key 'price'" in msg


def test_unknown_key_in_channel_ref(tmp_path: Path) -> None:
    data = _base()
    _route(data)["channels"][0]["weight"] = 3
    msg = _refused(tmp_path, data)
    assert "route 'm1/official' channels[0]" in msg and "unknown key 'weight'" in msg


def test_unknown_key_in_retry(tmp_path: Path) -> None:
    data = _base()
    _route(data)["retry"]["jitter"] = True
    msg = _refused(tmp_path, data)
    assert "route 'm1/official' retry" in msg and "unknown key 'jitter'" in msg


def test_unknown_bucket_reference(tmp_path: Path) -> None:
    data = _base()
    _route(data, 1, 0)["bucket"] = "gold"
    msg = _refused(tmp_path, data)
    assert "route 'm2/official'" in msg and "unknown bucket 'gold'" in msg


def test_unknown_channel_reference(tmp_path: Path) -> None:
    data = _base()
    _route(data, 0, 1)["channels"].append({"channel": "relay-z", "upstream_model": "m1"})
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and "unknown channel 'relay-z'" in msg


@pytest.mark.parametrize("channels", [[], None])
def test_route_without_channels(tmp_path: Path, channels: list[Any] | None) -> None:
    data = _base()
    if channels is None:
        del _route(data, 0, 1)["channels"]
    else:
        _route(data, 0, 1)["channels"] = channels
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and "has no channels" in msg


@pytest.mark.parametrize("routes", [[], None])
def test_model_without_routes(tmp_path: Path, routes: list[Any] | None) -> None:
    data = _base()
    if routes is None:
        del data["models"][1]["routes"]
    else:
        data["models"][1]["routes"] = routes
    msg = _refused(tmp_path, data)
    assert "model 'm2'" in msg and "has no routes" in msg


@pytest.mark.parametrize("key", ["input_price_per_mtok", "output_price_per_mtok", "cache_read_price_per_mtok",
                                 "cache_write_price_per_mtok", "cache_write_1h_price_per_mtok"])
def test_negative_price(tmp_path: Path, key: str) -> None:
    data = _base()
    _route(data, 0, 1)[key] = "-0.06"
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and key in msg and "negative" in msg


def test_negative_integer_price(tmp_path: Path) -> None:
    data = _base()
    _route(data, 1, 0)["output_price_per_mtok"] = -2
    msg = _refused(tmp_path, data)
    assert "route 'm2/official'" in msg and "output_price_per_mtok" in msg and "negative" in msg


@pytest.mark.parametrize("key", ["input_price_per_mtok", "output_price_per_mtok"])
def test_float_price(tmp_path: Path, key: str) -> None:
    data = _base()
    _route(data)[key] = 0.15
    msg = _refused(tmp_path, data)
    assert "route 'm1/official'" in msg and key in msg and "decimal string" in msg


def test_garbage_and_missing_price(tmp_path: Path) -> None:
    data = _base()
    _route(data)["input_price_per_mtok"] = "cheap"
    msg = _refused(tmp_path, data)
    assert "route 'm1/official'" in msg and "not a decimal number" in msg
    data = _base()
    del _route(data)["output_price_per_mtok"]
    msg = _refused(tmp_path, data)
    assert "route 'm1/official'" in msg and "missing 'output_price_per_mtok'" in msg


def test_duplicate_bucket_id(tmp_path: Path) -> None:
    data = _base()
    data["buckets"].append({"id": "routed", "name": "again"})
    msg = _refused(tmp_path, data)
    assert "bucket 'routed'" in msg and "duplicate id 'routed'" in msg


def test_duplicate_channel_id(tmp_path: Path) -> None:
    data = _base()
    data["channels"].append({"id": "relay-a", "base_url": "http://other/v1"})
    msg = _refused(tmp_path, data)
    assert "channel 'relay-a'" in msg and "duplicate id 'relay-a'" in msg


def test_duplicate_model_id(tmp_path: Path) -> None:
    data = _base()
    dup = copy.deepcopy(data["models"][1])
    dup["routes"][0]["id"] = "m2/other"
    data["models"].append(dup)
    msg = _refused(tmp_path, data)
    assert "models[2]" in msg and "duplicate id 'm2'" in msg


def test_duplicate_route_id_within_a_model(tmp_path: Path) -> None:
    data = _base()
    _route(data, 0, 1)["id"] = "m1/official"
    msg = _refused(tmp_path, data)
    assert "route 'm1/official'" in msg and "duplicate id 'm1/official'" in msg


def test_duplicate_route_id_across_models(tmp_path: Path) -> None:
    data = _base()
    _route(data, 1, 0)["id"] = "m1/routed"
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and "duplicate id 'm1/routed'" in msg


@pytest.mark.parametrize("value", ["charge_all", "FREE", ""])
def test_bad_on_failure(tmp_path: Path, value: str) -> None:
    data = _base()
    _route(data, 0, 1)["on_failure"] = value
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and "on_failure" in msg


@pytest.mark.parametrize("retry_on", [["5xx", "4xx"], ["teapot"], "5xx", [429]])
def test_bad_retry_on_class(tmp_path: Path, retry_on: Any) -> None:
    data = _base()
    _route(data)["retry"]["retry_on"] = retry_on
    msg = _refused(tmp_path, data)
    assert "route 'm1/official' retry" in msg and "'retry_on' must be a list" in msg


def test_retry_on_with_a_nested_array_is_a_catalog_error(tmp_path: Path) -> None:
    # TOML allows nested arrays; the loader must still answer with a CatalogError, not crash.
    data = _base()
    _route(data)["retry"]["retry_on"] = [["5xx"]]
    msg = _refused(tmp_path, data)
    assert "route 'm1/official' retry" in msg and "retry_on" in msg


@pytest.mark.parametrize(("retry", "problem"), [
    ({"max_attempts": 0}, "'max_attempts' must be a positive integer"),
    ({"max_attempts": 1.5}, "'max_attempts' must be a positive integer"),
    ({"backoff_ms": -1}, "'backoff_ms' must be a non-negative integer"),
])
def test_bad_retry_numbers(tmp_path: Path, retry: dict[str, Any], problem: str) -> None:
    data = _base()
    _route(data)["retry"] = retry
    msg = _refused(tmp_path, data)
    assert "route 'm1/official' retry" in msg and problem in msg


@pytest.mark.parametrize("url", ["api.example.com/v1", "ftp://example.com", "unix:///tmp/s", "htp://x"])
def test_bad_base_url(tmp_path: Path, url: str) -> None:
    data = _base()
    data["channels"][1]["base_url"] = url
    msg = _refused(tmp_path, data)
    assert "channel 'relay-a'" in msg and "base_url" in msg and "http://" in msg


@pytest.mark.parametrize(("field", "value"), [
    ("timeout_s", 0), ("timeout_s", -5), ("connect_timeout_s", "5"), ("max_concurrency", 2.5),
    ("max_concurrency", True),
])
def test_bad_channel_numbers(tmp_path: Path, field: str, value: Any) -> None:
    data = _base()
    data["channels"][0][field] = value
    msg = _refused(tmp_path, data)
    assert "channel 'direct'" in msg and f"'{field}' must be a positive" in msg


def test_bad_model_fields(tmp_path: Path) -> None:
    data = _base()
    data["models"][0]["max_output_tokens"] = 0
    msg = _refused(tmp_path, data)
    assert "model 'm1'" in msg and "max_output_tokens" in msg
    data = _base()
    data["models"][0]["type"] = "image"
    msg = _refused(tmp_path, data)
    assert "model 'm1'" in msg and "'type'" in msg


def test_missing_ids_and_kinds(tmp_path: Path) -> None:
    data = _base()
    del _route(data, 0, 1)["kind"]
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and "missing 'kind'" in msg
    data = _base()
    del data["channels"][0]["id"]
    msg = _refused(tmp_path, data)
    assert "channels[0]" in msg and "missing 'id'" in msg
    data = _base()
    del _route(data)["channels"][0]["upstream_model"]
    msg = _refused(tmp_path, data)
    assert "route 'm1/official' channels[0]" in msg and "missing 'upstream_model'" in msg


@pytest.mark.parametrize("section", ["buckets", "channels", "models"])
def test_empty_sections(tmp_path: Path, section: str) -> None:
    data = _base()
    data[section] = []
    msg = _refused(tmp_path, data)
    assert section in msg


def test_section_that_is_not_an_array_of_tables(tmp_path: Path) -> None:
    path = _write(tmp_path, '[buckets]\nid = "credit"\n')
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}: buckets: ") and "array of tables" in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[buckets]]\nid = "credit\n')
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "catalog.toml"
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}: cannot read")


def test_catalog_error_is_a_value_error() -> None:
    assert issubclass(CatalogError, ValueError)


# ---------------------------------------------------------------- pools (SPEC §1, §3)


def _with_pool(data: dict[str, Any]) -> dict[str, Any]:
    data["buckets"].append({"id": "plan", "name": "Pro plan", "kind": "pool"})
    data["models"][1]["routes"].append({
        "id": "m2/subscription", "kind": "subscription", "bucket": "plan",
        "input_price_per_mtok": "1", "output_price_per_mtok": "2",
        "channels": [{"channel": "relay-a", "upstream_model": "m2"}]})
    return data


def test_pool_buckets_subscription_routes_and_the_free_research_allowance(tmp_path: Path) -> None:
    data = _with_pool(_base())
    data["research"] = {"free_daily_allowance_usd": "0.05"}
    catalog = load_catalog(_write(tmp_path, _dump(data)))
    assert catalog.buckets["plan"].kind == "pool" and catalog.buckets["credit"].kind == "prepaid"
    assert catalog.research_free_daily_nanos == 50_000_000
    assert catalog.buckets["research-free"].kind == "pool"
    assert catalog.bucket_kind("plan") == "pool" and catalog.bucket_kind("routed") == "prepaid"
    assert catalog.routes["m2/subscription"].bucket == "plan"


@pytest.mark.parametrize("amount", ["0", None])
def test_free_research_allowance_off(tmp_path: Path, amount: str | None) -> None:
    data = _base()
    if amount is not None:
        data["research"] = {"free_daily_allowance_usd": amount}
    catalog = load_catalog(_write(tmp_path, _dump(data)))
    assert catalog.research_free_daily_nanos == 0 and "research-free" not in catalog.buckets


@pytest.mark.parametrize(("research", "problem"), [
    ({"free_daily_allowance_usd": 0.05}, "must be a decimal string"),
    ({"free_daily_allowance_usd": "-1"}, "must not be negative"),
    ({"free_daily_allowance_usd": "lots"}, "is not a USD amount"),
    ({"free_daily_allowance_usd": "0.0000000001"}, "more than nine decimals"),
    ({"daily": "1"}, "unknown key 'daily'"),
])
def test_bad_research_table(tmp_path: Path, research: dict[str, Any], problem: str) -> None:
    data = _base()
    data["research"] = research
    msg = _refused(tmp_path, data)
    assert "research" in msg and problem in msg


def test_bad_bucket_kind(tmp_path: Path) -> None:
    data = _base()
    data["buckets"][1]["kind"] = "subscription"
    msg = _refused(tmp_path, data)
    assert "bucket 'routed'" in msg and "'kind' must be one of ['pool', 'prepaid']" in msg


def test_subscription_route_must_charge_a_pool(tmp_path: Path) -> None:
    data = _with_pool(_base())
    _route(data, 1, 1)["bucket"] = "credit"
    msg = _refused(tmp_path, data)
    assert "route 'm2/subscription'" in msg and "must charge a pool bucket" in msg


def test_only_subscription_routes_charge_a_pool(tmp_path: Path) -> None:
    data = _with_pool(_base())
    _route(data, 0, 1)["bucket"] = "plan"
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and "pool bucket 'plan' may only be charged by routes of kind" in msg


def test_research_free_is_reserved_for_the_research_assistant(tmp_path: Path) -> None:
    data = _with_pool(_base())
    data["research"] = {"free_daily_allowance_usd": "0.05"}
    _route(data, 1, 1)["bucket"] = "research-free"
    msg = _refused(tmp_path, data)
    assert "route 'm2/subscription'" in msg and "only the research assistant may spend it" in msg
    data = _base()
    data["buckets"].append({"id": "research-free", "kind": "pool"})
    msg = _refused(tmp_path, data)
    assert "bucket 'research-free'" in msg and "reserved for the free research allowance" in msg


@pytest.mark.parametrize("key", ["cache_read_price_per_mtok", "cache_write_price_per_mtok",
                                 "cache_write_1h_price_per_mtok"])
def test_a_cache_price_is_an_exact_decimal_not_a_float(tmp_path: Path, key: str) -> None:
    data = _base()
    _route(data, 0, 1)[key] = 0.03
    msg = _refused(tmp_path, data)
    assert "route 'm1/routed'" in msg and key in msg and "decimal string" in msg


def test_cache_prices_load_exactly_and_unpriced_classes_cost_the_input_price(tmp_path: Path) -> None:
    data = _base()
    route = _route(data, 0, 1)
    route["cache_read_price_per_mtok"] = "0.006"
    route["cache_write_1h_price_per_mtok"] = "0.1200001"
    catalog = load_catalog(_write(tmp_path, _dump(data)))
    loaded = catalog.routes["m1/routed"]
    assert loaded.cache_read_price == Decimal("0.006") == loaded.cache_read_price_per_mtok
    assert loaded.cache_write_1h_price == Decimal("0.1200001")
    # not priced: the input price, never nothing; and the route says it was not set
    assert loaded.cache_write_price == loaded.input_price and loaded.cache_write_price_per_mtok is None
    other = catalog.routes["m2/official"]
    assert (other.cache_read_price, other.cache_write_price, other.cache_write_1h_price) == (other.input_price,) * 3
