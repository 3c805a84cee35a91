"""Reservation sizing, settlement caps and usage estimation (pure)."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensforge.catalog import ChannelRef, Model, Route
from tokensforge.errors import InvalidRequest
from tokensforge.money import charge_nanos
from tokensforge.canonical import Request
from tokensforge.dialects import openai_chat
from tokensforge.pricing import (
    MEDIA_PART_TOKENS, Reservation, Usage, charge_for, embedding_input_tokens, embedding_inputs, output_allowance,
    request_input_tokens, route_charge, size_embedding, size_request, typical_request_tokens,
)
from tokensforge.upstream.openai import usage_of as usage_from

ROUTE = Route(id="m/official", kind="official", bucket="credit", input_price=Decimal("0.15"),
              output_price=Decimal("0.60"), channels=(ChannelRef("c", "up"),), model_id="m")
CHAT = Model(id="m", routes=(ROUTE,), max_output_tokens=1000)
EMB_ROUTE = Route(id="e/official", kind="official", bucket="credit", input_price=Decimal("0.02"),
                  output_price=Decimal(0), channels=(ChannelRef("c", "up"),), model_id="e")
EMB = Model(id="e", routes=(EMB_ROUTE,), type="embedding")


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _req(body: dict[str, Any]) -> Request:
    """A chat body as the gateway sizes it: decoded to the canonical request (any dialect sizes alike)."""
    return openai_chat.decode({"model": "m", **body})


def reserve_input_tokens(body: dict[str, Any]) -> int:
    return request_input_tokens(_req(body))


def typical_input_tokens(body: dict[str, Any]) -> int:
    return typical_request_tokens(_req(body))


def max_output_tokens(body: dict[str, Any], model: Model) -> int:
    req = _req({"messages": [_user("x")], **body})
    return output_allowance(req.max_output_tokens, model, "max_completion_tokens"
                            if body.get("max_completion_tokens") is not None else "max_tokens")


# ---------------------------------------------------------------- input estimates


@pytest.mark.parametrize(("content", "reserve", "typical"), [
    ("hello", 3 + 2 + 4, 2 + 3),             # 5 bytes
    ("", 3 + 0 + 4, 0 + 3),
    ("héllo", 3 + 2 + 4, 2 + 3),             # 6 bytes
    ("日本語", 3 + 3 + 4, 3 + 3),              # 9 bytes
    ("👍", 3 + 2 + 4, 1 + 3),                 # 4 bytes
    ("a" * 300, 3 + 100 + 4, 75 + 3),
    (None, 3 + 0 + 4, 0 + 3),
    ([{"type": "text", "text": "abc"}, {"type": "image_url", "image_url": {"url": "http://x"}}],
     3 + 1 + 4 + MEDIA_PART_TOKENS, 1 + 3),   # an image part reserves its allowance
    ([{"type": "text", "text": "abcdef"}, {"type": "text", "text": "gh"}], 3 + 3 + 4, 2 + 3),
])
def test_estimates_of_one_message(content: Any, reserve: int, typical: int) -> None:
    body = {"messages": [_user(content)]}
    assert reserve_input_tokens(body) == reserve
    assert typical_input_tokens(body) == typical
    assert reserve >= typical


def test_estimates_of_several_messages_add_up() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"},  # 8 bytes
                         _user("Ünïcödé ✓ 中文"),
                         {"role": "assistant", "content": "ok"}]}
    nbytes = [8, len("Ünïcödé ✓ 中文".encode()), 2]
    assert reserve_input_tokens(body) == 3 + sum(math.ceil(b / 3) + 4 for b in nbytes)
    assert typical_input_tokens(body) == sum(math.ceil(b / 4) + 3 for b in nbytes)


def test_tools_and_tool_calls_are_counted_in_the_reservation() -> None:
    base = {"messages": [_user("hi")]}
    tools = {**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    assert reserve_input_tokens(tools) > reserve_input_tokens(base)
    calls = {"messages": [_user("hi"), {"role": "assistant", "content": None,
                                        "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]}]}
    assert reserve_input_tokens(calls) > reserve_input_tokens({"messages": [_user("hi"), {"role": "assistant"}]})
    rf = {**base, "response_format": {"type": "json_object"}}
    assert reserve_input_tokens(rf) > reserve_input_tokens(base)


@pytest.mark.parametrize("body", [{}, {"messages": None}, {"messages": []}, {"messages": ["not a dict", 5]}])
def test_odd_bodies_are_refused_before_they_are_sized(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as info:
        reserve_input_tokens(body)
    assert info.value.param == "messages"


text_parts = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
message = st.one_of(
    st.builds(_user, text_parts),
    st.builds(_user, st.lists(st.builds(lambda t: {"type": "text", "text": t}, text_parts), max_size=3)),
    st.builds(lambda t, role: {"role": role, "content": t}, text_parts,
              st.sampled_from(["system", "user", "assistant", "tool"])),
)


@settings(max_examples=200)
@given(st.lists(message, min_size=1, max_size=8))
def test_reservation_estimate_is_never_below_the_typical_estimate(messages: list[dict[str, Any]]) -> None:
    body = {"messages": messages}
    upper, typical = reserve_input_tokens(body), typical_input_tokens(body)
    assert upper >= typical
    # and never below a third of the UTF-8 bytes it carries
    total_bytes = 0
    for m in messages:
        c = m["content"]
        total_bytes += len(c.encode()) if isinstance(c, str) else sum(len(p["text"].encode()) for p in c)
    assert upper >= total_bytes / 3


# ---------------------------------------------------------------- output allowance


def test_default_output_allowance_is_the_model_maximum() -> None:
    assert max_output_tokens({}, CHAT) == 1000
    assert max_output_tokens({"max_tokens": None}, CHAT) == 1000


@pytest.mark.parametrize(("body", "expected"), [
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 50}, 50),
    ({"max_completion_tokens": 50, "max_tokens": 900}, 50),
    ({"max_completion_tokens": None, "max_tokens": 70}, 70),
    ({"max_tokens": 1000}, 1000),
    ({"max_tokens": 1}, 1),
])
def test_max_tokens_and_max_completion_tokens_are_honoured(body: dict[str, Any], expected: int) -> None:
    assert max_output_tokens(body, CHAT) == expected


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_over_the_model_maximum_is_invalid(key: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        max_output_tokens({key: 1001}, CHAT)
    assert info.value.param == key and info.value.status == 400
    assert "1001" in info.value.message and "1000" in info.value.message


@pytest.mark.parametrize("value", [0, -1, 1.5, 100.0, "100", True, [10], {"n": 1}])
@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_non_positive_or_non_int_allowance_is_invalid(key: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        max_output_tokens({key: value}, CHAT)
    assert info.value.param == key


# ---------------------------------------------------------------- sizing


def test_chat_reservation_covers_input_upper_bound_and_output_allowance() -> None:
    body = {"messages": [_user("hello")], "max_tokens": 100}
    res = size_request(_req(body), CHAT, ROUTE)
    assert res == Reservation(9, 100, 9 * 150 + 100 * 600)
    assert res.amount_nanos == 61_350


def test_chat_reservation_without_max_tokens_uses_the_model_maximum() -> None:
    res = size_request(_req({"messages": [_user("hello")]}), CHAT, ROUTE)
    assert res.output_tokens == 1000 and res.amount_nanos == 9 * 150 + 1000 * 600


def test_chat_reservation_refuses_bad_max_tokens() -> None:
    with pytest.raises(InvalidRequest):
        size_request(_req({"messages": [_user("x")], "max_tokens": 5000}), CHAT, ROUTE)


def test_embedding_reservation_has_no_output() -> None:
    res = size_embedding({"input": ["abcdef", "abcdefg"], "max_tokens": 5000}, EMB_ROUTE)
    assert res == Reservation(2 + 3, 0, 5 * 20)


# ---------------------------------------------------------------- settlement


def test_charge_for_is_the_exact_price_when_under_the_reservation() -> None:
    usage = Usage(12, 30)
    assert charge_for(usage, ROUTE, 10**9) == (12 * 150 + 30 * 600, 12 * 150 + 30 * 600)


def test_charge_for_caps_at_the_reservation() -> None:
    usage = Usage(12, 30)  # 19800
    charge, price = charge_for(usage, ROUTE, 5_000)
    assert (charge, price) == (5_000, 19_800)
    assert charge_for(usage, ROUTE, 19_800) == (19_800, 19_800)
    assert charge_for(usage, ROUTE, 0) == (0, 19_800)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**12))
def test_charge_for_never_passes_reserved_nor_price(pt: int, ct: int, reserved: int) -> None:
    charge, price = charge_for(Usage(pt, ct), ROUTE, reserved)
    assert price == charge_nanos(pt, ct, ROUTE.input_price, ROUTE.output_price)
    assert charge == min(price, reserved) and 0 <= charge


_PRICES = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@given(_PRICES, _PRICES, st.integers(0, 10**7), st.integers(0, 10**7))
def test_route_charge_is_money_charge_nanos_whatever_the_price(input_price: Decimal, output_price: Decimal,
                                                               pt: int, ct: int) -> None:
    """The integer fast path (whole nano-USD per token) and the Decimal path (finer prices, rounded
    half up once) give the same amount."""
    route = Route(id="p/x", kind="official", bucket="credit", input_price=input_price, output_price=output_price,
                  channels=(ChannelRef("c", "up"),), model_id="p")
    assert route_charge(pt, ct, route) == charge_nanos(pt, ct, input_price, output_price)


def test_route_charge_rounds_a_sub_nano_price_half_up_once() -> None:
    route = Route(id="p/x", kind="official", bucket="credit", input_price=Decimal("0.0005"),
                  output_price=Decimal("0.0015"), channels=(ChannelRef("c", "up"),), model_id="p")
    assert route_charge(1, 1, route) == 2  # 0.5 + 1.5 = 2.0 exactly, not 1 + 2 rounded per term
    assert route_charge(1, 0, route) == 1  # 0.5 rounds half up


def test_usage_totals() -> None:
    usage = Usage(12, 30)
    assert usage.total_tokens == 42
    assert usage.as_dict() == {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42, "cache_read_tokens": 0,
                               "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "reasoning_tokens": 0}


# ---------------------------------------------------------------- usage_from


def test_usage_from_a_sane_payload() -> None:
    assert usage_from({"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}) == Usage(12, 30)
    assert usage_from({"prompt_tokens": 7, "total_tokens": 7}) == Usage(7, 0)  # embeddings
    assert usage_from({"prompt_tokens": 0, "completion_tokens": 0}) == Usage(0, 0)


@pytest.mark.parametrize("payload", [
    None, "usage", 42, [12, 30], {},
    {"completion_tokens": 30},
    {"prompt_tokens": -1, "completion_tokens": 3},
    {"prompt_tokens": 3, "completion_tokens": -1},
    {"prompt_tokens": "12", "completion_tokens": 30},
    {"prompt_tokens": 12, "completion_tokens": "30"},
    {"prompt_tokens": 12.0, "completion_tokens": 30},
    {"prompt_tokens": 12, "completion_tokens": 1.5},
    {"prompt_tokens": None, "completion_tokens": 30},
    {"prompt_tokens": 12, "completion_tokens": None},
    {"prompt_tokens": [12], "completion_tokens": 30},
])
def test_usage_from_rejects_garbage(payload: Any) -> None:
    assert usage_from(payload) is None


@pytest.mark.parametrize("payload", [
    {"prompt_tokens": True, "completion_tokens": 30},
    {"prompt_tokens": 12, "completion_tokens": True},
    {"prompt_tokens": False, "completion_tokens": False},
])
def test_usage_from_rejects_booleans(payload: Any) -> None:
    # JSON true/false is not a token count (bool is an int subclass in Python).
    assert usage_from(payload) is None


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize(("value", "upper", "typical"), [
    ("abcdef", 2, 2),
    ("abcdefg", 3, 2),
    ("a", 1, 1),
    ("日本", 2, 2),                       # 6 bytes
    (["abc", "abcd"], 1 + 2, 1 + 1),
    (["", "x"], 1 + 1, 1 + 1),           # every input costs at least one token
    ([1, 2, 3], 3, 3),                   # one token array: one token per int
    ([[1, 2, 3], [4]], 4, 4),            # several token arrays
])
def test_embedding_estimators(value: Any, upper: int, typical: int) -> None:
    body = {"input": value}
    assert embedding_input_tokens(body, upper=True) == upper
    assert embedding_input_tokens(body, upper=False) == typical
    assert upper >= typical


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=100), min_size=1, max_size=10))
def test_embedding_upper_bound_at_least_typical(items: list[str]) -> None:
    body = {"input": items}
    assert embedding_input_tokens(body, upper=True) >= embedding_input_tokens(body, upper=False) >= len(items)


def test_embedding_inputs_normalises_to_a_list() -> None:
    assert embedding_inputs({"input": "hi"}) == ["hi"]
    assert embedding_inputs({"input": ["a", "b"]}) == ["a", "b"]


@pytest.mark.parametrize("body", [{}, {"input": ""}, {"input": []}, {"input": None}, {"input": 5},
                                  {"input": {"text": "x"}}])
def test_embedding_input_must_be_a_non_empty_string_or_array(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as info:
        embedding_input_tokens(body, upper=True)
    assert info.value.param == "input" and info.value.status == 400
