"""Property-based fuzzing of a real gateway against its own contract (GET /openapi.json).

Schemathesis generates valid (positive) and invalid (negative) requests for every operation
the app routes; each answer must be no 500 (a 5xx only 502/503/504, which SPEC §2 allows
from upstream or ledger trouble), every 4xx/5xx in the error shape of its API, and conform
to the documented status codes, content types, headers and response schemas. The `dsn`
fixture checks the SPEC §5 ledger invariants afterwards.

Short and deterministic by default (fixed seed, few examples); `make fuzz` runs it long:
TOKENSFORGE_FUZZ_EXAMPLES (per operation and mode), TOKENSFORGE_FUZZ_SEED.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import hypothesis
import hypothesis.errors
import pytest
import orjson
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tokensforge.openapi import DOCUMENT

from .harness import ADMIN_TOKEN, Gw
from .test_openapi import app_for_routes, routed

EXAMPLES = int(os.environ.get("TOKENSFORGE_FUZZ_EXAMPLES", "6"))
SEED = int(os.environ.get("TOKENSFORGE_FUZZ_SEED", "20261130"))
ALLOWED_5XX = {502, 503, 504}
BIGINT_MAX = 2**63 - 1
CONTRACT_CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
                   response_schema_conformance]


@dataclass
class Context:
    """What the fuzzer may put in place of generated values so requests reach deeper code."""

    url: str
    key: str
    account_id: str
    spare_key_id: str  # revoking it does not lock the fuzzer out
    request_id: str
    chat_models: list[str]
    embedding_models: list[str]
    failures: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


# ---------------------------------------------------------------- known 500s fixed elsewhere

# ---------------------------------------------------------------- one request


def _auth(security: list[dict[str, Any]], ctx: Context, choice: str) -> dict[str, str]:
    schemes = {name for item in security for name in item}
    if not schemes or choice == "none":
        return {}
    token = ADMIN_TOKEN if "AdminToken" in schemes else ctx.key
    if choice == "wrong":
        token = "tf-" + "0" * 40
    if "AnthropicApiKey" in schemes and choice == "x-api-key":
        return {"x-api-key": token}
    return {"authorization": f"Bearer {token}"}


def _steer(case: Any, ctx: Context, draw: Any) -> None:
    """Replace some generated ids and model names with real ones (half the time each)."""
    real = {"account_id": ctx.account_id, "key_id": ctx.spare_key_id, "request_id": ctx.request_id,
            "model_id": ctx.chat_models[0]}
    for name in list(case.path_parameters or {}):
        if name in real and draw(st.booleans()):
            case.path_parameters[name] = real[name]
    if isinstance(case.body, dict) and "model" in case.body and draw(st.booleans()):
        models = ctx.embedding_models if case.path.endswith("/embeddings") else ctx.chat_models
        case.body["model"] = draw(st.sampled_from(models))
    _spice(case, draw)


def _spice(case: Any, draw: Any) -> None:
    """Now and then a NUL in one string: PostgreSQL cannot store it, generators rarely make one."""
    slots = [(container, name) for container in (case.query, case.path_parameters, case.body)
             if isinstance(container, dict) for name, value in container.items() if isinstance(value, str)]
    if slots and draw(st.integers(0, 7)) == 0:
        container, name = draw(st.sampled_from(slots))
        container[name] += "\x00"


def check_answer(case: Any, response: Any, operation: dict[str, Any], ctx: Context) -> None:
    status = response.status_code
    ctx.statuses[status] = ctx.statuses.get(status, 0) + 1
    assert (response.headers.get("x-request-id") or [""])[0].startswith("req_"), "no x-request-id"
    if status == 500 or (status >= 500 and status not in ALLOWED_5XX):
        raise AssertionError(f"{status} {response.text[:300]}")
    if status >= 400:
        body = orjson.loads(response.content)
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict) and isinstance(error.get("message"), str), f"not an error shape: {body}"
        if operation.get("x-tokensforge-error-shape") == "anthropic":
            assert body.get("type") == "error" and isinstance(error.get("type"), str), body
        else:
            assert {"message", "type", "code", "param"} <= set(error), body
    case.validate_response(response, checks=CONTRACT_CHECKS)


def fuzz_operation(schema: Any, method: str, path: str, mode: GenerationMode, ctx: Context) -> None:
    """Run one operation in one generation mode; a failure is recorded (shrunk), not raised."""
    operation = DOCUMENT["paths"][path][method.lower()]
    api_operation = schema[path][method]
    session = requests.Session()

    @hypothesis.seed(SEED)
    @hypothesis.settings(max_examples=EXAMPLES, database=None, deadline=None, derandomize=False,
                         phases=[Phase.explicit, Phase.generate, Phase.shrink],
                         suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @hypothesis.given(case=api_operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: Any) -> None:
        _steer(case, ctx, data.draw)
        choice = data.draw(st.sampled_from(["good"] * 5 + ["wrong", "none", "x-api-key"]))
        headers = {**(case.headers or {}), **_auth(operation["security"], ctx, choice)}
        case.headers = headers
        response = case.call(base_url=ctx.url, session=session, timeout=30)
        try:
            check_answer(case, response, operation, ctx)
        except Exception as exc:
            exc.add_note(case.as_curl_command(headers=dict(response.request.headers), base_url=ctx.url))
            raise

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # nothing to negate in an operation without inputs
        assert mode == GenerationMode.NEGATIVE, (method, path)
    except (Exception, BaseExceptionGroup) as exc:  # shrunk by hypothesis: keep the smallest failing request
        notes = "\n".join(getattr(exc, "__notes__", []))
        plain = isinstance(exc, (AssertionError, BaseExceptionGroup))  # their message says it all
        where = "" if plain else "".join(traceback.format_exception(exc))[-1500:]
        ctx.failures.append(f"{method} {path} [{mode.value}]: {type(exc).__name__}: {str(exc)[:800]}\n{where}{notes}")
    finally:
        session.close()


def fuzz_all(ctx: Context, operations: list[tuple[str, str]]) -> None:
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    for method, path in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            started = time.perf_counter()
            fuzz_operation(schema, method, path, mode, ctx)
            print(f"{method} {path} {mode.value}: {time.perf_counter() - started:.1f}s")


# ---------------------------------------------------------------- the test


async def _context(gw: Gw) -> Context:
    account_id, key = await gw.account(credit=10**10, routed=10**10)
    status, spare = await gw.admin("POST", f"/admin/accounts/{account_id}/keys", {"name": "spare"})
    assert status == 201, spare
    status, answer, headers = await gw.post("/v1/chat/completions", key, {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert status == 200, answer
    models = gw.catalog.models.values()
    return Context(url=gw.url, key=key, account_id=account_id, spare_key_id=spare["id"],
                   request_id=answer["receipt"]["request_id"],
                   chat_models=sorted(m.id for m in models if m.type == "chat"),
                   embedding_models=sorted(m.id for m in models if m.type == "embedding"))


async def test_fuzz_every_routed_operation_against_the_contract(gw: Gw, tmp_path: Path) -> None:
    ctx = await _context(gw)
    # what the app routes (the same code as the running one): operations still being built join once routed
    operations = sorted(routed(app_for_routes(tmp_path)))
    assert ("POST", "/v1/chat/completions") in operations
    # the gateway serves on this event loop: the synchronous fuzzer runs in a worker thread
    await asyncio.to_thread(fuzz_all, ctx, operations)
    assert not ctx.failures, "\n\n".join(ctx.failures)
    assert sum(n for s, n in ctx.statuses.items() if s < 300) > 0, ctx.statuses  # some requests got through
    assert sum(n for s, n in ctx.statuses.items() if 400 <= s < 500) > 0, ctx.statuses
    print(ctx.statuses)
    # SPEC §5 invariants: checked by the dsn fixture after this test


# ---------------------------------------------------------------- what the fuzzer found, kept fixed

NUL = "\\u0000"  # JSON escape: the body carries a real U+0000


@pytest.mark.parametrize("method,path,token,body,status,param", [
    ("POST", "/admin/accounts", "admin", f'{{"name": "a{NUL}"}}', 400, "name"),
    ("POST", "/admin/accounts/{acct}/projects", "admin", f'{{"name": "a{NUL}"}}', 400, "name"),
    ("POST", "/admin/accounts/{acct}/projects", "admin", f'{{"name": "p", "policy": {{"allowed_models": ["{NUL}"]}}}}',
     400, "policy"),
    ("POST", "/admin/accounts/{acct}/keys", "admin", f'{{"name": "k", "project_id": "p{NUL}"}}', 400, "project_id"),
    ("POST", "/admin/accounts/{acct}/topups", "admin",
     f'{{"bucket": "credit", "amount_nanos": 5, "idempotency_key": "{NUL}"}}', 400, "idempotency_key"),
    ("POST", "/admin/accounts/{acct}/topups", "admin",
     f'{{"bucket": "credit", "amount_nanos": 5, "idempotency_key": "n", "note": "{NUL}"}}', 400, "note"),
    ("POST", "/admin/accounts/{acct}/topups", "admin",
     '{"bucket": "credit", "amount_nanos": 1000000000000000000, "idempotency_key": "overflow"}', 400,
     "amount_nanos"),
    ("GET", "/admin/accounts/a%00", "admin", None, 400, "account_id"),
    ("POST", "/admin/keys/k%00/revoke", "admin", None, 400, "key_id"),
    ("POST", "/admin/accounts/a%00/topups", "admin",
     '{"bucket": "credit", "amount_nanos": 5, "idempotency_key": "x"}', 400, "account_id"),
    ("GET", "/v1/usage?route_kind=%00", "key", None, 400, "route_kind"),
    ("GET", "/v1/ledger?bucket=%00", "key", None, 400, "bucket"),
    ("GET", "/v1/usage?limit=%C2%B2", "key", None, 400, "limit"),  # "²".isdigit() is True
    ("POST", "/v1/quote", "key", '{"model": "gpt-4o-mini", "messages": 5}', 400, "messages"),
    ("POST", "/v1/research/reports", "key",
     f'{{"topic": "t{NUL}", "model": "gpt-4o-mini", "max_charge_nanos": 1000, "dry_run": true}}', 400, "topic"),
])
async def test_inputs_the_fuzzer_found_get_a_clear_4xx_and_move_no_money(
        gw: Gw, method: str, path: str, token: str, body: str | None, status: int, param: str | None) -> None:
    account_id, key = await gw.account(credit=10**18)
    for n in range(8 if "overflow" in (body or "") else 0):  # 9e18: one more 1e18 passes the bigint ceiling
        status_, entry = await gw.admin("POST", f"/admin/accounts/{account_id}/topups", {
            "bucket": "credit", "amount_nanos": 10**18, "idempotency_key": f"fill-{n}"})
        assert status_ == 201, entry
    headers = {"authorization": f"Bearer {ADMIN_TOKEN if token == 'admin' else key}"}
    before = await gw.balances(key)
    async with gw.session.request(method, gw.url + path.format(acct=account_id), data=body, headers=headers) as r:
        answer = await r.json()
        assert r.status == status, answer
        assert answer["error"]["param"] == param and r.headers["x-should-retry"] == "false"
    assert await gw.balances(key) == before


async def test_a_non_object_stream_options_is_a_400(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    status, answer, _ = await gw.post("/v1/chat/completions", key, {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": 5})
    assert status == 400, answer


async def test_a_405_says_which_methods_are_allowed(gw: Gw) -> None:
    async with gw.session.delete(gw.url + "/v1/chat/completions") as r:
        assert r.status == 405 and r.headers["allow"] == "POST"
        assert (await r.json())["error"]["message"] == "method DELETE is not allowed here"
    async with gw.session.put(gw.url + "/admin/accounts/acct_x/webhooks") as r:
        assert r.status == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


async def test_an_oversized_body_is_one_413_logged_at_info_and_its_rest_is_never_a_request(
        dsn: str, mock_upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from .harness import gateway_settings, start_gateway, write_catalog

    caplog.set_level(logging.DEBUG)
    settings = gateway_settings(write_catalog(tmp_path / "catalog.toml", mock_upstream.url), max_body_bytes=1000)
    ctx, url, _ = await start_gateway(settings, dsn)
    async with ctx:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        smuggled = b"POST /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN_TOKEN.encode() + \
            b"\r\nContent-Length: 15\r\n\r\n{\"name\": \"zz\"}\n"
        body = b'{"name": "' + b"a" * 5000 + b'"}' + smuggled * 4
        writer.write(b"POST /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN_TOKEN.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # up to EOF: the gateway closes the connection
        writer.close()
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"request_too_large"' in answer and b"Connection: close" in answer
    refused = [r for r in caplog.records if "413" in r.getMessage()]
    assert refused and all(r.levelno == logging.INFO and r.exc_info is None for r in refused)
    ours = ("tokensforge", "aiohttp")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(ours)]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 0  # nothing smuggled was run
    finally:
        await conn.close()
