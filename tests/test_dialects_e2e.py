"""What every client dialect (chat completions, Responses, Messages) shares, end to end over raw HTTP:
receipts that match the ledger and the catalog prices, x-tokensforge-* headers, route pinning, 402s in the
dialect's error shape, failover across channels (also across channel kinds), mid-stream upstream failures
settled per the route's on_failure, and quotes that reserve what the real request reserves.

SDK-level behaviour of each dialect is in test_dialect_responses_e2e.py / test_dialect_messages_e2e.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from .harness import Gw

FUNDS = 10**9
TEXT = "Say hello to the ledger."


@dataclass(frozen=True)
class Dialect:
    name: str
    path: str
    id_prefix: str
    body: Callable[[str, int, bool], dict[str, Any]]
    #: the receipt a successful stream ends with, from its parsed events
    stream_receipt: Callable[[list[tuple[str | None, Any]]], dict[str, Any]]
    #: the error a failed stream ends with, from its parsed events
    stream_error: Callable[[list[tuple[str | None, Any]]], dict[str, Any]]


def _chat_body(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": TEXT}],
                            "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _chat_receipt(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    (receipt,) = [data["receipt"] for _, data in events if isinstance(data, dict) and "receipt" in data]
    assert events[-1] == (None, "[DONE]")
    return dict(receipt)


def _chat_error(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    name, data = events[-1]
    assert name is None and set(data) == {"error"}, events[-1]  # SPEC §2: one last `data: {"error": …}`
    return dict(data["error"])


def _responses_receipt(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    name, data = events[-1]
    assert name == data["type"] == "response.completed", events[-1]
    return dict(data["response"]["receipt"])


def _responses_error(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    (failed_name, failed), (name, data) = events[-2:]
    assert failed_name == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["message"]
    assert name == "error" and isinstance(data["error"], dict)  # the SDK raises APIError on it
    return dict(data["error"])


def _messages_receipt(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    name, data = events[-2]
    assert name == "message_delta", events[-2]
    return dict(data["receipt"])


def _messages_error(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    name, data = events[-1]
    assert name == "error" and data["type"] == "error", events[-1]
    return dict(data["error"])


DIALECTS = [
    Dialect("chat", "/v1/chat/completions", "chatcmpl-", _chat_body, _chat_receipt, _chat_error),
    Dialect("responses", "/v1/responses", "resp_",
            lambda model, n, stream: {"model": model, "input": TEXT, "max_output_tokens": n, "stream": stream},
            _responses_receipt, _responses_error),
    Dialect("messages", "/v1/messages", "msg_",
            lambda model, n, stream: {"model": model, "messages": [{"role": "user", "content": TEXT}],
                                      "max_tokens": n, "stream": stream},
            _messages_receipt, _messages_error),
]
DIALECT_IDS = [d.name for d in DIALECTS]


def parse_sse(text: str) -> list[tuple[str | None, Any]]:
    """(event name or None, JSON data or the raw string) per SSE event."""
    events: list[tuple[str | None, Any]] = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            joined = "\n".join(data)
            events.append((name, joined if joined == "[DONE]" else orjson.loads(joined)))
    return events


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any  # JSON (unary, errors) or parsed SSE events


async def call(gw: Gw, dialect: Dialect, key: str, model: str, *, max_tokens: int = 20, stream: bool = False,
               headers: dict[str, str] | None = None, **extra: Any) -> Answer:
    body = {**dialect.body(model, max_tokens, stream), **extra}
    async with gw.session.post(gw.url + dialect.path, data=orjson.dumps(body), headers={
            "authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}) as r:
        text = await r.text()
        streamed = r.headers.get("content-type", "").startswith("text/event-stream")
        headers = {k.lower(): v for k, v in r.headers.items()}
        return Answer(r.status, headers, parse_sse(text) if streamed else orjson.loads(text))


def answer_receipt(dialect: Dialect, answer: Answer, stream: bool) -> tuple[dict[str, Any], str]:
    """(receipt, the answer's own id) of a successful answer."""
    assert answer.status == 200, answer.body
    if not stream:
        return answer.body["receipt"], answer.body["id"]
    receipt = dialect.stream_receipt(answer.body)
    return receipt, dialect.id_prefix + receipt["request_id"].removeprefix("req_")


async def short_answers(gw: Gw, tokens: int, *upstream_models: str) -> None:
    await gw.mock.faults(**{m: {"completion_tokens": tokens} for m in upstream_models})


# ------------------------------------------------------------------ billing, headers, receipts
# Each test runs its unary and streamed (or per-route) cases in one gateway: a gateway per case would
# spend most of the suite's time starting gateways.


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
async def test_receipt_matches_prices_ledger_and_headers(gw: Gw, dialect: Dialect) -> None:
    _, key = await gw.account(credit=FUNDS, routed=FUNDS)
    await short_answers(gw, 7, "up-official")
    spent = 0
    for stream in (False, True):
        answer = await call(gw, dialect, key, "gpt-4o-mini", stream=stream)
        receipt, answer_id = answer_receipt(dialect, answer, stream)
        assert answer_id.startswith(dialect.id_prefix)
        assert receipt["route"] == {"id": "gpt-4o-mini/official", "kind": "official"}
        assert receipt["bucket"] == "credit" and receipt["fallback"]["used"] is False
        assert receipt["usage"]["completion_tokens"] == 7
        charge = await gw.assert_billed(key, receipt, answer_id)  # also: /v1/receipts/{chatcmpl-|resp_|msg_…}
        spent += charge
        h = answer.headers
        assert h["x-request-id"] == receipt["request_id"]
        assert (h["x-tokensforge-route"], h["x-tokensforge-route-kind"], h["x-tokensforge-bucket"]) == (
            "gpt-4o-mini/official", "official", "credit")
        assert h["x-tokensforge-upstream-model"] == "up-official"
        assert int(h["x-tokensforge-reserved-nanos"]) == receipt["reserved_nanos"] >= charge
        if not stream:
            assert (h["x-tokensforge-channel"], h["x-tokensforge-fallback"]) == ("official-a", "none")
            assert h["x-tokensforge-charge-nanos"] == str(charge)
            assert h["x-tokensforge-ledger-entry"] == receipt["ledger_entry_id"]
        balances = await gw.balances(key)
        assert balances["credit"]["balance_nanos"] == FUNDS - spent and balances["credit"]["reserved_nanos"] == 0
        assert balances["routed"]["balance_nanos"] == FUNDS


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
async def test_route_pinning_changes_bucket_and_price(gw: Gw, dialect: Dialect) -> None:
    _, key = await gw.account(credit=FUNDS, routed=FUNDS)
    await short_answers(gw, 5, "up-official", "up-relay-a", "up-claude", "up-claude-relay")
    spent = {"credit": 0, "routed": 0}
    for model in ("gpt-4o-mini", "claude-test"):
        official, routed = gw.catalog.routes[f"{model}/official"], gw.catalog.routes[f"{model}/routed"]
        plain = await call(gw, dialect, key, model)
        # pinned by header for one request, by the body's "route" field for the other (SPEC §1)
        by_header = await call(gw, dialect, key, model, headers={"x-tokensforge-route": "routed"})
        by_body = await call(gw, dialect, key, model, route=routed.id)
        assert "route" not in (await gw.mock.stats())["last_request"]["body"]  # not forwarded upstream
        receipts = [answer_receipt(dialect, a, False)[0] for a in (plain, by_header, by_body)]
        assert [r["bucket"] for r in receipts] == ["credit", "routed", "routed"]
        assert [r["route"]["id"] for r in receipts] == [official.id, routed.id, routed.id]
        assert receipts[1]["price"] == {"input_per_mtok": str(routed.input_price),
                                        "output_per_mtok": str(routed.output_price),
                                        "cache_read_per_mtok": str(routed.cache_read_price),
                                        "cache_write_per_mtok": str(routed.cache_write_price),
                                        "cache_write_1h_per_mtok": str(routed.cache_write_1h_price),
                                        "rounding": "half_up_nano"}
        assert official.input_price > routed.input_price
        charges = [await gw.assert_billed(key, r) for r in receipts]
        assert receipts[0]["usage"] == receipts[1]["usage"] and charges[0] > charges[1] == charges[2]
        assert by_header.headers["x-tokensforge-bucket"] == "routed"
        assert by_header.headers["x-tokensforge-upstream-model"] == routed.primary.upstream_model
        spent["credit"] += charges[0]
        spent["routed"] += charges[1] + charges[2]
        balances = await gw.balances(key)
        assert {b: FUNDS - balances[b]["balance_nanos"] for b in spent} == spent


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
async def test_402_names_the_short_bucket_in_the_dialects_shape(gw: Gw, dialect: Dialect) -> None:
    _, key = await gw.account(credit=1_000, routed=FUNDS)  # the routed money never pays for credit's routes
    before = await gw.balances(key)
    for stream in (False, True):
        answer = await call(gw, dialect, key, "gpt-4o-mini", stream=stream)
        assert answer.status == 402, answer.body
        assert answer.headers["x-should-retry"] == "false" and answer.headers["x-request-id"].startswith("req_")
        if dialect.name == "messages":
            assert answer.body["type"] == "error" and answer.body["error"]["type"] == "billing_error"
            error = answer.body["error"]
        else:
            error = answer.body["error"]
            assert error["code"] == "insufficient_balance" and error["type"] == "insufficient_balance"
        assert "'credit'" in error["message"] and error["bucket"] == "credit"
        assert error["available_nanos"] == 1_000 and error["needed_nanos"] > 1_000
        _, receipt = await gw.get(f"/v1/receipts/{answer.headers['x-request-id']}", key)
        assert receipt["status"] == "failed" and receipt["charge_nanos"] == 0 and receipt["ledger_entry_id"] is None
    assert await gw.balances(key) == before
    assert (await gw.mock.stats())["requests"] == 0


# ------------------------------------------------------------------ failover and failures


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-test"])
@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
async def test_failover_to_the_backup_channel(gw: Gw, dialect: Dialect, model: str) -> None:
    """The routed routes: gpt-4o-mini relay-a → relay-b (both OpenAI kind), claude-test relay-a (OpenAI kind)
    → anthropic-a (Anthropic kind): the backup serves at the same bucket and price."""
    _, key = await gw.account(routed=FUNDS)
    route = gw.catalog.routes[f"{model}/routed"]
    primary, backup = route.channels
    await gw.mock.faults(**{primary.upstream_model: {"error_status": 503},
                            backup.upstream_model: {"completion_tokens": 6}})
    spent = 0
    for stream in (False, True):
        answer = await call(gw, dialect, key, model, stream=stream, headers={"x-tokensforge-route": "routed"})
        receipt, answer_id = answer_receipt(dialect, answer, stream)
        assert receipt["fallback"] == {"used": True, "cross_route": False, "from_route": None}
        assert receipt["channels"] == {"primary": primary.channel, "backups": [backup.channel],
                                       "served_by": backup.channel}
        assert [(a["channel"], a["outcome"], a["status"]) for a in receipt["attempts"]] == [
            (primary.channel, "5xx", 503), (backup.channel, "ok", 200)]
        assert receipt["upstream_model"] == backup.upstream_model and receipt["usage"]["completion_tokens"] == 6
        assert answer.headers["x-tokensforge-upstream-model"] == backup.upstream_model
        if not stream:
            assert answer.headers["x-tokensforge-fallback"] == "channel"
            assert answer.headers["x-tokensforge-channel"] == backup.channel
        spent += await gw.assert_billed(key, receipt, answer_id)
    assert (await gw.balances(key))["routed"]["balance_nanos"] == FUNDS - spent
    assert (await gw.mock.stats())["by_model"] == {primary.upstream_model: 2, backup.upstream_model: 2}


#: (model, route kind): the route's primary upstream is cut mid-stream; official routes are on_failure "free",
#: routed ones "charge_delivered"; claude-test/official streams from the Anthropic-kind channel
CUT_ROUTES = [("gpt-4o-mini", "official"), ("gpt-4o-mini", "routed"), ("claude-test", "official"),
              ("claude-test", "routed")]


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
async def test_mid_stream_upstream_failure_settles_per_on_failure(gw: Gw, dialect: Dialect) -> None:
    _, key = await gw.account(credit=FUNDS, routed=FUNDS)
    routes = [gw.catalog.routes[f"{model}/{kind}"] for model, kind in CUT_ROUTES]
    assert {r.on_failure for r in routes} == {"free", "charge_delivered"}
    await gw.mock.faults(**{r.primary.upstream_model: {"cut_after_chunks": 2, "completion_tokens": 8}
                            for r in routes})
    spent = {"credit": 0, "routed": 0}
    for (model, kind), route in zip(CUT_ROUTES, routes, strict=True):
        answer = await call(gw, dialect, key, model, stream=True, headers={"x-tokensforge-route": kind})
        assert answer.status == 200 and answer.headers["x-tokensforge-route"] == route.id
        error = dialect.stream_error(answer.body)
        assert error["message"] and "upstream" in error["message"], (route.id, error)
        _, receipt = await gw.get(f"/v1/receipts/{answer.headers['x-request-id']}", key)
        assert receipt["status"] == "failed" and receipt["on_failure"] == route.on_failure, receipt
        assert receipt["channels"]["served_by"] == route.primary.channel  # a started stream is never retried
        if route.on_failure == "free":
            assert receipt["charge_nanos"] == 0 and receipt["ledger_entry_id"] is None, receipt
        else:  # charge_delivered: input + the 2 output tokens delivered before the cut
            usage = receipt["usage"]
            assert usage["completion_tokens"] == 2 and usage["prompt_tokens"] > 0, (route.id, usage)
            charge = gw.route_charge(route.id, usage["prompt_tokens"], 2)
            assert receipt["charge_nanos"] == charge > 0
            entry = await gw.ledger_entry(key, receipt["ledger_entry_id"])
            assert entry["amount_nanos"] == -charge and entry["request_id"] == receipt["request_id"]
            spent[route.bucket] += charge
        balances = await gw.balances(key)
        assert {b: FUNDS - balances[b]["balance_nanos"] for b in spent} == spent, route.id
        assert balances[route.bucket]["reserved_nanos"] == 0


async def test_stream_cut_on_the_anthropic_backup_charges_what_was_delivered(gw: Gw) -> None:
    """claude-test/routed (charge_delivered): relay-a answers 503, the Anthropic-kind backup starts the stream
    and breaks after 2 content events — in every dialect the client gets its error event and pays input + 2."""
    _, key = await gw.account(routed=FUNDS)
    route = gw.catalog.routes["claude-test/routed"]
    primary, backup = route.channels
    await gw.mock.faults(**{primary.upstream_model: {"error_status": 503},
                            backup.upstream_model: {"cut_after_chunks": 2, "completion_tokens": 8}})
    spent = 0
    for dialect in DIALECTS:
        answer = await call(gw, dialect, key, "claude-test", stream=True, headers={"x-tokensforge-route": "routed"})
        assert "upstream" in dialect.stream_error(answer.body)["message"]
        _, receipt = await gw.get(f"/v1/receipts/{answer.headers['x-request-id']}", key)
        assert receipt["status"] == "failed" and receipt["fallback"]["used"] is True
        assert receipt["channels"]["served_by"] == backup.channel and receipt["usage"]["completion_tokens"] == 2
        charge = gw.route_charge(route.id, receipt["usage"]["prompt_tokens"], 2)
        assert receipt["charge_nanos"] == charge > 0
        assert (await gw.ledger_entry(key, receipt["ledger_entry_id"]))["amount_nanos"] == -charge
        spent += charge
    balance = (await gw.balances(key))["routed"]
    assert balance["balance_nanos"] == FUNDS - spent and balance["reserved_nanos"] == 0


# ------------------------------------------------------------------ quotes


@pytest.mark.parametrize("dialect", DIALECTS, ids=DIALECT_IDS)
async def test_quote_reserves_what_the_request_reserves(gw: Gw, dialect: Dialect) -> None:
    _, key = await gw.account(credit=FUNDS, routed=FUNDS)
    await short_answers(gw, 3, "up-official", "up-relay-a")
    for pin, max_tokens in ((None, 20), ("routed", 300)):
        body = dialect.body("gpt-4o-mini", max_tokens, False)
        headers = {"x-tokensforge-route": pin} if pin else None
        status, quote, _ = await gw.post(f"/v1/quote?dialect={dialect.name}", key, body, headers)
        assert status == 200 and quote["allowed"] is True, quote
        answer = await call(gw, dialect, key, "gpt-4o-mini", max_tokens=max_tokens, headers=headers)
        receipt, _ = answer_receipt(dialect, answer, False)
        assert quote["route"] == receipt["route"] and quote["bucket"] == receipt["bucket"]
        assert quote["max_output_tokens"] == max_tokens
        assert quote["reserve_nanos"] == receipt["reserved_nanos"] > receipt["charge_nanos"]
