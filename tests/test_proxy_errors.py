"""Every error the proxy can answer (SPEC §2), seen through the SDK's exception classes.

Each one must leave every balance exactly as it was (SPEC §5.6) and carry
x-request-id; errors a retry cannot fix carry x-should-retry: false.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from .harness import Gw

MESSAGES = [{"role": "user", "content": "hello"}]
FUNDS = {"credit": 10**9, "routed": 10**9}


async def _unchanged(gw: Gw, key: str, expected: dict[str, int] = FUNDS) -> None:
    balances = await gw.balances(key)
    for bucket, amount in expected.items():
        assert balances[bucket]["balance_nanos"] == amount, balances
        assert balances[bucket]["reserved_nanos"] == 0, balances


def _check(exc: openai.APIStatusError, status: int, code: str, *, final: bool = True) -> dict:
    assert exc.status_code == status
    body = exc.response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    assert exc.response.headers["x-request-id"].startswith("req_")
    if final:
        assert exc.response.headers["x-should-retry"] == "false"
    return body["error"]


async def test_400_invalid_request_for_bad_bodies(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    client = gw.client(key)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert _check(info.value, 400, "invalid_request")["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10**6)
    assert _check(info.value, 400, "invalid_request")["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body={"route": "nope"})
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="gpt-4o-mini", input="chat model at the embeddings endpoint")
    status, body, headers = await gw.post("/v1/chat/completions", key, b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_request" and headers["x-should-retry"] == "false"
    status, body, _ = await gw.post("/v1/chat/completions", key, [1, 2])
    assert status == 400
    await _unchanged(gw, key)


async def test_401_invalid_and_revoked_keys(gw: Gw) -> None:
    account_id, key = await gw.account(**FUNDS)
    with pytest.raises(openai.AuthenticationError) as info:
        await gw.client("tf-" + "x" * 43).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    _check(info.value, 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        await gw.client("sk-not-ours").models.list()
    client = gw.client(key)
    await client.models.list()  # works, and is now cached
    _, account = await gw.admin("GET", f"/admin/accounts/{account_id}")
    status, _ = await gw.admin("POST", f"/admin/keys/{account['keys'][0]['id']}/revoke")
    assert status == 200
    await asyncio.sleep(1.0)  # revocation is effective within a second
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    _, account = await gw.admin("GET", f"/admin/accounts/{account_id}")
    assert {b["bucket"]: b["balance_nanos"] for b in account["buckets"]} == FUNDS


async def test_402_names_bucket_needed_available_and_never_uses_the_other_bucket(gw: Gw) -> None:
    _, key = await gw.account(credit=100, routed=10**9)
    refused = await gw.counter("tokensforge_requests_total", route_kind="official", status="refused")
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    error = _check(info.value, 402, "insufficient_balance")
    assert error["bucket"] == "credit" and error["available_nanos"] == 100 and error["needed_nanos"] > 100
    await _unchanged(gw, key, {"credit": 100, "routed": 10**9})
    _, usage = await gw.get("/v1/usage", key)
    record = usage["data"][0]
    assert record["status"] == "failed" and record["charge_nanos"] == 0 and record["ledger_entry_id"] is None
    assert record["error"]["code"] == "insufficient_balance"
    assert await gw.counter("tokensforge_requests_total", route_kind="official", status="refused") == refused + 1


async def test_403_model_route_and_budget(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS, policy={"allowed_models": ["embed-small", "gpt-4o-mini"],
                                               "allowed_route_kinds": ["official"], "budget_nanos": 1000})
    client = gw.client(key)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="fine-price", messages=MESSAGES)
    _check(info.value, 403, "model_not_allowed")
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                             extra_headers={"x-tokensforge-route": "gpt-4o-mini/routed"})
    assert _check(info.value, 403, "route_not_allowed")["route"] == "gpt-4o-mini/routed"
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    _check(info.value, 403, "budget_exceeded")
    await _unchanged(gw, key)


async def test_404_unknown_model(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    with pytest.raises(openai.NotFoundError) as info:
        await gw.client(key).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert _check(info.value, 404, "model_not_found")["param"] == "model"
    await _unchanged(gw, key)


async def test_413_request_too_large(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    huge = [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=huge)
    _check(info.value, 413, "request_too_large")
    await _unchanged(gw, key)


async def test_429_rate_limited_with_retry_after(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS, policy={"rpm": 2})
    client = gw.client(key)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
    before = await gw.balances(key)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
    _check(info.value, 429, "rate_limited", final=False)
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
    assert await gw.balances(key) == before


async def test_502_upstream_error_after_retries_charges_nothing(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"error_status": 500}})
    with pytest.raises(openai.InternalServerError) as info:
        await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    error = _check(info.value, 502, "upstream_error", final=False)
    assert "127.0.0.1" not in error["message"] and "secret" not in error["message"]
    await _unchanged(gw, key)
    _, usage = await gw.get("/v1/usage", key)
    assert [a["outcome"] for a in usage["data"][0]["attempts"]] == ["5xx", "5xx"]


async def test_503_no_healthy_channel_once_the_circuit_is_open(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-official": {"error_status": 503}})
    client = gw.client(key)
    for _ in range(3):  # 2 attempts each: the breaker opens after 5 consecutive failures
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    _check(info.value, 503, "no_healthy_channel", final=False)
    await _unchanged(gw, key)


async def test_504_upstream_timeout(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS)
    await gw.mock.faults(**{"up-quick": {"hang": True}})
    with pytest.raises(openai.InternalServerError) as info:
        await gw.client(key).chat.completions.create(model="quick-timeout", messages=MESSAGES)
    _check(info.value, 504, "upstream_timeout", final=False)
    await _unchanged(gw, key)
    _, usage = await gw.get("/v1/usage", key)
    assert [a["outcome"] for a in usage["data"][0]["attempts"]] == ["timeout", "timeout"]


async def test_429_when_a_key_passes_its_tokens_per_minute(gw: Gw) -> None:
    _, key = await gw.account(**FUNDS, policy={"tpm": 150})
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    with pytest.raises(openai.RateLimitError) as info:  # ~110 tokens used, the next ~110 do not fit
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    error = _check(info.value, 429, "rate_limited", final=False)
    assert "tokens per minute" in error["message"] and int(info.value.response.headers["retry-after"]) >= 1
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # small fits
