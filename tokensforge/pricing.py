"""Reservation sizing and usage estimation, pure.

Two estimators, both documented in the README:
- *Reservation* (an upper bound, so a request rarely costs more than it held): the larger of
  the canonical estimate (ceil(UTF-8 bytes / 3) per text part + 4 per message + 3, plus an
  allowance per media part, tool calls and results, tools and response formats) and the bound
  of the client's body as forwarded (`forwarded.forwarded_input_tokens`: every string in any
  field, media anywhere, documents per page) — size what you forward, not what you understand
  (SPEC §1); input tokens are priced at the route's highest input-class price;
  output tokens = the client's cap, else the model's max_output_tokens, times n.
- *Settlement without upstream usage* (a typical count, so nobody is charged
  more than served): input ≈ ceil(bytes / 4) + 3 per message, of the canonical request or of
  the forwarded body's text, whichever is larger; output = one token per content chunk
  delivered (at least ceil(bytes / 4) is never used: chunk count is the lower, fairer figure).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson

from .canonical import MediaPart, Request, TextPart, ToolCall, ToolResult, Usage
from .catalog import Model, Route
from .errors import InvalidRequest
from .forwarded import (
    API_OF_DIALECT,
    IMAGE_TOKENS,
    LOW_DETAIL_IMAGE_TOKENS,
    MAX_MEDIA_PARTS,
    document_tokens,
    forwarded_input_tokens,
    forwarded_typical_tokens,
)
from .money import charge_nanos, nanos_per_token

__all__ = ["Usage", "Reservation", "size_request", "size_embedding", "charge_for", "LOW_DETAIL_IMAGE_TOKENS",
           "MAX_MEDIA_PARTS"]

#: Input tokens reserved per image part (an upper bound at high detail; low detail costs 85).
MEDIA_PART_TOKENS = IMAGE_TOKENS
#: route price fields that may price an input class above fresh input (a 1-hour cache write does)
_INPUT_CLASS_PRICES = ("cache_read_price", "cache_write_price", "cache_write_1h_price")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def embedding_inputs(body: dict[str, Any]) -> list[Any]:
    value = body.get("input")
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value:
        return value
    raise InvalidRequest("'input' must be a non-empty string or array", param="input")


def embedding_input_tokens(body: dict[str, Any], *, upper: bool) -> int:
    divisor = 3 if upper else 4
    total = 0
    for item in embedding_inputs(body):
        if isinstance(item, str):
            total += max(1, _ceil_div(len(item.encode("utf-8")), divisor))
        elif isinstance(item, list):
            total += len(item)  # already tokens
        else:
            total += 1
    return total


@dataclass(frozen=True, slots=True)
class Reservation:
    input_tokens: int
    output_tokens: int
    amount_nanos: int


def request_input_tokens(req: Request) -> int:
    """Upper-bound input estimate of a request: the larger of what the canonical request holds and what
    the client's body, as forwarded, holds (`Request.raw`; SPEC §1 "size what you forward")."""
    canonical = canonical_input_tokens(req)
    if req.raw is None:
        return canonical
    return max(canonical, forwarded_input_tokens(req.raw, API_OF_DIALECT[req.dialect]))


def canonical_input_tokens(req: Request) -> int:
    """Upper-bound input estimate for a canonical request: ceil(bytes / 3) of every text the
    upstream reads, 4 per message, a fixed allowance per media part (a document per page),
    tools and formats."""
    total, media = 3, 0
    for message in req.messages:
        total += 4
        for part in message.parts:
            if isinstance(part, TextPart):
                total += _ceil_div(len(part.text.encode("utf-8")), 3)
            elif isinstance(part, MediaPart):
                media += 1
                total += _media_part_tokens(part)
            elif isinstance(part, ToolCall):
                total += _ceil_div(len(part.name) + len(part.arguments.encode("utf-8")), 3) + 4
            elif isinstance(part, ToolResult):
                total += _ceil_div(len(part.content.encode("utf-8")), 3) + 4
    if media > MAX_MEDIA_PARTS:
        raise InvalidRequest(f"at most {MAX_MEDIA_PARTS} media parts per request", param="messages")
    for tool in req.tools:
        total += _ceil_div(len(orjson.dumps([tool.name, tool.description, tool.parameters])), 3) + 4
    if req.response_format is not None:
        total += _ceil_div(len(orjson.dumps(req.response_format)), 3)
    return total


def _media_part_tokens(part: MediaPart) -> int:
    if part.kind == "file":
        inline = part.data_b64 if part.data_b64 is not None else (
            part.url if part.url is not None and part.url.startswith("data:") else None)
        return document_tokens(inline)
    return LOW_DETAIL_IMAGE_TOKENS if part.detail == "low" else MEDIA_PART_TOKENS


