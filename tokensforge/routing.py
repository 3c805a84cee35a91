"""Route selection (SPEC §1): deterministic, pinnable, never driven by which bucket has money."""

from __future__ import annotations

from .catalog import Catalog, Model, Route
from .errors import InvalidRequest, ModelNotAllowed, ModelNotFound, RouteNotAllowed
from .policy import EffectivePolicy


def find_model(catalog: Catalog, model_id: object) -> Model:
    if not isinstance(model_id, str) or not model_id:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    model = catalog.models.get(model_id)
    if model is None:
        raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
    return model


def allowed_routes(model: Model, policy: EffectivePolicy) -> list[Route]:
    if not policy.allows_model(model.id):
        return []
    return [r for r in model.routes if policy.allows_route(r.kind, r.bucket)]


def preference_order(routes: list[Route], preference: str | tuple[str, ...]) -> list[Route]:
    """Routes in the order the preference ranks them; catalog order breaks ties."""
    if preference == "cheapest":
        return sorted(routes, key=lambda r: r.input_price + r.output_price)  # stable
    kinds = (preference,) if isinstance(preference, str) else preference
    rank = {kind: i for i, kind in enumerate(kinds)}
    return sorted(routes, key=lambda r: rank.get(r.kind, len(rank)))


def select_route(model: Model, policy: EffectivePolicy, pin: str | None = None) -> Route:
    """The one route this request will be charged on."""
    if not policy.allows_model(model.id):
        raise ModelNotAllowed(f"this key may not use model {model.id!r}", param="model")
    usable = allowed_routes(model, policy)
    if pin is not None:
        return _pinned(model, usable, pin, policy)
    if not usable:
        raise RouteNotAllowed(f"this key may use no route of model {model.id!r}", param="model", route=None)
    return preference_order(usable, policy.route_preference)[0]


def _pinned(model: Model, usable: list[Route], pin: str, policy: EffectivePolicy) -> Route:
    """A pin names a route id, or a kind: then the preferred usable route of that kind."""
    matching = [r for r in model.routes if r.id == pin] or [r for r in model.routes if r.kind == pin]
    if not matching:
        raise InvalidRequest(
            f"model {model.id!r} has no route {pin!r} (routes: {', '.join(r.id for r in model.routes)})",
            param="route")
    allowed = [r for r in matching if r in usable]
    if not allowed:
        route = matching[0]
        raise RouteNotAllowed(f"this key may not use route {route.id!r}", param="route", route=route.id)
    return preference_order(allowed, policy.route_preference)[0]


def fallback_routes(model: Model, policy: EffectivePolicy, chosen: Route) -> list[Route]:
    """Other routes a failed request may move to; empty unless the policy allows cross-route fallback."""
    if not policy.allow_cross_route_fallback:
        return []
    return [r for r in preference_order(allowed_routes(model, policy), policy.route_preference) if r != chosen]
