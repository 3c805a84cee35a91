"""Every token class at its price (SPEC §1 Money, §2 Receipt): the charge over classes, cost lines, the
upstream usage mappings (unary and streamed, against the providers' documented shapes) and what each
dialect reports back, checked with the official SDKs' own types. Pure: no database, no HTTP."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson
import pytest
from anthropic.types import Usage as AnthropicUsage
from hypothesis import given
from hypothesis import strategies as st
from openai.types import CompletionUsage
from openai.types.responses import ResponseUsage

from tokensforge.canonical import Usage, UsageReport
from tokensforge.catalog import ChannelRef, Route
from tokensforge.dialects import anthropic_messages, openai_chat, openai_responses
from tokensforge.money import classes_charge_nanos
from tokensforge.pricing import (
    CACHED_TURN, cached_turn_example, charge_for, class_tokens, cost_lines, max_input_price, route_charge,
    unpriced_cache_classes, usage_price, with_output,
)
from tokensforge.receipts import Trace, build_receipt
from tokensforge.upstream import anthropic as anthropic_up
from tokensforge.upstream import openai as openai_up
from tokensforge.upstream import openai_responses as responses_up


def _route(input_price: str = "3", output_price: str = "15", read: str | None = "0.30", write: str | None = "3.75",
           write_1h: str | None = "6", route_id: str = "claude/official") -> Route:
    def price(text: str | None) -> Decimal | None:
        return None if text is None else Decimal(text)

    return Route(id=route_id, kind="official", bucket="credit", input_price=Decimal(input_price),
                 output_price=Decimal(output_price), channels=(ChannelRef("c", "up"),), model_id="claude",
                 cache_read_price_per_mtok=price(read), cache_write_price_per_mtok=price(write),
                 cache_write_1h_price_per_mtok=price(write_1h))


CLAUDE = _route()  # Anthropic's ratios: reads 0.1x, 5-minute writes 1.25x, 1-hour writes 2x
PLAIN = _route("0.06", "0.24", None, None, None, "m/routed")  # no cache price set


# ---------------------------------------------------------------- the charge


def test_the_issue_s_agent_turn_is_billed_at_cache_prices() -> None:
    """12 fresh + 9,000 cache reads + 3,000 cache writes in, no output: $0.0361 at the input price, but the
    provider's own prices make it 12 × 3000 + 9000 × 300 + 3000 × 3750 nano-USD."""
    usage = Usage.of(fresh_input=12, cache_read=9_000, cache_write=3_000, output=0)
    assert charge_for(usage, CLAUDE, 10**12) == (13_986_000, 13_986_000)
    assert charge_for(usage, PLAIN, 10**12)[1] == 12_012 * 60  # unpriced: every class at the input price


def test_a_class_the_route_does_not_price_costs_the_input_price_never_nothing() -> None:
    for cls, key, usage in (("cache_read", "read", Usage.of(fresh_input=0, cache_read=1_000, output=0)),
                            ("cache_write", "write", Usage.of(fresh_input=0, cache_write=1_000, output=0)),
                            ("cache_write_1h", "write_1h", Usage.of(fresh_input=0, cache_write_1h=1_000, output=0))):
        route = _route(**{key: None})
        assert usage_price(usage, route) == 1_000 * 3_000, cls
        assert cls in unpriced_cache_classes(route)
    assert unpriced_cache_classes(CLAUDE) == [] and unpriced_cache_classes(PLAIN) == [
        "cache_read", "cache_write", "cache_write_1h"]


def test_every_class_has_its_own_price() -> None:
    usage = Usage.of(fresh_input=1, cache_read=10, cache_write=100, cache_write_1h=1_000, output=10_000,
                     reasoning=4_000)
    assert usage_price(usage, CLAUDE) == 1 * 3_000 + 10 * 300 + 100 * 3_750 + 1_000 * 6_000 + 10_000 * 15_000


def test_reservations_price_input_at_the_highest_input_class() -> None:
    assert max_input_price(CLAUDE) == Decimal("6") and max_input_price(PLAIN) == Decimal("0.06")
    assert route_charge(1_000, 10, CLAUDE) == 1_000 * 6_000 + 10 * 15_000
    cheap_writes = _route(write="1", write_1h="2")  # cheaper than input: the input price is the highest
    assert max_input_price(cheap_writes) == Decimal("3")
    # no mix of classes of n input tokens costs more than the reservation of n input tokens
    for usage in (Usage.of(fresh_input=1_000, output=10), Usage.of(fresh_input=0, cache_write_1h=1_000, output=10),
                  Usage.of(fresh_input=300, cache_read=300, cache_write=200, cache_write_1h=200, output=10)):
        assert usage_price(usage, CLAUDE) <= route_charge(usage.prompt_tokens, 10, CLAUDE)


