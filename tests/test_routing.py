"""Route selection (SPEC §1): deterministic, pinnable, filtered by policy, never driven by balances."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from tokensforge.catalog import Catalog, Model, parse_catalog
from tokensforge.errors import InvalidRequest, ModelNotAllowed, ModelNotFound, RouteNotAllowed
from tokensforge.policy import EffectivePolicy, effective, parse_policy
from tokensforge.routing import (
    allowed_routes, fallback_routes, find_model, preference_order, select_route,
)


def _route(ident: str, kind: str, bucket: str, pin: str, pout: str) -> dict[str, Any]:
    return {"id": ident, "kind": kind, "bucket": bucket, "input_price_per_mtok": pin,
            "output_price_per_mtok": pout, "channels": [{"channel": "c1", "upstream_model": "up"}]}


CATALOG: Catalog = parse_catalog({
    "buckets": [{"id": "credit"}, {"id": "routed"}, {"id": "plan", "kind": "pool"}],
    "channels": [{"id": "c1", "base_url": "http://127.0.0.1:1/v1"}],
    "models": [
        {"id": "m", "routes": [
            _route("m/official", "official", "credit", "0.15", "0.60"),   # 0.75
            _route("m/routed", "routed", "routed", "0.06", "0.24"),       # 0.30
            _route("m/sub", "subscription", "plan", "0.05", "0.05"),      # 0.10 (cheapest)
            _route("m/backup", "backup", "routed", "0.24", "0.06"),       # 0.30 (ties with routed)
        ]},
        {"id": "r-only", "routes": [_route("r-only/routed", "routed", "routed", "0.01", "0.01")]},
        {"id": "twins", "routes": [
            _route("twins/a", "routed", "credit", "0.01", "0.01"),
            _route("twins/b", "routed", "routed", "0.02", "0.02"),
        ]},
    ],
}, "test-catalog")

M: Model = CATALOG.models["m"]


def _policy(key: dict[str, Any] | None = None, project: dict[str, Any] | None = None) -> EffectivePolicy:
    return effective(parse_policy(key or {}), None if project is None else parse_policy(project),
                     key_id="k1", project_id="p1" if project is not None else None)


def _ids(routes: list[Any]) -> list[str]:
    return [r.id for r in routes]


# ---------------------------------------------------------------- preference


def test_default_preference_is_official() -> None:
    assert select_route(M, _policy()).id == "m/official"


def test_official_preference_when_official_is_not_allowed_keeps_catalog_order() -> None:
    policy = _policy({"allowed_route_kinds": ["routed", "backup", "subscription"]})
    assert select_route(M, policy).id == "m/routed"


def test_cheapest_picks_the_lowest_input_plus_output_price() -> None:
    assert select_route(M, _policy({"route_preference": "cheapest"})).id == "m/sub"


def test_cheapest_ties_are_broken_by_catalog_order() -> None:
    policy = _policy({"route_preference": "cheapest", "allowed_route_kinds": ["official", "routed", "backup"]})
    assert select_route(M, policy).id == "m/routed"
    order = preference_order(list(M.routes), "cheapest")
    assert _ids(order) == ["m/sub", "m/routed", "m/backup", "m/official"]


def test_cheapest_only_among_allowed_buckets() -> None:
    policy = _policy({"route_preference": "cheapest", "allowed_buckets": ["plan"]})
    assert select_route(M, policy).id == "m/sub"
    policy = _policy({"route_preference": "cheapest", "allowed_buckets": ["credit"]})
    assert select_route(M, policy).id == "m/official"
    policy = _policy({"route_preference": "cheapest", "allowed_buckets": ["routed"]})
    assert select_route(M, policy).id == "m/routed"


@pytest.mark.parametrize(("pref", "expected"), [
    (["backup", "routed"], "m/backup"),
    (["routed", "backup"], "m/routed"),
    (["subscription"], "m/sub"),
    (["official", "routed"], "m/official"),
    (["nonexistent-kind", "backup"], "m/backup"),
])
def test_explicit_list_of_kinds(pref: list[str], expected: str) -> None:
    assert select_route(M, _policy({"route_preference": pref})).id == expected


def test_explicit_list_skips_disallowed_kinds() -> None:
    policy = _policy({"route_preference": ["backup", "routed"], "allowed_route_kinds": ["routed", "official"]})
    assert select_route(M, policy).id == "m/routed"


def test_explicit_list_order_of_all_routes() -> None:
    order = preference_order(list(M.routes), ("backup", "subscription"))
    assert _ids(order)[:2] == ["m/backup", "m/sub"]
    assert set(_ids(order)) == {r.id for r in M.routes}


def test_project_preference_applies_when_key_has_none() -> None:
    assert select_route(M, _policy({}, {"route_preference": "cheapest"})).id == "m/sub"
    assert select_route(M, _policy({"route_preference": ["routed"]}, {"route_preference": "cheapest"})).id \
        == "m/routed"


def test_selection_is_deterministic() -> None:
    policy = _policy({"route_preference": "cheapest"})
    assert len({select_route(M, policy).id for _ in range(20)}) == 1


# ---------------------------------------------------------------- pins


@pytest.mark.parametrize(("pin", "expected"), [
    ("m/routed", "m/routed"), ("routed", "m/routed"),
    ("m/backup", "m/backup"), ("backup", "m/backup"),
    ("official", "m/official"), ("subscription", "m/sub"),
])
def test_pin_by_route_id_or_kind_overrides_preference(pin: str, expected: str) -> None:
    assert select_route(M, _policy({"route_preference": "cheapest"}), pin).id == expected


def test_pin_to_a_disallowed_route_kind_is_403_naming_the_route() -> None:
    policy = _policy({"allowed_route_kinds": ["official"]})
    with pytest.raises(RouteNotAllowed) as info:
        select_route(M, policy, "m/routed")
    err = info.value
    assert err.status == 403 and err.code == "route_not_allowed"
    assert err.extra["route"] == "m/routed"
    assert err.body()["error"]["route"] == "m/routed"
    assert err.final  # x-should-retry: false


def test_pin_by_kind_to_a_disallowed_bucket_names_the_route() -> None:
    policy = _policy({}, {"allowed_buckets": ["credit"]})
    with pytest.raises(RouteNotAllowed) as info:
        select_route(M, policy, "backup")
    assert info.value.extra["route"] == "m/backup"


def test_pin_by_kind_picks_an_allowed_route_of_that_kind() -> None:
    # Two routes share the kind "routed"; only the second one's bucket is allowed.
    # Pinning the kind must not choose the disallowed one and refuse (SPEC §1.3).
    twins = CATALOG.models["twins"]
    policy = _policy({"allowed_buckets": ["routed"]})
    assert select_route(twins, policy).id == "twins/b"
    assert select_route(twins, policy, "routed").id == "twins/b"


@pytest.mark.parametrize("pin", ["m/nope", "premium", "r-only/routed", "M/OFFICIAL"])
def test_unknown_pin_is_invalid_request(pin: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        select_route(M, _policy(), pin)
    assert info.value.param == "route" and info.value.status == 400
    assert pin in info.value.message and "m/official" in info.value.message


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("pin", [None, "m/official", "routed"])
def test_model_not_allowed(pin: str | None) -> None:
    policy = _policy({"allowed_models": ["r-only"]})
    with pytest.raises(ModelNotAllowed) as info:
        select_route(M, policy, pin)
    assert info.value.status == 403 and info.value.code == "model_not_allowed"
    assert info.value.param == "model"
    assert allowed_routes(M, policy) == []


def test_model_not_allowed_by_project_intersection() -> None:
    policy = _policy({"allowed_models": ["m", "r-only"]}, {"allowed_models": ["r-only"]})
    with pytest.raises(ModelNotAllowed):
        select_route(M, policy)
    assert select_route(CATALOG.models["r-only"], policy).id == "r-only/routed"


def test_no_usable_route_is_route_not_allowed() -> None:
    policy = _policy({"allowed_route_kinds": ["official"]})
    with pytest.raises(RouteNotAllowed) as info:
        select_route(CATALOG.models["r-only"], policy)
    assert info.value.status == 403 and info.value.code == "route_not_allowed"
    assert "r-only" in info.value.message


def test_kind_and_bucket_filters_combine() -> None:
    policy = _policy({"allowed_route_kinds": ["official", "backup"]}, {"allowed_buckets": ["routed"]})
    assert _ids(allowed_routes(M, policy)) == ["m/backup"]
    assert select_route(M, policy).id == "m/backup"


# ---------------------------------------------------------------- never by balance


def test_selection_has_no_balance_input() -> None:
    params = list(inspect.signature(select_route).parameters)
    assert params == ["model", "policy", "pin"]
    for fn in (select_route, allowed_routes, preference_order, fallback_routes):
        for name in inspect.signature(fn).parameters:
            assert not any(word in name for word in ("balance", "available", "fund", "bucket", "account")), \
                (fn.__name__, name)


# ---------------------------------------------------------------- cross-route fallback


def test_fallback_routes_empty_by_default() -> None:
    policy = _policy()
    chosen = select_route(M, policy)
    assert fallback_routes(M, policy, chosen) == []


@pytest.mark.parametrize(("key", "project"), [
    ({"allow_cross_route_fallback": True}, {"allow_cross_route_fallback": False}),
    ({"allow_cross_route_fallback": False}, {"allow_cross_route_fallback": True}),
    ({}, {"allow_cross_route_fallback": False}),
])
def test_fallback_routes_empty_when_anyone_forbids(key: dict[str, Any], project: dict[str, Any]) -> None:
    policy = _policy(key, project)
    assert fallback_routes(M, policy, select_route(M, policy)) == []


def test_fallback_routes_when_allowed_are_the_other_allowed_routes_in_preference_order() -> None:
    policy = _policy({"allow_cross_route_fallback": True, "route_preference": "cheapest"})
    chosen = select_route(M, policy)
    assert chosen.id == "m/sub"
    assert _ids(fallback_routes(M, policy, chosen)) == ["m/routed", "m/backup", "m/official"]


def test_fallback_routes_respect_the_policy_filters() -> None:
    policy = _policy({}, {"allow_cross_route_fallback": True, "allowed_buckets": ["routed"]})
    chosen = select_route(M, policy)
    assert chosen.id == "m/routed"
    assert _ids(fallback_routes(M, policy, chosen)) == ["m/backup"]


# ---------------------------------------------------------------- find_model


def test_find_model() -> None:
    assert find_model(CATALOG, "m") is M
    with pytest.raises(ModelNotFound) as info:
        find_model(CATALOG, "gpt-5")
    assert info.value.status == 404 and info.value.code == "model_not_found" and info.value.param == "model"


@pytest.mark.parametrize("value", [None, "", 5, ["m"], {"id": "m"}])
def test_find_model_requires_a_string(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        find_model(CATALOG, value)
    assert info.value.param == "model"
