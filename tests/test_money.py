"""Exact money (SPEC §1 Money): nano-USD integers, decimal prices, half-up rounding once."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensforge.money import (
    NANOS_PER_USD, ROUNDING, charge_nanos, nanos_per_token, parse_price, usd, usd_to_nanos,
)

D = Decimal


# ---------------------------------------------------------------- exact charges


def test_one_usd_is_a_billion_nanos_and_rounding_is_named() -> None:
    assert NANOS_PER_USD == 1_000_000_000
    assert ROUNDING == "half_up_nano"


@pytest.mark.parametrize(
    ("price", "per_token"),
    [("0.15", D(150)), ("0.06", D(60)), ("0.24", D(240)), ("0.60", D(600)), ("2.5", D(2500)),
     ("0", D(0)), ("0.001", D(1)), ("0.0005", D("0.5")), ("0.0000005", D("0.0005"))],
)
def test_nanos_per_token_is_exact(price: str, per_token: Decimal) -> None:
    assert nanos_per_token(parse_price(price)) == per_token


def test_cheap_model_twelve_input_tokens_costs_exactly_1800_nanos() -> None:
    assert charge_nanos(12, 0, parse_price("0.15"), parse_price("0.60")) == 1800


def test_routed_example_of_the_receipt_costs_7920_nanos() -> None:
    # $0.06 in / $0.24 out per 1M; 12 in + 30 out = 720 + 7200
    assert charge_nanos(12, 30, parse_price("0.06"), parse_price("0.24")) == 7920


def test_one_token_of_each_direction_is_charged_exactly() -> None:
    assert charge_nanos(1, 1, parse_price("0.15"), parse_price("0.60")) == 750
    assert charge_nanos(0, 0, parse_price("0.15"), parse_price("0.60")) == 0
    assert charge_nanos(1_000_000, 0, parse_price("0.15"), parse_price("0")) == 150_000_000  # $0.15


def test_large_token_counts_stay_exact() -> None:
    # 10^12 tokens at $123.456789 / M = 123456.789 nanos per token: no float ever involved
    assert charge_nanos(10**12, 0, parse_price("123.456789"), D(0)) == 123_456_789 * 10**9
    assert charge_nanos(10**12 + 1, 0, parse_price("123.456789"), D(0)) == 123_456_789 * 10**9 + 123_457


def test_sub_nano_price_rounds_half_up_once_per_request() -> None:
    tiny = parse_price("0.0000005")  # 0.0005 nano per token
    assert nanos_per_token(tiny) == D("0.0005")
    assert charge_nanos(1, 0, tiny, D(0)) == 0
    assert charge_nanos(999, 0, tiny, D(0)) == 0  # 0.4995
    assert charge_nanos(1000, 0, tiny, D(0)) == 1  # 0.5 → half up
    assert charge_nanos(3000, 0, tiny, D(0)) == 2  # 1.5 → 2


def test_half_a_nano_rounds_up_not_to_even() -> None:
    p = parse_price("0.0015")  # 1.5 nano per token
    assert charge_nanos(1, 0, p, D(0)) == 2
    assert charge_nanos(0, 1, D(0), p) == 2
    q = parse_price("0.0025")  # 2.5 → 3 (banker's rounding would give 2)
    assert charge_nanos(1, 0, q, D(0)) == 3
    assert charge_nanos(1, 0, parse_price("0.0014"), D(0)) == 1  # 1.4 → 1


def test_rounding_happens_once_on_the_sum_not_per_direction() -> None:
    p = parse_price("0.0005")  # 0.5 nano per token each way
    # per-direction rounding would give 1 + 1 = 2; once on the sum: 0.5 + 0.5 = 1
    assert charge_nanos(1, 1, p, p) == 1
    q = parse_price("0.0004")  # 0.4 + 0.4 = 0.8 → 1 (per-direction: 0 + 0)
    assert charge_nanos(1, 1, q, q) == 1


def test_charge_is_an_int() -> None:
    value = charge_nanos(3, 4, parse_price("0.15"), parse_price("0.60"))
    assert type(value) is int and value == 450 + 2400


# ---------------------------------------------------------------- usd()


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0.000000000"),
        (1, "0.000000001"),
        (1650, "0.000001650"),
        (7920, "0.000007920"),
        (999_999_999, "0.999999999"),
        (1_000_000_000, "1.000000000"),
        (12_345_000_000_001, "12345.000000001"),
        (-1, "-0.000000001"),
        (-7920, "-0.000007920"),
        (-1_500_000_000, "-1.500000000"),
    ],
)
def test_usd_twin_formatting(nanos: int, text: str) -> None:
    assert usd(nanos) == text


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_usd_round_trips_through_usd_to_nanos(nanos: int) -> None:
    text = usd(nanos)
    assert usd_to_nanos(text) == nanos
    assert D(text) * NANOS_PER_USD == nanos
    assert len(text.split(".")[1]) == 9


# ---------------------------------------------------------------- parse_price


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0.15", D("0.15")), ("0", D(0)), (" 0.06 ", D("0.06")), ("1e-3", D("0.001")), (3, D(3)), (0, D(0)),
     ("0.0000005", D("0.0000005")), ("100", D(100))],
)
def test_parse_price_accepts_decimal_strings_and_ints(raw: object, value: Decimal) -> None:
    parsed = parse_price(raw)
    assert isinstance(parsed, Decimal)
    assert parsed == value


@pytest.mark.parametrize("raw", [0.15, 1.0, 0.0, float("nan")])
def test_parse_price_refuses_floats(raw: float) -> None:
    with pytest.raises(ValueError, match="decimal string"):
        parse_price(raw)


@pytest.mark.parametrize("raw", [True, False, None, [1], {"p": 1}, D("0.15"), b"0.15"])
def test_parse_price_refuses_other_types(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_price(raw)


@pytest.mark.parametrize("raw", ["-0.15", "-1", -1, "-0.0000001"])
def test_parse_price_refuses_negatives(raw: object) -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_price(raw)


@pytest.mark.parametrize("raw", ["abc", "", "   ", "0.1.5", "$0.15", "0,15", "1e", "0x10"])
def test_parse_price_refuses_garbage(raw: str) -> None:
    with pytest.raises(ValueError, match="not a decimal number"):
        parse_price(raw)


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "inf", "-Infinity", "sNaN"])
def test_parse_price_refuses_non_finite(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_price(raw)


# ---------------------------------------------------------------- usd_to_nanos


@pytest.mark.parametrize(
    ("text", "nanos"),
    [("0.25", 250_000_000), ("1", 1_000_000_000), ("0", 0), ("0.000000001", 1), ("12.5", 12_500_000_000),
     ("0.000001650", 1650), ("-0.5", -500_000_000), ("1e-9", 1), ("10", 10_000_000_000)],
)
def test_usd_to_nanos(text: str, nanos: int) -> None:
    value = usd_to_nanos(text)
    assert type(value) is int and value == nanos


@pytest.mark.parametrize("text", ["0.0000000001", "0.1234567891", "1e-10"])
def test_usd_to_nanos_refuses_sub_nano_digits(text: str) -> None:
    with pytest.raises(ValueError, match="nine decimals"):
        usd_to_nanos(text)


@pytest.mark.parametrize("text", ["abc", "", "1.2.3", "$1", "NaN", "Infinity"])
def test_usd_to_nanos_refuses_garbage_with_value_error(text: str) -> None:
    # An amount typed by a person: garbage must be a ValueError like every other refusal
    # in this module (parse_price, sub-nano digits), not a decimal/overflow exception.
    with pytest.raises(ValueError):
        usd_to_nanos(text)


# ---------------------------------------------------------------- property


prices = st.decimals(min_value=0, max_value=1000, places=7, allow_nan=False, allow_infinity=False)
tokens = st.integers(min_value=0, max_value=10**9)


@settings(max_examples=300)
@given(tokens, tokens, prices, prices)
def test_charge_is_the_exact_decimal_sum_rounded_half_up(
    tin: int, tout: int, pin: Decimal, pout: Decimal,
) -> None:
    pin, pout = parse_price(str(pin)), parse_price(str(pout))
    exact = D(tin) * pin * 1000 + D(tout) * pout * 1000
    expected = int(exact.quantize(D(1), rounding=ROUND_HALF_UP))
    got = charge_nanos(tin, tout, pin, pout)
    assert got == expected
    assert got >= 0
    assert abs(D(got) - exact) <= D("0.5")
    # monotone: one more token never costs less
    assert charge_nanos(tin + 1, tout, pin, pout) >= got
    assert charge_nanos(tin, tout + 1, pin, pout) >= got


@given(tokens, tokens, st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_prices_with_three_decimals_need_no_rounding(tin: int, tout: int, pin_milli: int, pout_milli: int) -> None:
    pin, pout = D(pin_milli) / 1000, D(pout_milli) / 1000
    assert charge_nanos(tin, tout, pin, pout) == tin * pin_milli + tout * pout_milli
