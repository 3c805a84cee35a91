"""Hostile clients and lying upstreams (SPEC §1 cost-bearing fields, §5.6): a clear 4xx or an upstream
failure, never a 500, a leak or an unbilled answer."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tokensforge.mock_upstream import prompt_tokens
from tokensforge.money import charge_nanos

from .harness import Gw, gateway_settings, gateway_of, start_gateway, write_catalog

MESSAGES = [{"role": "user", "content": "hello there"}]
FUNDS = {"credit": 10**9, "routed": 10**9}


async def _stream(gw: Gw, key: str, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]], str]:
    """(status, data events, request id) of a raw streamed request."""
    events: list[dict[str, Any]] = []
    async with gw.session.post(gw.url + "/v1/chat/completions", data=orjson.dumps({**body, "stream": True}),
                               headers={"authorization": f"Bearer {key}"}) as r:
        async for line in r.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append(orjson.loads(line[6:]))
        return r.status, events, r.headers["x-request-id"]


def _slots_back(gw: Gw) -> None:
    upstream = gw.gateway.upstream
    assert upstream is not None
    for channel_id, sem in upstream._limits.items():
        assert sem._value == gw.catalog.channels[channel_id].max_concurrency, f"slot of {channel_id} leaked"


@pytest.mark.parametrize("options", [[["include_usage", True]], 5, "yes", {"include_usage": "yes"}])
async def test_stream_options_must_be_an_object(gw: Gw, options: Any) -> None:
    _, key = await gw.account(**FUNDS)
    status, body, headers = await gw.post("/v1/chat/completions", key, {
        "model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "stream_options": options})
    assert status == 400 and body["error"]["param"] == "stream_options", body
    assert headers["x-should-retry"] == "false"
    assert (await gw.balances(key))["credit"]["reserved_nanos"] == 0
    _slots_back(gw)


async def test_n_is_reserved_for_and_refused_beyond_the_cap(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    quote_one = (await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 10}))[1]
    quote_eight = (await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 10,
                                                    "n": 8}))[1]
    assert quote_eight["max_output_tokens"] == 8 * quote_one["max_output_tokens"] == 80
    assert quote_eight["reserve_nanos"] > quote_one["reserve_nanos"]
    status, body, _ = await gw.post("/v1/chat/completions", key, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                                 "n": 9})
    assert status == 400 and body["error"]["param"] == "n"


async def test_both_output_caps_forward_exactly_the_one_reserved_for(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    reply = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=1, max_tokens=900)  # type: ignore[arg-type]
    sent = (await gw.mock.stats())["last_request"]["body"]
    assert sent["max_completion_tokens"] == 1 and "max_tokens" not in sent
    receipt = reply.model_extra["receipt"]  # type: ignore[index]
    quote = (await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                              "max_completion_tokens": 1}))[1]
    assert receipt["reserved_nanos"] == quote["reserve_nanos"]
    assert reply.usage is not None and reply.usage.completion_tokens == 1


async def test_media_parts_get_an_allowance_each(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}
    plain = (await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "max_tokens": 1,
                                              "messages": [{"role": "user", "content": [{"type": "text",
                                                                                         "text": "hi"}]}]}))[1]
    many = (await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}] + [image] * 10}]}))[1]
    assert many["estimated_input_tokens"] >= plain["estimated_input_tokens"] + 10 * 2000
    status, body, _ = await gw.post("/v1/chat/completions", key, {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
    assert status == 400 and "cannot be priced" in body["error"]["message"]


@pytest.mark.parametrize("field,value", [("audio", {"voice": "alloy", "format": "wav"}),
                                         ("prediction", {"type": "content", "content": "x"}),
                                         ("modalities", ["text", "audio"]), ("service_tier", "priority")])
async def test_fields_that_cannot_be_priced_are_refused(gw: Gw, field: str, value: Any) -> None:
    _, key = await gw.account(**FUNDS)
    status, body, _ = await gw.post("/v1/chat/completions", key, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                                 field: value})
    assert status == 400 and body["error"]["param"] == field, body


@pytest.mark.parametrize("kind", ["bad_delta", "bad_choices", "long_line", "error_event"])
async def test_a_malformed_upstream_stream_ends_with_an_error_event_and_releases_everything(gw: Gw,
                                                                                            kind: str) -> None:
    """Routed route (charge_delivered): the two good chunks delivered are billed; the client gets an error
    event, not a hang; slot, reservation and renewal are released; one usage record."""
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-relay-a": {"malformed_stream": kind}, "up-relay-b": {"malformed_stream": kind}})
    status, events, request_id = await _stream(gw, key, {"model": "gpt-4o-mini", "messages": MESSAGES,
                                                         "route": "routed"})
    assert status == 200
    assert "error" in events[-1] and events[-1]["error"]["code"] == "upstream_error", events[-1]
    receipt = (await gw.get(f"/v1/receipts/{request_id}", key))[1]
    assert receipt["status"] == "failed"
    assert receipt["usage"]["completion_tokens"] == 2 and receipt["charge_nanos"] > 0  # charge_delivered
    balances = await gw.balances(key)
    assert balances["routed"]["reserved_nanos"] == 0
    assert balances["routed"]["balance_nanos"] == FUNDS["routed"] - receipt["charge_nanos"]
    _slots_back(gw)


async def test_a_malformed_stream_on_a_free_route_is_not_charged(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"malformed_stream": "bad_delta"}})
    _, events, request_id = await _stream(gw, key, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert "error" in events[-1]
    receipt = (await gw.get(f"/v1/receipts/{request_id}", key))[1]
    assert receipt["status"] == "failed" and receipt["charge_nanos"] == 0 and receipt["ledger_entry_id"] is None


async def test_a_200_carrying_an_error_is_a_failure_retried_and_never_billed(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-relay-a": {"error_in_200": True}})
    reply = await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore
                                                         extra_headers={"x-tokensforge-route": "routed"})
    receipt = reply.model_extra["receipt"]  # type: ignore[index]
    assert [a["outcome"] for a in receipt["attempts"]] == ["malformed", "ok"]
    assert receipt["channels"]["served_by"] == "relay-b"
    await gw.mock.faults(**{"up-official": {"error_in_200": True}})
    with pytest.raises(openai.APIStatusError) as caught:
        await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore
    assert caught.value.status_code == 502
    assert (await gw.balances(key))["credit"]["balance_nanos"] == FUNDS["credit"]


async def test_absurd_usage_is_treated_as_missing(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"absurd_usage": True}})
    reply = await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore
                                                         max_tokens=4)
    receipt = reply.model_extra["receipt"]  # type: ignore[index]
    assert receipt["usage_source"] == "estimated"
    assert receipt["usage"]["prompt_tokens"] < 100 and receipt["charge_nanos"] <= receipt["reserved_nanos"]


async def test_an_upstream_body_over_the_cap_is_a_failure(dsn: str, gw: Gw, tmp_path: Path) -> None:
    settings = gateway_settings(write_catalog(tmp_path / "c.toml", gw.mock.url), max_upstream_body_bytes=200)
    ctx, url, app = await start_gateway(settings, dsn)
    async with ctx:
        gateway = gateway_of(app)
        assert gateway.upstream is not None and gateway.upstream.max_body_bytes == 200
        _, key = await gw.account(**FUNDS)
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                    json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50}) as r:
                body = await r.json()
                assert r.status == 502 and body["error"]["code"] == "upstream_error", body
        assert (await gw.balances(key))["credit"]["balance_nanos"] == FUNDS["credit"]


async def test_upstream_usage_beyond_the_reservation_is_capped_and_counted(gw: Gw) -> None:
    """The upstream lies about usage (more than the cap allows): the charge stops at the reservation, the
    receipt shows both amounts, and the gap is counted."""
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"completion_tokens": 900}})
    before = await gw.counter("tokensforge_undercharged_nanos_total")
    async with gw.session.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                               json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 1}) as r:
        receipt = (await r.json())["receipt"]
    assert receipt["price_nanos"] == charge_nanos(prompt_tokens(MESSAGES), 900, Decimal("0.15"), Decimal("0.60"))
    assert receipt["charge_nanos"] == receipt["reserved_nanos"] < receipt["price_nanos"]
    assert await gw.counter("tokensforge_undercharged_nanos_total") - before == \
        receipt["price_nanos"] - receipt["charge_nanos"]


async def test_relay_routing_fields_are_refused_naming_them(gw: Gw) -> None:
    """OpenRouter-style `provider` (sent through the SDK's extra_body) would reach the upstream unpriced."""
    _, key = await gw.account(**FUNDS)
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
            extra_body={"provider": {"order": ["cheap-relay"]}})
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "provider" and "provider" in error["message"]
    assert (await gw.balances(key))["credit"]["reserved_nanos"] == 0
    _slots_back(gw)


async def test_a_big_reasoning_content_is_reserved_for(gw: Gw) -> None:
    """540 kB in an assistant message's `reasoning_content` is forwarded to an OpenAI-kind channel as sent:
    the reservation covers its ~180k tokens (the old sizing quoted 18 tokens)."""
    _, key = await gw.account(**FUNDS)
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok", "reasoning_content": "x" * 540_000},
                {"role": "user", "content": "go on"}]
    reply = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=messages, max_tokens=5)  # type: ignore[arg-type]
    sent = (await gw.mock.stats())["last_request"]["body"]
    assert len(sent["messages"][1]["reasoning_content"]) == 540_000  # forwarded as sent
    receipt = reply.model_extra["receipt"]  # type: ignore[index]
    cheapest_input_nanos = 60  # gpt-4o-mini's cheapest input price here ($0.06 / 1M tokens), per token
    assert receipt["reserved_nanos"] >= 180_000 * cheapest_input_nanos
    quote = (await gw.post("/v1/quote", key, {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 5}))[1]
    assert quote["estimated_input_tokens"] >= 180_000