_PRICES = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
_COUNTS = st.integers(0, 10**7)


@given(st.lists(_PRICES, min_size=5, max_size=5), st.lists(_COUNTS, min_size=5, max_size=5))
def test_the_integer_path_and_the_exact_path_agree_over_every_class(prices: list[Decimal], counts: list[int]) -> None:
    """Whole nano-USD prices take plain integer arithmetic, finer ones the exact Decimal sum rounded once:
    both are Σ tokens × price rounded half up once (money.classes_charge_nanos)."""
    route = _route(*(str(p) for p in (prices[0], prices[4], prices[1], prices[2], prices[3])))
    usage = Usage.of(fresh_input=counts[0], cache_read=counts[1], cache_write=counts[2], cache_write_1h=counts[3],
                     output=counts[4])
    reference = classes_charge_nanos(zip(counts, (prices[0], prices[1], prices[2], prices[3], prices[4]),
                                         strict=True))
    assert usage_price(usage, route) == reference == charge_for(usage, route, 10**30)[1]
    lines = cost_lines(usage, route)
    assert [line["class"] for line in lines] == [c for c, n in zip(
        ("input", "cache_read", "cache_write", "cache_write_1h", "output"), counts, strict=True) if n]
    exact = sum((Decimal(line.get("exact_nanos", line["nanos"])) for line in lines), Decimal(0))
    assert int(exact.to_integral_value(rounding=ROUND_HALF_UP)) == reference  # the total rounds the lines' sum once
    assert abs(sum(line["nanos"] for line in lines) - reference) * 2 <= len(lines)
    if all((p * 1000) == (p * 1000).to_integral_value() for p in prices):  # whole nano-USD per token
        assert sum(line["nanos"] for line in lines) == reference and not any("exact_nanos" in x for x in lines)


def test_cost_lines_one_per_class_billed() -> None:
    usage = Usage.of(fresh_input=12, cache_read=9_000, output=30, reasoning=10)
    assert cost_lines(usage, CLAUDE) == [
        {"class": "input", "tokens": 12, "per_mtok": "3", "nanos": 36_000},
        {"class": "cache_read", "tokens": 9_000, "per_mtok": "0.30", "nanos": 2_700_000},
        {"class": "output", "tokens": 30, "per_mtok": "15", "nanos": 450_000},
    ]
    assert cost_lines(Usage(0, 0), CLAUDE) == []


def test_a_sub_nano_price_rounds_once_on_the_sum_and_lines_show_their_exact_amount() -> None:
    route = _route("0.0005", "0.0015", "0.0005", None, None)
    usage = Usage.of(fresh_input=1, cache_read=1, output=1)  # 0.5 + 0.5 + 1.5 = 2.5 → 3
    assert usage_price(usage, route) == 3
    lines = cost_lines(usage, route)
    assert [(line["nanos"], line["exact_nanos"]) for line in lines] == [(1, "0.5000"), (1, "0.5000"), (2, "1.5000")]
    assert sum(line["nanos"] for line in lines) == 4  # rounded per line: within half a nano per line of the price


def test_fresh_input_is_never_negative_even_from_an_inconsistent_usage() -> None:
    broken = Usage(10, 5, cache_read_tokens=20)
    assert class_tokens(broken) == (0, 20, 0, 0, 5)
    assert usage_price(broken, CLAUDE) == 20 * 300 + 5 * 15_000


def test_the_cached_turn_example_prices_a_mostly_cached_agent_turn() -> None:
    assert (CACHED_TURN.prompt_tokens, CACHED_TURN.cache_read_tokens, CACHED_TURN.completion_tokens) == (
        10_000, 9_000, 500)
    example = cached_turn_example(CLAUDE)
    assert example["price_nanos"] == 1_000 * 3_000 + 9_000 * 300 + 500 * 15_000 == 13_200_000
    assert example["uncached_price_nanos"] == 10_000 * 3_000 + 500 * 15_000
    assert example["price_usd"] == "0.013200000"


