"""Reservation sizing and usage estimation, pure.

Two estimators, both documented in the README:
- *Reservation* (an upper bound, so a request rarely costs more than it held):
  input tokens ≈ ceil(UTF-8 bytes / 3) + 4 per message + 3, output tokens =
  the request's max_completion_tokens / max_tokens, else the model's
  max_output_tokens.
- *Settlement without upstream usage* (a typical count, so nobody is charged
  more than served): input ≈ ceil(bytes / 4) + 3 per message, output = one
  token per content chunk delivered (at least ceil(bytes / 4) is never used:
  chunk count is the lower, fairer figure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .canonical import MediaPart, Request, TextPart, ToolCall, ToolResult, Usage, token_count
from .catalog import Model, Route
from .errors import InvalidRequest
from .money import charge_nanos

__all__ = ["Usage", "Reservation", "size_request", "size_reservation", "charge_for", "usage_from"]

#: Input tokens reserved per media part (an upper bound for one image at high detail; low detail costs 85).
MEDIA_PART_TOKENS = 2_000
LOW_DETAIL_IMAGE_TOKENS = 85
MAX_MEDIA_PARTS = 100


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _text_bytes(content: Any) -> int:
    if isinstance(content, str):
        return len(content.encode("utf-8"))
    if isinstance(content, list):
        return sum(_text_bytes(p.get("text")) if isinstance(p, dict) else _text_bytes(p) for p in content)
    if content is None:
        return 0
    return len(orjson.dumps(content))


def reserve_input_tokens(body: dict[str, Any]) -> int:
    """Upper-bound input estimate for a chat request."""
    messages = body.get("messages") or []
    total = 3
    for message in messages:
        if isinstance(message, dict):
            total += _ceil_div(_text_bytes(message.get("content")), 3) + 4
            if "tool_calls" in message:
                total += _ceil_div(len(orjson.dumps(message["tool_calls"])), 3)
    for extra in ("tools", "functions", "response_format"):
        if extra in body:
            total += _ceil_div(len(orjson.dumps(body[extra])), 3)
    return total


def typical_input_tokens(body: dict[str, Any]) -> int:
    """Typical input count, used only when the upstream reports no usage."""
    messages = body.get("messages") or []
    return sum(_ceil_div(_text_bytes(m.get("content")), 4) + 3 for m in messages if isinstance(m, dict))


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


def max_output_tokens(body: dict[str, Any], model: Model) -> int:
    """The output allowance the reservation covers; over the model's maximum is a 400."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequest(f"'{key}' must be a positive integer", param=key)
        if value > model.max_output_tokens:
            raise InvalidRequest(
                f"'{key}' is {value}; model {model.id!r} allows at most {model.max_output_tokens}", param=key)
        return value
    return model.max_output_tokens


@dataclass(frozen=True, slots=True)
class Reservation:
    input_tokens: int
    output_tokens: int
    amount_nanos: int


def request_input_tokens(req: Request) -> int:
    """Upper-bound input estimate for a canonical request: ceil(bytes / 3) of every text the
    upstream reads, 4 per message, a fixed allowance per media part, tools and formats."""
    total, media = 3, 0
    for message in req.messages:
        total += 4
        for part in message.parts:
            if isinstance(part, TextPart):
                total += _ceil_div(len(part.text.encode("utf-8")), 3)
            elif isinstance(part, MediaPart):
                media += 1
                total += LOW_DETAIL_IMAGE_TOKENS if part.detail == "low" else MEDIA_PART_TOKENS
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


def typical_request_tokens(req: Request) -> int:
    """Typical input count of a canonical request, used only when the upstream reports no usage."""
    total = 0
    for message in req.messages:
        size = sum(len(p.text.encode("utf-8")) if isinstance(p, TextPart) else
                   len(p.arguments) if isinstance(p, ToolCall) else
                   len(p.content.encode("utf-8")) if isinstance(p, ToolResult) else 0 for p in message.parts)
        total += _ceil_div(size, 4) + 3
    return total


def output_allowance(cap: int | None, model: Model, param: str = "max_tokens") -> int:
    """The output cap a reservation covers: the client's, at most the model's maximum (over it: 400)."""
    if cap is None:
        return model.max_output_tokens
    if cap > model.max_output_tokens:
        raise InvalidRequest(f"the output cap is {cap}; model {model.id!r} allows at most {model.max_output_tokens}",
                             param=param)
    return cap


def size_request(req: Request, model: Model, route: Route) -> Reservation:
    """What a canonical request may cost at most on `route`: n answers of the output allowance."""
    tokens_in = request_input_tokens(req)
    tokens_out = output_allowance(req.max_output_tokens, model) * req.n
    amount = charge_nanos(tokens_in, tokens_out, route.input_price, route.output_price)
    return Reservation(tokens_in, tokens_out, amount)


def size_reservation(body: dict[str, Any], model: Model, route: Route) -> Reservation:
    if model.type == "embedding":
        tokens_in, tokens_out = embedding_input_tokens(body, upper=True), 0
    else:
        tokens_in, tokens_out = reserve_input_tokens(body), max_output_tokens(body, model)
    return Reservation(tokens_in, tokens_out,
                       charge_nanos(tokens_in, tokens_out, route.input_price, route.output_price))


def charge_for(usage: Usage, route: Route, reserved_nanos: int) -> tuple[int, int]:
    """(charge, exact price of the usage); the charge never passes what was reserved."""
    price = charge_nanos(usage.prompt_tokens, usage.completion_tokens, route.input_price, route.output_price)
    return min(price, reserved_nanos), price


def usage_from(payload: Any) -> Usage | None:
    """The upstream's usage object, if it is a sane one (non-negative integers below 2**53)."""
    if not isinstance(payload, dict):
        return None
    prompt, completion = token_count(payload.get("prompt_tokens")), token_count(payload.get("completion_tokens", 0))
    if prompt is None or completion is None:
        return None  # booleans, floats, negatives and absurd counts are not token counts
    return Usage(prompt, completion)
