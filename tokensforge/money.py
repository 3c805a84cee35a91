"""Exact money: integer nano-USD, prices as exact decimals (SPEC §1 Money).

No float ever touches an amount. A price in USD per 1M tokens becomes nano-USD
per token by multiplying by 1e9 / 1e6 = 1000, which is exact for prices with at
most three decimals; finer prices are rounded once per request, half up.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
ROUNDING = "half_up_nano"
_NANOS_PER_TOKEN_PER_MTOK_USD = Decimal(1000)


def parse_price(text: object) -> Decimal:
    """Parse a USD-per-1M-tokens price given as a string (or int); floats are refused."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError("price must be a decimal string like \"0.15\"")
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"price {text!r} is not a decimal number") from None
    if not value.is_finite():
        raise ValueError(f"price {text!r} is not finite")
    if value < 0:
        raise ValueError(f"price {text!r} is negative")
    return value


def nanos_per_token(price_per_mtok: Decimal) -> Decimal:
    """Exact (possibly fractional) nano-USD per token."""
    return price_per_mtok * _NANOS_PER_TOKEN_PER_MTOK_USD


def exact_nanos(tokens: int, price_per_mtok: Decimal) -> Decimal:
    """tokens × price, exactly (a fraction of a nano-USD only when the price has more than three decimals)."""
    return tokens * nanos_per_token(price_per_mtok)


def round_nanos(exact: Decimal) -> int:
    """The one rounding money ever sees: half up to a whole nano-USD (SPEC §1, `ROUNDING`)."""
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def classes_charge_nanos(lines: Iterable[tuple[int, Decimal]]) -> int:
    """Σ tokens × price over (tokens, USD per 1M tokens) pairs — one per token class — summed exactly and
    rounded half up once, on the sum (so a request of many classes pays no rounding per class)."""
    return round_nanos(sum((exact_nanos(tokens, price) for tokens, price in lines), Decimal(0)))


def charge_nanos(input_tokens: int, output_tokens: int, input_price: Decimal, output_price: Decimal) -> int:
    """input × input price + output × output price, rounded half up once."""
    return classes_charge_nanos(((input_tokens, input_price), (output_tokens, output_price)))


def usd(nanos: int) -> str:
    """The decimal-string USD twin of an amount: 1650 → "0.000001650"."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def usd_to_nanos(text: str) -> int:
    """Parse a USD amount given by a person ("0.25") into nanos; sub-nano digits refused."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a USD amount") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite USD amount")
    nanos = value * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise ValueError(f"{text!r} has more than nine decimals")
    return int(nanos)
