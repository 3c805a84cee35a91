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
from .money import ROUNDING, charge_nanos, classes_charge_nanos, exact_nanos, nanos_per_token, round_nanos, usd

__all__ = ["Usage", "Reservation", "size_request", "size_embedding", "charge_for", "cost_lines", "max_input_price",
           "usage_price", "TOKEN_CLASSES", "LOW_DETAIL_IMAGE_TOKENS", "MAX_MEDIA_PARTS"]

#: Input tokens reserved per image part (an upper bound at high detail; low detail costs 85).
MEDIA_PART_TOKENS = IMAGE_TOKENS


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


# ------------------------------------------------------------------ token classes (SPEC §1 Money)

#: the classes a charge sums over, in the order receipts list them: fresh input, cache reads, cache writes
#: (5-minute, 1-hour), output (reasoning included)
TOKEN_CLASSES = ("input", "cache_read", "cache_write", "cache_write_1h", "output")


@dataclass(frozen=True, slots=True)
class ClassRates:
    """One route's price per token class, in `TOKEN_CLASSES` order, resolved and formatted once."""

    route: Route
    prices: tuple[Decimal, ...]  # USD per 1M tokens; an unpriced cache class is the input price
    texts: tuple[str, ...]  # the same as exact decimal strings, for receipts and quotes
    whole_nanos: tuple[int | None, ...]  # nano-USD per token, None where a price has a fraction of a nano
    all_whole: bool  # every class whole: the charge is plain integer arithmetic
    price: dict[str, str]  # the receipt's `price` object; copied per receipt, never handed out itself
    backups: tuple[str, ...]  # the route's backup channel ids, as receipts list them


#: route id → its rates; checked by identity, so a reloaded catalog's route gets its own entry
_rates: dict[str, ClassRates] = {}


def class_rates(route: Route) -> ClassRates:
    """The route's class prices and what every receipt of it repeats, computed once per route object
    (Decimal work and formatting are not free per request)."""
    found = _rates.get(route.id)
    if found is None or found.route is not route:
        if len(_rates) > 10_000:  # catalogs reloaded many times over: start again
            _rates.clear()
        prices = (route.input_price, route.cache_read_price, route.cache_write_price, route.cache_write_1h_price,
                  route.output_price)
        whole = tuple(_whole_nanos_per_token(p) for p in prices)
        texts = tuple(str(p) for p in prices)
        price = {"input_per_mtok": texts[0], "output_per_mtok": texts[4], "cache_read_per_mtok": texts[1],
                 "cache_write_per_mtok": texts[2], "cache_write_1h_per_mtok": texts[3], "rounding": ROUNDING}
        found = _rates[route.id] = ClassRates(route, prices, texts, whole, all(w is not None for w in whole),
                                              price, tuple(c.channel for c in route.backups))
    return found


def class_tokens(usage: Usage) -> tuple[int, int, int, int, int]:
    """The usage as exclusive classes in `TOKEN_CLASSES` order; fresh input never below 0 (the codecs keep
    the cache parts inside prompt_tokens; this holds even if one did not)."""
    return (max(usage.fresh_input_tokens, 0), usage.cache_read_tokens, usage.cache_write_tokens,
            usage.cache_write_1h_tokens, usage.completion_tokens)


def usage_price(usage: Usage, route: Route) -> int:
    """Σ class tokens × class price, exact, rounded half up once on the sum (money.classes_charge_nanos);
    plain integer arithmetic when every class price is whole nano-USD per token (the usual case: three
    decimals per 1M tokens or fewer), which is the same exact sum without Decimal's cost."""
    rates, tokens = class_rates(route), class_tokens(usage)
    if rates.all_whole:
        return sum(n * w for n, w in zip(tokens, rates.whole_nanos, strict=True) if w is not None)
    return classes_charge_nanos(zip(tokens, rates.prices, strict=True))


