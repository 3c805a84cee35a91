"""Key and project policies and their intersection (SPEC §2 policy object).

Omitted fields mean "no restriction"; the effective policy of a key is the
intersection of its own and its project's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .ledger.model import BUDGET_PERIODS, BudgetLimit

PREFERENCES = ("official", "cheapest")
_FIELDS = {
    "allowed_models", "allowed_route_kinds", "allowed_buckets", "route_preference",
    "allow_cross_route_fallback", "budget_nanos", "budget_period", "rpm", "tpm",
}


@dataclass(frozen=True, slots=True)
class Policy:
    """One policy as configured; None means the field was not set."""

    allowed_models: frozenset[str] | None = None
    allowed_route_kinds: frozenset[str] | None = None
    allowed_buckets: frozenset[str] | None = None
    route_preference: str | tuple[str, ...] | None = None
    allow_cross_route_fallback: bool | None = None
    budget_nanos: int | None = None
    budget_period: str = "total"
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    allowed_models: frozenset[str] | None
    allowed_route_kinds: frozenset[str] | None
    allowed_buckets: frozenset[str] | None
    route_preference: str | tuple[str, ...]
    allow_cross_route_fallback: bool
    budgets: tuple[BudgetLimit, ...]
    rate_limits: tuple[tuple[str, int | None, int | None], ...]  # (scope, rpm, tpm)

    def allows_model(self, model_id: str) -> bool:
        return self.allowed_models is None or model_id in self.allowed_models

    def allows_route(self, kind: str, bucket: str) -> bool:
        return (self.allowed_route_kinds is None or kind in self.allowed_route_kinds) and (
            self.allowed_buckets is None or bucket in self.allowed_buckets)


def _names(raw: Mapping[str, Any], key: str) -> frozenset[str] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidRequest(f"policy.{key} must be a list of strings", param=f"policy.{key}")
    return None if "*" in value else frozenset(value)


def _positive_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequest(f"policy.{key} must be a positive integer", param=f"policy.{key}")
    return value


def parse_policy(raw: Any) -> Policy:
    """Validate a policy object from the admin API (400 on anything off)."""
    if raw is None:
        return Policy()
    if not isinstance(raw, dict):
        raise InvalidRequest("policy must be an object", param="policy")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown policy field {unknown[0]!r}", param=f"policy.{unknown[0]}")
    preference = raw.get("route_preference")
    if isinstance(preference, list):
        if not preference or not all(isinstance(v, str) and v for v in preference):
            raise InvalidRequest("policy.route_preference list must name route kinds", param="policy.route_preference")
        preference = tuple(preference)
    elif preference is not None and preference not in PREFERENCES:
        raise InvalidRequest(
            "policy.route_preference must be 'official', 'cheapest' or a list of route kinds",
            param="policy.route_preference")
    fallback = raw.get("allow_cross_route_fallback")
    if fallback is not None and not isinstance(fallback, bool):
        raise InvalidRequest("policy.allow_cross_route_fallback must be a boolean",
                             param="policy.allow_cross_route_fallback")
    period = raw.get("budget_period", "total")
    if period not in BUDGET_PERIODS:
        raise InvalidRequest(f"policy.budget_period must be one of {list(BUDGET_PERIODS)}",
                             param="policy.budget_period")
    return Policy(
        allowed_models=_names(raw, "allowed_models"),
        allowed_route_kinds=_names(raw, "allowed_route_kinds"),
        allowed_buckets=_names(raw, "allowed_buckets"),
        route_preference=preference,
        allow_cross_route_fallback=fallback,
        budget_nanos=_positive_int(raw, "budget_nanos"),
        budget_period=period,
        rpm=_positive_int(raw, "rpm"),
        tpm=_positive_int(raw, "tpm"),
    )


def _meet(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def effective(key: Policy, project: Policy | None, *, key_id: str, project_id: str | None) -> EffectivePolicy:
    """key ∩ project. Preferences: the key's wins; fallback only if someone allows it and nobody forbids it."""
    project = project or Policy()
    flags = (key.allow_cross_route_fallback, project.allow_cross_route_fallback)
    budgets = []
    if key.budget_nanos is not None:
        budgets.append(BudgetLimit(f"key:{key_id}", key.budget_period, key.budget_nanos))
    if project_id is not None and project.budget_nanos is not None:
        budgets.append(BudgetLimit(f"project:{project_id}", project.budget_period, project.budget_nanos))
    limits = [(f"key:{key_id}", key.rpm, key.tpm)]
    if project_id is not None:
        limits.append((f"project:{project_id}", project.rpm, project.tpm))
    return EffectivePolicy(
        allowed_models=_meet(key.allowed_models, project.allowed_models),
        allowed_route_kinds=_meet(key.allowed_route_kinds, project.allowed_route_kinds),
        allowed_buckets=_meet(key.allowed_buckets, project.allowed_buckets),
        route_preference=key.route_preference or project.route_preference or "official",
        allow_cross_route_fallback=True in flags and False not in flags,
        budgets=tuple(budgets),
        rate_limits=tuple((s, r, t) for s, r, t in limits if r is not None or t is not None),
    )