def test_a_cut_stream_keeps_the_input_classes_the_upstream_reported() -> None:
    """A stream billed for what it delivered keeps the reported cache reads and writes at their prices."""
    reported = Usage.of(fresh_input=12, cache_read=9_000, cache_write_1h=10, output=0)
    delivered = with_output(reported, 25)
    assert delivered == Usage.of(fresh_input=12, cache_read=9_000, cache_write_1h=10, output=25)
    assert with_output(Usage.of(fresh_input=1, output=50, reasoning=40), 10).reasoning_tokens == 10
    assert usage_price(delivered, CLAUDE) == 12 * 3_000 + 9_000 * 300 + 10 * 6_000 + 25 * 15_000


# ---------------------------------------------------------------- the receipt


def test_the_receipt_has_every_class_price_usage_class_and_the_cost_lines_of_what_was_billed() -> None:
    usage = Usage.of(fresh_input=12, cache_read=900, cache_write=30, cache_write_1h=3, output=40, reasoning=7)
    trace = Trace("req_1", "acc", None, "key", route=CLAUDE, usage=usage, billed=usage, status="succeeded")
    trace.charge_nanos, trace.price_nanos = charge_for(usage, CLAUDE, 10**12)
    receipt = build_receipt(trace)
    assert receipt["price"] == {"input_per_mtok": "3", "output_per_mtok": "15", "cache_read_per_mtok": "0.30",
                                "cache_write_per_mtok": "3.75", "cache_write_1h_per_mtok": "6",
                                "rounding": "half_up_nano"}
    assert receipt["usage"] == {"prompt_tokens": 945, "completion_tokens": 40, "total_tokens": 985,
                                "cache_read_tokens": 900, "cache_write_tokens": 30, "cache_write_1h_tokens": 3,
                                "reasoning_tokens": 7}
    assert [line["class"] for line in receipt["cost_lines"]] == [
        "input", "cache_read", "cache_write", "cache_write_1h", "output"]
    assert sum(line["nanos"] for line in receipt["cost_lines"]) == receipt["price_nanos"] == receipt["charge_nanos"]
    receipt["price"]["input_per_mtok"] = "0"  # a receipt's own copy: the next one is not changed
    assert build_receipt(trace)["price"]["input_per_mtok"] == "3"


def test_cost_lines_follow_what_was_billed_not_what_was_reported() -> None:
    reported = Usage.of(fresh_input=100, cache_read=1_000, output=500)
    delivered = Usage.of(fresh_input=100, cache_read=1_000, output=20)  # a broken stream: charged what arrived
    trace = Trace("req_1", "acc", None, "key", route=CLAUDE, usage=reported, billed=delivered, status="failed")
    lines = build_receipt(trace)["cost_lines"]
    assert lines[-1] == {"class": "output", "tokens": 20, "per_mtok": "15", "nanos": 300_000}
    unbilled = Trace("req_2", "acc", None, "key", route=CLAUDE, usage=reported, status="failed")
    assert build_receipt(unbilled)["cost_lines"] == []
    assert build_receipt(Trace("req_3", "acc", None, "key"))["cost_lines"] == []


# ---------------------------------------------------------------- OpenAI chat usage → classes

