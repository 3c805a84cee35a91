"""Key and project policies (SPEC §2 policy object) and their intersection."""

from __future__ import annotations

from typing import Any

import pytest

from tokensforge.errors import InvalidRequest
from tokensforge.ledger.model import BudgetLimit
from tokensforge.policy import EffectivePolicy, Policy, effective, parse_policy


def _eff(key: dict[str, Any] | None = None, project: dict[str, Any] | None = None,
         project_id: str | None = "p1") -> EffectivePolicy:
    return effective(parse_policy(key), None if project is None else parse_policy(project),
                     key_id="k1", project_id=project_id)


# ---------------------------------------------------------------- parse_policy: defaults


@pytest.mark.parametrize("raw", [None, {}])
def test_omitted_fields_mean_no_restriction(raw: dict[str, Any] | None) -> None:
    policy = parse_policy(raw)
    assert policy == Policy()
    assert policy.allowed_models is None and policy.allowed_route_kinds is None
    assert policy.allowed_buckets is None and policy.route_preference is None
    assert policy.allow_cross_route_fallback is None and policy.budget_nanos is None
    assert policy.budget_period == "total" and policy.rpm is None and policy.tpm is None


def test_effective_defaults_of_an_empty_policy() -> None:
    eff = _eff({}, {})
    assert eff.allowed_models is None and eff.allowed_route_kinds is None and eff.allowed_buckets is None
    assert eff.route_preference == "official"
    assert eff.allow_cross_route_fallback is False
    assert eff.budgets == () and eff.rate_limits == ()
    assert eff.allows_model("anything") and eff.allows_route("backup", "whatever")


def test_a_full_policy_parses() -> None:
    policy = parse_policy({
        "allowed_models": ["gpt-4o-mini", "m2"], "allowed_route_kinds": ["routed"],
        "allowed_buckets": ["routed"], "route_preference": ["routed", "official"],
        "allow_cross_route_fallback": True, "budget_nanos": 5_000, "budget_period": "day",
        "rpm": 60, "tpm": 10_000,
    })
    assert policy.allowed_models == frozenset({"gpt-4o-mini", "m2"})
    assert policy.allowed_route_kinds == frozenset({"routed"})
    assert policy.allowed_buckets == frozenset({"routed"})
    assert policy.route_preference == ("routed", "official")
    assert policy.allow_cross_route_fallback is True
    assert (policy.budget_nanos, policy.budget_period, policy.rpm, policy.tpm) == (5_000, "day", 60, 10_000)


@pytest.mark.parametrize("pref", ["official", "cheapest"])
def test_named_preferences(pref: str) -> None:
    assert parse_policy({"route_preference": pref}).route_preference == pref


@pytest.mark.parametrize("period", ["day", "month", "total"])
def test_budget_periods(period: str) -> None:
    assert parse_policy({"budget_nanos": 1, "budget_period": period}).budget_period == period


def test_star_means_every_name() -> None:
    policy = parse_policy({"allowed_models": ["*"], "allowed_route_kinds": ["*"], "allowed_buckets": ["*"]})
    assert policy.allowed_models is None and policy.allowed_route_kinds is None and policy.allowed_buckets is None
    eff = effective(policy, None, key_id="k", project_id=None)
    assert eff.allows_model("x") and eff.allows_route("any", "any")


def test_empty_list_allows_nothing() -> None:
    eff = _eff({"allowed_models": []})
    assert not eff.allows_model("gpt-4o-mini")


# ---------------------------------------------------------------- parse_policy: refusals