def typical_request_tokens(req: Request) -> int:
    """Typical input count of a request, used only when the upstream reports no usage: the canonical
    request's, or the forwarded body's text when that is larger (an unknown field is read too)."""
    total = 0
    for message in req.messages:
        size = sum(len(p.text.encode("utf-8")) if isinstance(p, TextPart) else
                   len(p.arguments) if isinstance(p, ToolCall) else
                   len(p.content.encode("utf-8")) if isinstance(p, ToolResult) else 0 for p in message.parts)
        total += _ceil_div(size, 4) + 3
    if req.raw is not None:
        total = max(total, forwarded_typical_tokens(req.raw, API_OF_DIALECT[req.dialect]))
    return total


def cap_param(req: Request) -> str:
    """The request field that carries the output cap, for error messages."""
    if req.dialect == "openai_responses":
        return "max_output_tokens"
    if req.raw is not None and req.raw.get("max_completion_tokens") is not None:
        return "max_completion_tokens"
    return "max_tokens"


def output_allowance(cap: int | None, model: Model, param: str = "max_tokens") -> int:
    """The output cap a reservation covers: the client's, at most the model's maximum (over it: 400)."""
    if cap is None:
        return model.max_output_tokens
    if cap > model.max_output_tokens:
        raise InvalidRequest(f"the output cap is {cap}; model {model.id!r} allows at most {model.max_output_tokens}",
                             param=param)
    return cap


@lru_cache(maxsize=1024)
def _whole_nanos_per_token(price_per_mtok: Decimal) -> int | None:
    """The price in whole nano-USD per token, or None when it has a fraction of a nano (then the exact
    Decimal sum, rounded once, is needed)."""
    per_token = nanos_per_token(price_per_mtok)
    return int(per_token) if per_token == per_token.to_integral_value() else None


def route_charge(input_tokens: int, output_tokens: int, route: Route) -> int:
    """`money.charge_nanos` at the route's prices; plain integer arithmetic when both prices are whole
    nano-USD per token (three decimals per 1M tokens or fewer: the usual case), which is the same exact
    sum without Decimal's cost on every request."""
    input_nanos = _whole_nanos_per_token(route.input_price)
    output_nanos = _whole_nanos_per_token(route.output_price)
    if input_nanos is None or output_nanos is None:
        return charge_nanos(input_tokens, output_tokens, route.input_price, route.output_price)
    return input_tokens * input_nanos + output_tokens * output_nanos


def reserved_input_price(route: Route) -> Decimal:
    """The highest input-class price of `route` (a cache write may cost more than fresh input): what a
    reserved input token is priced at. Stands in for the charge side's `max_input_price(route)`; the
    cache-class prices are read by name so this works before and after the route grows them."""
    prices = [route.input_price]
    for name in _INPUT_CLASS_PRICES:
        price = getattr(route, name, None)
        if isinstance(price, Decimal):
            prices.append(price)
    return max(prices)


def _reservation_nanos(tokens_in: int, tokens_out: int, route: Route) -> int:
    """tokens_in at the highest input-class price + tokens_out at the output price, exact, rounded once."""
    input_price = reserved_input_price(route)
    input_nanos = _whole_nanos_per_token(input_price)
    output_nanos = _whole_nanos_per_token(route.output_price)
    if input_nanos is None or output_nanos is None:
        return charge_nanos(tokens_in, tokens_out, input_price, route.output_price)
    return tokens_in * input_nanos + tokens_out * output_nanos


def size_request(req: Request, model: Model, route: Route) -> Reservation:
    """What a request may cost at most on `route`: every input token it forwards at the highest
    input-class price, and n answers of the output allowance."""
    tokens_in = request_input_tokens(req)
    tokens_out = output_allowance(req.max_output_tokens, model, cap_param(req)) * req.n
    return Reservation(tokens_in, tokens_out, _reservation_nanos(tokens_in, tokens_out, route))


def size_embedding(body: dict[str, Any], route: Route) -> Reservation:
    """What an embeddings request may cost at most on `route`: its inputs' upper bound, no output."""
    tokens_in = embedding_input_tokens(body, upper=True)
    return Reservation(tokens_in, 0, route_charge(tokens_in, 0, route))


def charge_for(usage: Usage, route: Route, reserved_nanos: int) -> tuple[int, int]:
    """(charge, exact price of the usage); the charge never passes what was reserved."""
    price = route_charge(usage.prompt_tokens, usage.completion_tokens, route)
    return min(price, reserved_nanos), price