OPENAI_CHAT_CASES: list[tuple[str, dict[str, Any], Usage | None]] = [
    ("plain", {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}, Usage(100, 20)),
    ("cached tokens are inside prompt_tokens",
     {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
      "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                    "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
     Usage.of(fresh_input=86, cache_read=1920, output=300)),
    ("reasoning is inside completion_tokens",
     {"prompt_tokens": 10, "completion_tokens": 500, "completion_tokens_details": {"reasoning_tokens": 448}},
     Usage.of(fresh_input=10, output=500, reasoning=448)),
    ("OpenAI's own cache writes are inside prompt_tokens",
     {"prompt_tokens": 5000, "completion_tokens": 5,
      "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 3000}},
     Usage.of(fresh_input=1000, cache_read=1000, cache_write=3000, output=5)),
    ("LiteLLM in front of Anthropic: top-level cache counts inside prompt_tokens",
     {"prompt_tokens": 9112, "completion_tokens": 7, "cache_read_input_tokens": 9000,
      "cache_creation_input_tokens": 100}, Usage.of(fresh_input=12, cache_read=9000, cache_write=100, output=7)),
    ("prompt_tokens_details wins over the top-level copy",
     {"prompt_tokens": 50, "completion_tokens": 1, "cache_read_input_tokens": 40,
      "prompt_tokens_details": {"cached_tokens": 30}}, Usage.of(fresh_input=20, cache_read=30, output=1)),
    ("cached beyond the prompt is clamped", {"prompt_tokens": 10, "completion_tokens": 1,
                                             "prompt_tokens_details": {"cached_tokens": 50}},
     Usage.of(fresh_input=0, cache_read=10, output=1)),
    ("writes clamped to what reads leave", {"prompt_tokens": 10, "completion_tokens": 1,
                                            "prompt_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 9}},
     Usage.of(fresh_input=0, cache_read=6, cache_write=4, output=1)),
    ("reasoning beyond the output is clamped",
     {"prompt_tokens": 1, "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": 9}},
     Usage.of(fresh_input=1, output=3, reasoning=3)),
    ("null details", {"prompt_tokens": 4, "completion_tokens": 2, "prompt_tokens_details": None,
                      "completion_tokens_details": None}, Usage(4, 2)),
    ("a bad part is not trusted, the totals are",
     {"prompt_tokens": 4, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": -3}}, Usage(4, 2)),
    ("a negative total is refused", {"prompt_tokens": -1, "completion_tokens": 2}, None),
]


@pytest.mark.parametrize(("name", "raw", "expected"), OPENAI_CHAT_CASES, ids=[c[0] for c in OPENAI_CHAT_CASES])
def test_openai_chat_usage_maps_each_class_once(name: str, raw: dict[str, Any], expected: Usage | None) -> None:
    assert openai_up.usage_of(raw) == expected
    if expected is not None:
        assert expected.fresh_input_tokens >= 0 and expected.prompt_tokens == raw["prompt_tokens"]


@pytest.mark.parametrize(("name", "raw", "expected"), OPENAI_CHAT_CASES[:5], ids=[c[0] for c in OPENAI_CHAT_CASES[:5]])
def test_openai_chat_usage_streamed_in_the_last_chunk(name: str, raw: dict[str, Any], expected: Usage) -> None:
    decoder = openai_up.StreamDecoder()
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], "usage": raw}
    frame = decoder.feed(None, orjson.dumps(chunk))
    assert frame is not None and frame.events == (UsageReport(expected),)


# ---------------------------------------------------------------- OpenAI Responses usage → classes

RESPONSES_CASES: list[tuple[str, Any, Usage | None]] = [
    ("documented shape", {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 256},
                          "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 30}, "total_tokens": 380},
     Usage.of(fresh_input=72, cache_read=256, output=52, reasoning=30)),
    ("cache writes split by retention",
     {"input_tokens": 10_000, "output_tokens": 1,
      "input_tokens_details": {"cached_tokens": 1_000, "cache_write_tokens": 8_000,
                               "cache_write_tokens_details": {"ttl_30m_tokens": 6_000, "ttl_12h_tokens": 2_000}}},
     Usage.of(fresh_input=1_000, cache_read=1_000, cache_write=6_000, cache_write_1h=2_000, output=1)),
    ("a retention split beyond the writes is clamped",
     {"input_tokens": 100, "output_tokens": 1,
      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 10,
                               "cache_write_tokens_details": {"ttl_30m_tokens": 0, "ttl_12h_tokens": 50}}},
     Usage.of(fresh_input=90, cache_write_1h=10, output=1)),
    ("cached beyond the input is clamped", {"input_tokens": 5, "output_tokens": 0,
                                            "input_tokens_details": {"cached_tokens": 9}},
     Usage.of(fresh_input=0, cache_read=5, output=0)),
    ("no details", {"input_tokens": 5, "output_tokens": 2}, Usage(5, 2)),
    ("not an object", None, None),
    ("no input count", {"output_tokens": 2}, None),
    ("a float is not a count", {"input_tokens": 1.5, "output_tokens": 2}, None),
]


@pytest.mark.parametrize(("name", "raw", "expected"), RESPONSES_CASES, ids=[c[0] for c in RESPONSES_CASES])
def test_responses_usage_maps_each_class_once(name: str, raw: Any, expected: Usage | None) -> None:
    assert responses_up.usage_of(raw) == expected


# ---------------------------------------------------------------- Anthropic usage → classes

ANTHROPIC_CASES: list[tuple[str, dict[str, Any], Usage | None]] = [
    ("input_tokens is fresh only; the cache counts come on top",
     {"input_tokens": 12, "output_tokens": 30, "cache_read_input_tokens": 9_000, "cache_creation_input_tokens": 3_000},
     Usage.of(fresh_input=12, cache_read=9_000, cache_write=3_000, output=30)),
    ("the TTL split wins",
     {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 300,
      "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}},
     Usage.of(fresh_input=5, cache_write=100, cache_write_1h=200, output=1)),
    ("a split short of the total: the rest is 5-minute writes",
     {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 300,
      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 200}},
     Usage.of(fresh_input=5, cache_write=100, cache_write_1h=200, output=1)),
    ("a split beyond the total: the split is billed",
     {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 100,
      "cache_creation": {"ephemeral_5m_input_tokens": 50, "ephemeral_1h_input_tokens": 150}},
     Usage.of(fresh_input=5, cache_write=50, cache_write_1h=150, output=1)),
    ("a split without the total",
     {"input_tokens": 5, "output_tokens": 1, "cache_creation": {"ephemeral_1h_input_tokens": 40}},
     Usage.of(fresh_input=5, cache_write_1h=40, output=1)),
    ("an unusable split: all 5-minute",
     {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 70,
      "cache_creation": {"ephemeral_5m_input_tokens": None, "ephemeral_1h_input_tokens": "x"}},
     Usage.of(fresh_input=5, cache_write=70, output=1)),
    ("null cache counts are 0", {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": None,
                                 "cache_creation_input_tokens": None, "cache_creation": None}, Usage(5, 1)),
    ("a negative cache count is refused", {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": -1}, None),
]


@pytest.mark.parametrize(("name", "raw", "expected"), ANTHROPIC_CASES, ids=[c[0] for c in ANTHROPIC_CASES])
def test_anthropic_usage_maps_each_class_once(name: str, raw: dict[str, Any], expected: Usage | None) -> None:
    assert anthropic_up.usage_of(raw) == expected
    if expected is not None:  # the unary answer reads the same
        message = {"type": "message", "content": [], "stop_reason": "end_turn", "model": "m", "usage": raw}
        assert anthropic_up.parse_response(message).usage == expected


STREAM_CASES: list[tuple[str, dict[str, Any], dict[str, Any], Usage]] = [
    ("Anthropic: message_start baseline, message_delta the output",
     {"input_tokens": 12, "cache_read_input_tokens": 9_000, "cache_creation_input_tokens": 100, "output_tokens": 1,
      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 100}},
     {"output_tokens": 30},
     Usage.of(fresh_input=12, cache_read=9_000, cache_write_1h=100, output=30)),
    ("Anthropic today: message_delta repeats every count (cumulative)",
     {"input_tokens": 12, "cache_read_input_tokens": 9_000, "cache_creation_input_tokens": 0, "output_tokens": 1},
     {"input_tokens": 12, "cache_read_input_tokens": 9_000, "cache_creation_input_tokens": 0, "output_tokens": 30},
     Usage.of(fresh_input=12, cache_read=9_000, output=30)),
    ("a null field on message_delta keeps the baseline",
     {"input_tokens": 12, "cache_read_input_tokens": 90, "cache_creation_input_tokens": 10, "output_tokens": 1},
     {"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 8},
     Usage.of(fresh_input=12, cache_read=90, cache_write=10, output=8)),
    ("a relay reports the cache counts only on message_delta (fresh input_tokens on message_start)",
     {"input_tokens": 12, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 1},
     {"output_tokens": 30, "cache_read_input_tokens": 9_000, "cache_creation_input_tokens": 40},
     Usage.of(fresh_input=12, cache_read=9_000, cache_write=40, output=30)),
    ("a relay's cache-inclusive input_tokens on message_start, cache counts on message_delta",
     {"input_tokens": 9_052, "output_tokens": 1},
     {"output_tokens": 30, "cache_read_input_tokens": 9_000, "cache_creation_input_tokens": 40},
     Usage.of(fresh_input=12, cache_read=9_000, cache_write=40, output=30)),
    ("the TTL split merges per field",
     {"input_tokens": 1, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 0, "output_tokens": 1,
      "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 0}},
     {"output_tokens": 2, "cache_creation_input_tokens": 50,
      "cache_creation": {"ephemeral_1h_input_tokens": 20}},
     Usage.of(fresh_input=1, cache_write=30, cache_write_1h=20, output=2)),
]


@pytest.mark.parametrize(("name", "start", "delta", "expected"), STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_anthropic_stream_usage_merges_per_field(name: str, start: dict[str, Any], delta: dict[str, Any],
                                                  expected: Usage) -> None:
    assert anthropic_up.usage_of(anthropic_up.merge_stream_usage(start, delta)) == expected
    decoder = anthropic_up.StreamDecoder()
    first = decoder.feed("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "usage": start}})
    assert isinstance(first.events[0], UsageReport) and not first.events[0].final
    last = decoder.feed("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                          "usage": delta})
    assert last.events[-1] == UsageReport(expected)


def test_the_baseline_alone_bills_the_input_of_a_cut_stream() -> None:
    decoder = anthropic_up.StreamDecoder()
    frame = decoder.feed("message_start", {"type": "message_start", "message": {"usage": {
        "input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 9_000, "cache_creation_input_tokens": 5}}})
    assert frame.events == (UsageReport(Usage.of(fresh_input=12, cache_read=9_000, cache_write=5, output=0),
                                        final=False),)


# ---------------------------------------------------------------- what each dialect reports back

REPORTED = Usage.of(fresh_input=12, cache_read=9_000, cache_write=300, cache_write_1h=100, output=40, reasoning=7)


def test_chat_reports_the_classes_in_chat_fields_the_sdk_reads() -> None:
    body = openai_chat.usage_json(REPORTED)
    sdk = CompletionUsage.model_validate(body, strict=True)
    assert sdk.prompt_tokens == 9_412 and sdk.completion_tokens == 40 and sdk.total_tokens == 9_452
    assert sdk.prompt_tokens_details is not None and sdk.prompt_tokens_details.cached_tokens == 9_000
    assert sdk.prompt_tokens_details.cache_write_tokens == 400
    assert sdk.completion_tokens_details is not None and sdk.completion_tokens_details.reasoning_tokens == 7
    # read back by the OpenAI codec: the same classes (chat has no TTL: 1-hour writes come back as writes)
    assert openai_up.usage_of(body) == Usage.of(fresh_input=12, cache_read=9_000, cache_write=400, output=40,
                                                reasoning=7)


def test_responses_reports_the_classes_in_responses_fields_the_sdk_reads() -> None:
    body = openai_responses._usage_json(REPORTED)
    sdk = ResponseUsage.model_validate(body, strict=True)
    assert sdk.input_tokens == 9_412 and sdk.output_tokens == 40 and sdk.total_tokens == 9_452
    assert sdk.input_tokens_details.cached_tokens == 9_000 and sdk.input_tokens_details.cache_write_tokens == 400
    assert sdk.output_tokens_details.reasoning_tokens == 7
    assert responses_up.usage_of(body) == Usage.of(fresh_input=12, cache_read=9_000, cache_write=400, output=40,
                                                   reasoning=7)


def test_messages_reports_fresh_input_apart_from_cache_reads_and_writes() -> None:
    body = anthropic_messages.usage_json(REPORTED)
    sdk = AnthropicUsage.model_validate(body, strict=True)
    assert sdk.input_tokens == 12 and sdk.output_tokens == 40
    assert sdk.cache_read_input_tokens == 9_000 and sdk.cache_creation_input_tokens == 400
    assert sdk.cache_creation is not None
    assert (sdk.cache_creation.ephemeral_5m_input_tokens, sdk.cache_creation.ephemeral_1h_input_tokens) == (300, 100)
    # Anthropic's shape keeps every class: it reads back to the same usage, reasoning aside (Messages has no field)
    assert anthropic_up.usage_of(body) == Usage.of(fresh_input=12, cache_read=9_000, cache_write=300,
                                                   cache_write_1h=100, output=40)


@pytest.mark.parametrize("usage", [Usage(5, 1), REPORTED, Usage.of(fresh_input=0, cache_read=7, output=0)])
def test_no_dialect_loses_or_doubles_input(usage: Usage) -> None:
    chat = openai_chat.usage_json(usage)
    responses = openai_responses._usage_json(usage)
    messages = anthropic_messages.usage_json(usage)
    assert chat["prompt_tokens"] == responses["input_tokens"] == usage.prompt_tokens == (
        messages["input_tokens"] + messages["cache_read_input_tokens"] + messages["cache_creation_input_tokens"])