@pytest.mark.parametrize(("raw", "param"), [
    ({"allowed_model": ["x"]}, "policy.allowed_model"),
    ({"zzz": 1, "aaa_unknown": 2}, "policy.aaa_unknown"),
    ({"allowed_models": "gpt-4o-mini"}, "policy.allowed_models"),
    ({"allowed_models": [1]}, "policy.allowed_models"),
    ({"allowed_models": ["ok", ""]}, "policy.allowed_models"),
    ({"allowed_models": {"a": 1}}, "policy.allowed_models"),
    ({"allowed_route_kinds": "routed"}, "policy.allowed_route_kinds"),
    ({"allowed_route_kinds": [None]}, "policy.allowed_route_kinds"),
    ({"allowed_buckets": "credit"}, "policy.allowed_buckets"),
    ({"allowed_buckets": [["credit"]]}, "policy.allowed_buckets"),
    ({"route_preference": "fastest"}, "policy.route_preference"),
    ({"route_preference": ""}, "policy.route_preference"),
    ({"route_preference": []}, "policy.route_preference"),
    ({"route_preference": ["routed", 3]}, "policy.route_preference"),
    ({"route_preference": ["routed", ""]}, "policy.route_preference"),
    ({"route_preference": 1}, "policy.route_preference"),
    ({"route_preference": {"kind": "routed"}}, "policy.route_preference"),
    ({"allow_cross_route_fallback": "yes"}, "policy.allow_cross_route_fallback"),
    ({"allow_cross_route_fallback": 1}, "policy.allow_cross_route_fallback"),
    ({"budget_nanos": 0}, "policy.budget_nanos"),
    ({"budget_nanos": -5}, "policy.budget_nanos"),
    ({"budget_nanos": 1.5}, "policy.budget_nanos"),
    ({"budget_nanos": "100"}, "policy.budget_nanos"),
    ({"budget_nanos": True}, "policy.budget_nanos"),
    ({"budget_nanos": 10, "budget_period": "week"}, "policy.budget_period"),
    ({"budget_period": "DAY"}, "policy.budget_period"),
    ({"budget_period": None}, "policy.budget_period"),
    ({"budget_period": ["day"]}, "policy.budget_period"),
    ({"rpm": 0}, "policy.rpm"),
    ({"rpm": "60"}, "policy.rpm"),
    ({"rpm": False}, "policy.rpm"),
    ({"tpm": -1}, "policy.tpm"),
    ({"tpm": 1e6}, "policy.tpm"),
])
def test_each_bad_field_is_an_invalid_request_naming_it(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_policy(raw)
    assert info.value.param == param
    assert info.value.status == 400 and info.value.code == "invalid_request"
    assert param.removeprefix("policy.") in info.value.message


@pytest.mark.parametrize("raw", [[], "open", 5, ["allowed_models"], True])
def test_policy_must_be_an_object(raw: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_policy(raw)
    assert info.value.param == "policy"


# ---------------------------------------------------------------- effective(): intersection


def test_allowed_sets_intersect() -> None:
    eff = _eff({"allowed_models": ["a", "b"], "allowed_buckets": ["credit", "routed"]},
               {"allowed_models": ["b", "c"], "allowed_buckets": ["routed"]})
    assert eff.allowed_models == frozenset({"b"})
    assert eff.allowed_buckets == frozenset({"routed"})
    assert eff.allows_model("b") and not eff.allows_model("a") and not eff.allows_model("c")
    assert eff.allows_route("official", "routed") and not eff.allows_route("official", "credit")


def test_disjoint_sets_allow_nothing() -> None:
    eff = _eff({"allowed_route_kinds": ["official"]}, {"allowed_route_kinds": ["routed"]})
    assert eff.allowed_route_kinds == frozenset()
    assert not eff.allows_route("official", "credit") and not eff.allows_route("routed", "routed")


@pytest.mark.parametrize(("key", "project"), [
    ({"allowed_models": ["*"]}, {"allowed_models": ["a"]}),
    ({"allowed_models": ["a"]}, {"allowed_models": ["*"]}),
    ({}, {"allowed_models": ["a"]}),
    ({"allowed_models": ["a"]}, {}),
    ({"allowed_models": ["a"]}, None),
])
def test_star_or_omitted_side_leaves_the_other_side(key: dict[str, Any], project: dict[str, Any] | None) -> None:
    eff = _eff(key, project)
    assert eff.allowed_models == frozenset({"a"})
    assert eff.allows_model("a") and not eff.allows_model("b")


def test_star_on_both_sides_is_everything() -> None:
    eff = _eff({"allowed_buckets": ["*"]}, {"allowed_buckets": ["*"]})
    assert eff.allowed_buckets is None and eff.allows_route("x", "any-bucket")


def test_route_kind_and_bucket_must_both_be_allowed() -> None:
    eff = _eff({"allowed_route_kinds": ["routed"]}, {"allowed_buckets": ["credit"]})
    assert eff.allows_route("routed", "credit")
    assert not eff.allows_route("routed", "routed")
    assert not eff.allows_route("official", "credit")


@pytest.mark.parametrize(("key", "project", "expected"), [
    (None, None, "official"),
    (None, "cheapest", "cheapest"),
    ("cheapest", None, "cheapest"),
    ("official", "cheapest", "official"),
    (["routed", "official"], "cheapest", ("routed", "official")),
    ("cheapest", ["routed"], "cheapest"),
    (None, ["backup", "routed"], ("backup", "routed")),
])
def test_route_preference_key_wins_over_project(key: Any, project: Any, expected: Any) -> None:
    k = {} if key is None else {"route_preference": key}
    p = {} if project is None else {"route_preference": project}
    assert _eff(k, p).route_preference == expected


@pytest.mark.parametrize(("key", "project", "expected"), [
    (None, None, False),
    (True, None, True),
    (None, True, True),
    (True, True, True),
    (True, False, False),
    (False, True, False),
    (False, None, False),
    (None, False, False),
    (False, False, False),
])
def test_cross_route_fallback_needs_one_yes_and_no_no(key: bool | None, project: bool | None, expected: bool) -> None:
    k = {} if key is None else {"allow_cross_route_fallback": key}
    p = {} if project is None else {"allow_cross_route_fallback": project}
    assert _eff(k, p).allow_cross_route_fallback is expected


def test_key_fallback_without_project() -> None:
    eff = effective(parse_policy({"allow_cross_route_fallback": True}), None, key_id="k", project_id=None)
    assert eff.allow_cross_route_fallback is True


def test_budgets_become_scoped_limits() -> None:
    eff = effective(
        parse_policy({"budget_nanos": 1_000, "budget_period": "day"}),
        parse_policy({"budget_nanos": 50_000, "budget_period": "month"}),
        key_id="key_abc", project_id="proj_xyz")
    assert eff.budgets == (BudgetLimit("key:key_abc", "day", 1_000),
                           BudgetLimit("project:proj_xyz", "month", 50_000))


def test_budget_default_period_is_total() -> None:
    eff = _eff({"budget_nanos": 7})
    assert eff.budgets == (BudgetLimit("key:k1", "total", 7),)


def test_project_budget_alone() -> None:
    eff = _eff({}, {"budget_nanos": 9, "budget_period": "month"}, project_id="p9")
    assert eff.budgets == (BudgetLimit("project:p9", "month", 9),)


def test_no_budget_no_limits() -> None:
    assert _eff({"rpm": 5}, {"tpm": 7}).budgets == ()


def test_rate_limits_are_scoped_and_only_when_set() -> None:
    eff = _eff({"rpm": 5}, {"tpm": 700}, project_id="p2")
    assert eff.rate_limits == (("key:k1", 5, None), ("project:p2", None, 700))
    assert _eff({"tpm": 3}, None, project_id=None).rate_limits == (("key:k1", None, 3),)