def cost_lines(usage: Usage, route: Route) -> list[dict[str, Any]]:
    """One receipt line per class billed (classes with 0 tokens left out):
    `{"class", "tokens", "per_mtok", "nanos"}`.

    `nanos` is the line's exact amount when it is whole — always so for prices of three decimals or fewer,
    and then the lines add up to the price exactly. A price with more decimals can make a line's exact
    amount a fraction of a nano: the line then shows it as `exact_nanos` (a decimal string) and `nanos` is
    that rounded half up on its own; the request's price is the exact sum rounded once, so it may differ
    from the sum of the lines' `nanos` by up to half a nano per line (never from the sum of `exact_nanos`
    rounded once)."""
    rates, lines = class_rates(route), []
    for cls, tokens, price, text, whole in zip(TOKEN_CLASSES, class_tokens(usage), rates.prices, rates.texts,
                                               rates.whole_nanos, strict=True):
        if tokens == 0:
            continue
        line: dict[str, Any] = {"class": cls, "tokens": tokens, "per_mtok": text}
        if whole is not None:
            line["nanos"] = tokens * whole
        else:
            exact = exact_nanos(tokens, price)
            line["nanos"] = round_nanos(exact)
            if exact != exact.to_integral_value():
                line["exact_nanos"] = str(exact)
        lines.append(line)
    return lines


#: The agent turn /v1/models and quotes price per route (`cached_turn_example`): 10,000 input tokens of which
#: 9,000 are cache reads (a coding agent re-sending its context), 500 output tokens.
CACHED_TURN = Usage.of(fresh_input=1_000, cache_read=9_000, output=500)


def cached_turn_example(route: Route) -> dict[str, Any]:
    """What `CACHED_TURN` costs on the route, beside what the same tokens would cost if every input token were
    fresh input, so a reader sees what the route's cache prices are worth."""
    price = usage_price(CACHED_TURN, route)
    uncached = usage_price(Usage(CACHED_TURN.prompt_tokens, CACHED_TURN.completion_tokens), route)
    return {"input_tokens": CACHED_TURN.prompt_tokens, "cache_read_tokens": CACHED_TURN.cache_read_tokens,
            "output_tokens": CACHED_TURN.completion_tokens, "price_nanos": price, "price_usd": usd(price),
            "uncached_price_nanos": uncached, "uncached_price_usd": usd(uncached)}


def unpriced_cache_classes(route: Route) -> list[str]:
    """The cache classes the catalog does not price on the route (each billed at the input price)."""
    given = (route.cache_read_price_per_mtok, route.cache_write_price_per_mtok, route.cache_write_1h_price_per_mtok)
    return [cls for cls, price in zip(TOKEN_CLASSES[1:4], given, strict=True) if price is None]


def with_output(usage: Usage, output_tokens: int) -> Usage:
    """`usage`'s input classes with another output count (what a broken or abandoned stream delivered):
    its cache reads and writes keep their own prices; reasoning stays a part of the output."""
    return Usage(usage.prompt_tokens, output_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
                 usage.cache_write_1h_tokens, min(usage.reasoning_tokens, output_tokens))


def max_input_price(route: Route) -> Decimal:
    """The highest price any input token can cost on the route (a cache write may cost more than fresh
    input): reservations price every input token at it, so no mix of classes passes the hold."""
    return max(route.input_price, route.cache_read_price, route.cache_write_price, route.cache_write_1h_price)


def route_charge(input_tokens: int, output_tokens: int, route: Route) -> int:
    """What `input_tokens` in and `output_tokens` out may cost at most on the route: input at
    `max_input_price` (the reservation's rule), output at the output price, rounded half up once; integer
    arithmetic when both prices are whole nano-USD per token."""
    input_price = max_input_price(route)
    input_nanos = _whole_nanos_per_token(input_price)
    output_nanos = _whole_nanos_per_token(route.output_price)
    if input_nanos is None or output_nanos is None:
        return charge_nanos(input_tokens, output_tokens, input_price, route.output_price)
    return input_tokens * input_nanos + output_tokens * output_nanos


def size_request(req: Request, model: Model, route: Route) -> Reservation:
    """What a request may cost at most on `route`: every input token it forwards at the highest
    input-class price, and n answers of the output allowance."""
    tokens_in = request_input_tokens(req)
    tokens_out = output_allowance(req.max_output_tokens, model, cap_param(req)) * req.n
    return Reservation(tokens_in, tokens_out, route_charge(tokens_in, tokens_out, route))


def size_embedding(body: dict[str, Any], route: Route) -> Reservation:
    """What an embeddings request may cost at most on `route`: its inputs' upper bound, no output."""
    tokens_in = embedding_input_tokens(body, upper=True)
    return Reservation(tokens_in, 0, route_charge(tokens_in, 0, route))


def charge_for(usage: Usage, route: Route, reserved_nanos: int) -> tuple[int, int]:
    """(charge, price of the usage over its token classes); the charge never passes what was reserved."""
    price = usage_price(usage, route)
    return min(price, reserved_nanos), price
