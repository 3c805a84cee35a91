"""GET /openapi.json (SPEC §2) stays true: it documents exactly what the app routes, it is valid
OpenAPI 3.1, and real answers of the main endpoints validate against its response schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from jsonschema import Draft202012Validator
from schemathesis.specs.openapi.definitions import OPENAPI_31

from tokensforge.app import create_app
from tokensforge.catalog import load_catalog
from tokensforge.openapi import DOCUMENT, operations

from .harness import Gw, gateway_settings, write_catalog

INTERNAL_PREFIXES = ("/_mock",)


def routed(app: Any) -> set[tuple[str, str]]:
    """(METHOD, path template) of every public route; HEAD twins and trailing-slash aliases left out."""
    out = set()
    for route in app.router.routes():
        path = route.resource.canonical
        if route.method == "HEAD" or path.startswith(INTERNAL_PREFIXES):
            continue
        out.add((route.method, path))
    return {(m, p) for m, p in out if not (p.endswith("/") and (m, p.rstrip("/")) in out)}


def documented(*, planned: bool) -> set[tuple[str, str]]:
    return {(m, p) for m, p, o in operations() if bool(o.get("x-tokensforge-planned")) == planned}


def app_for_routes(tmp_path: Path) -> Any:
    settings = gateway_settings(write_catalog(tmp_path / "c.toml", "http://127.0.0.1:9/v1"))
    assert settings.config_path is not None
    return create_app(settings, load_catalog(settings.config_path), "postgresql://unused")  # never started


def test_every_route_is_documented_and_every_documented_route_exists(tmp_path: Path) -> None:
    routes = routed(app_for_routes(tmp_path))
    assert routes - documented(planned=False) - documented(planned=True) == set(), "routes missing from the document"
    assert documented(planned=False) - routes == set(), "documented but not routed (mark x-tokensforge-planned?)"
    assert documented(planned=True) & routes == set(), "routed now: drop x-tokensforge-planned in openapi.py"
    assert ("GET", "/openapi.json") in routes and ("POST", "/v1/chat/completions") in routes


def test_the_document_is_valid_openapi_3_1() -> None:
    Draft202012Validator(OPENAPI_31).validate(DOCUMENT)
    for name, schema in DOCUMENT["components"]["schemas"].items():
        assert isinstance(schema, dict), name
        Draft202012Validator.check_schema(schema)
    text = orjson.dumps(DOCUMENT).decode()
    for kind in ("schemas", "responses", "headers"):  # every $ref resolves
        for name in {part.split('"')[0] for part in text.split(f'"#/components/{kind}/')[1:]}:
            assert name in DOCUMENT["components"][kind], f"dangling $ref {kind}/{name}"
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    results = list(schema.get_all_operations())
    assert len(results) == len(operations())
    for result in results:
        result.ok()  # raises InvalidSchema on an operation schemathesis cannot use


def test_every_operation_documents_its_errors_in_the_spec_shape() -> None:
    for method, path, operation in operations():
        statuses = set(operation["responses"])
        assert operation["operationId"] and operation["summary"], (method, path)
        if operation["security"]:  # authenticated: a bad key is a documented 401
            assert "401" in statuses, (method, path)
        if "requestBody" in operation:  # a body can be malformed or too large
            assert {"400", "413"} <= statuses, (method, path)
        shape = "AnthropicError" if operation.get("x-tokensforge-error-shape") == "anthropic" else "Error"
        for status in statuses - {"200", "201"} - ({"503"} if path == "/readyz" else set()):
            assert operation["responses"][status] == {"$ref": f"#/components/responses/{shape}{status}"}, (
                method, path, status)


async def test_the_gateway_serves_the_document(gw: Gw) -> None:
    async with gw.session.get(gw.url + "/openapi.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert r.headers["x-request-id"].startswith("req_")
        assert await r.json() == orjson.loads(orjson.dumps(DOCUMENT))


# ---------------------------------------------------------------- real answers against the schemas


def _validator(method: str, path: str, status: int, media: str = "application/json") -> Draft202012Validator:
    """The response schema, resolved against the whole document ($refs are JSON pointers into it)."""
    responses = DOCUMENT["paths"][path][method.lower()]["responses"]
    response = responses[str(status)]
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return Draft202012Validator({**DOCUMENT, **response["content"][media]["schema"]})


def conforms(method: str, path: str, status: int, body: Any, headers: Any = None) -> None:
    errors = sorted(_validator(method, path, status).iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    if headers is not None:
        assert {k.lower(): v for k, v in headers.items()}.get("x-request-id", "").startswith("req_")


async def _call(gw: Gw, method: str, url_path: str, token: str | None, body: Any = None) -> tuple[int, Any, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    data = orjson.dumps(body) if body is not None else None
    async with gw.session.request(method, gw.url + url_path, data=data, headers=headers) as r:
        return r.status, await r.json(), r.headers


async def test_real_answers_validate_against_the_response_schemas(gw: Gw) -> None:
    from .harness import ADMIN_TOKEN

    account_id, key = await gw.account(credit=10**9, routed=10**9)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    cases: list[tuple[str, str, str, str | None, Any, int]] = [
        # (method, document path, url path, token, body, expected status)
        ("POST", "/v1/chat/completions", "/v1/chat/completions", key, chat, 200),
        ("POST", "/v1/embeddings", "/v1/embeddings", key, {"model": "embed-small", "input": ["a", "b"]}, 200),
        ("POST", "/v1/quote", "/v1/quote", key, chat, 200),
        ("POST", "/v1/quote", "/v1/quote", key, {**chat, "route": "nope"}, 400),
        ("GET", "/v1/models", "/v1/models", key, None, 200),
        ("GET", "/v1/models/{model_id}", "/v1/models/meta%2Fllama-3%3A8b", key, None, 200),
        ("GET", "/v1/models/{model_id}", "/v1/models/nope", key, None, 404),
        ("GET", "/v1/balance", "/v1/balance", key, None, 200),
        ("GET", "/v1/balance", "/v1/balance", "tf-wrong", None, 401),
        ("GET", "/v1/usage", "/v1/usage?limit=1", key, None, 200),
        ("GET", "/v1/usage", "/v1/usage?limit=0", key, None, 400),
        ("GET", "/v1/ledger", "/v1/ledger?limit=2", key, None, 200),
        ("GET", "/v1/receipts/{request_id}", "/v1/receipts/req_nope", key, None, 404),
        ("POST", "/v1/research/reports", "/v1/research/reports", key,
         {"topic": "rates", "model": "gpt-4o-mini", "max_charge_nanos": 10**8, "dry_run": True}, 200),
        ("POST", "/v1/research/reports", "/v1/research/reports", key,
         {"topic": "rates", "model": "gpt-4o-mini", "sections": ["One"], "max_charge_nanos": 10**8}, 200),
        ("POST", "/v1/chat/completions", "/v1/chat/completions", key, {**chat, "max_tokens": 10**9}, 400),
        ("GET", "/admin/accounts/{account_id}", f"/admin/accounts/{account_id}", ADMIN_TOKEN, None, 200),
        ("GET", "/admin/accounts/{account_id}", "/admin/accounts/acct_nope", ADMIN_TOKEN, None, 404),
        ("POST", "/admin/accounts/{account_id}/topups", f"/admin/accounts/{account_id}/topups", ADMIN_TOKEN,
         {"bucket": "credit", "amount_nanos": 5, "idempotency_key": "schema"}, 201),
        ("POST", "/admin/accounts/{account_id}/topups", f"/admin/accounts/{account_id}/topups", ADMIN_TOKEN,
         {"bucket": "credit", "amount_nanos": 5, "idempotency_key": "schema"}, 200),
        ("POST", "/admin/accounts/{account_id}/topups", f"/admin/accounts/{account_id}/topups", ADMIN_TOKEN,
         {"bucket": "credit", "amount_nanos": 6, "idempotency_key": "schema"}, 409),
        ("GET", "/admin/routes/health", "/admin/routes/health", ADMIN_TOKEN, None, 200),
        ("POST", "/admin/accounts", "/admin/accounts", "wrong", {"name": "x"}, 401),
        ("GET", "/healthz", "/healthz", None, None, 200),
        ("GET", "/readyz", "/readyz", None, None, 200),
    ]
    for method, doc_path, url_path, token, body, expected in cases:
        status, answer, headers = await _call(gw, method, url_path, token, body)
        assert status == expected, (method, url_path, status, answer)
        conforms(method, doc_path, status, answer, headers)
    # the receipt of the first chat, and a usage page that now holds records
    status, page, _ = await _call(gw, "GET", "/v1/usage", key)
    assert status == 200 and page["data"], page
    conforms("GET", "/v1/usage", 200, page)
    request_id = page["data"][-1]["request_id"]
    status, receipt, _ = await _call(gw, "GET", f"/v1/receipts/{request_id}", key)
    assert status == 200
    conforms("GET", "/v1/receipts/{request_id}", 200, receipt)


async def test_a_streamed_chat_ends_with_a_receipt_of_the_documented_shape(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    async with gw.session.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert r.headers["x-request-id"].startswith("req_")
        events = [line[5:].strip() for line in (await r.text()).splitlines() if line.startswith("data:")]
    sse = _validator("POST", "/v1/chat/completions", 200, "text/event-stream")
    for data in events:
        assert not list(sse.iter_errors({"event": "message", "data": data}))
    assert events[-1] == "[DONE]"
    final = orjson.loads(events[-2])
    assert final["choices"] == [] and final["usage"]["total_tokens"] > 0
    receipt = Draft202012Validator({**DOCUMENT, "$ref": "#/components/schemas/Receipt"})
    assert not list(receipt.iter_errors(final["receipt"])), final["receipt"]


async def test_a_402_and_a_403_carry_their_documented_fields(gw: Gw) -> None:
    _, key = await gw.account(credit=1)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    status, answer, headers = await gw.post("/v1/chat/completions", key, chat)
    assert status == 402 and answer["error"]["bucket"] == "credit"
    conforms("POST", "/v1/chat/completions", 402, answer, headers)
    _, limited = await gw.account(routed=10**9, policy={"allowed_route_kinds": ["routed"]})
    status, answer, headers = await gw.post("/v1/chat/completions", limited, {**chat, "route": "official"})
    assert status == 403 and answer["error"]["route"] == "gpt-4o-mini/official"
    conforms("POST", "/v1/chat/completions", 403, answer, headers)


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/v1/messages/count_tokens"])
def test_endpoints_being_built_are_described_from_the_spec(path: str) -> None:
    operation = DOCUMENT["paths"][path]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert "200" in operation["responses"] and "402" in operation["responses"] or path.endswith("count_tokens")
    if path.startswith("/v1/messages"):
        assert {"AnthropicApiKey": []} in operation["security"]
        assert operation["x-tokensforge-error-shape"] == "anthropic"


async def test_models_and_quotes_show_every_class_price_and_the_cached_turn(gw: Gw) -> None:
    """The test catalog prices no cache class on gpt-4o-mini: each shows (and costs) the input price, and the
    cached agent turn costs what the same tokens cost uncached."""
    _, key = await gw.account(credit=10**9, routed=10**9)
    status, model, _ = await _call(gw, "GET", "/v1/models/gpt-4o-mini", key)
    assert status == 200
    routed = next(r for r in model["routes"] if r["id"] == "gpt-4o-mini/routed")
    assert (routed["cache_read_price_per_mtok"], routed["cache_write_price_per_mtok"],
            routed["cache_write_1h_price_per_mtok"]) == ("0.06", "0.06", "0.06")
    assert routed["cache_classes_at_input_price"] == ["cache_read", "cache_write", "cache_write_1h"]
    turn = 10_000 * 60 + 500 * 240  # 10,000 input (9,000 of them cache reads) + 500 output, nano-USD
    assert routed["cached_turn_example"] == {
        "input_tokens": 10_000, "cache_read_tokens": 9_000, "output_tokens": 500, "price_nanos": turn,
        "price_usd": "0.000720000", "uncached_price_nanos": turn, "uncached_price_usd": "0.000720000"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "route": "routed"}
    status, quote, _ = await _call(gw, "POST", "/v1/quote", key, chat)
    assert status == 200
    assert quote["price"] == {"input_per_mtok": "0.06", "output_per_mtok": "0.24", "cache_read_per_mtok": "0.06",
                              "cache_write_per_mtok": "0.06", "cache_write_1h_per_mtok": "0.06",
                              "rounding": "half_up_nano"}
    assert quote["cached_turn_example"] == routed["cached_turn_example"]
    status, embed, _ = await _call(gw, "GET", "/v1/models/embed-small", key)
    assert status == 200 and all("cached_turn_example" not in r for r in embed["routes"])


# ---------------------------------------------------------------- the document accepts what the API accepts


def _request_validator(method: str, path: str) -> Draft202012Validator:
    schema = DOCUMENT["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**DOCUMENT, **schema})


def _param_validator(method: str, path: str, name: str) -> Draft202012Validator:
    params = DOCUMENT["paths"][path][method.lower()]["parameters"]
    return Draft202012Validator(next(p["schema"] for p in params if p["name"] == name))


async def test_the_document_says_what_the_api_accepts(gw: Gw) -> None:
    """What the fuzzer found the document and the API disagreeing on: empty model names, empty cursors, NUL in
    query strings, empty or blank admin strings, extra properties. Each case: valid by the document exactly
    when the API takes it."""
    from .harness import ADMIN_TOKEN

    account_id, key = await gw.account(credit=10**9, routed=10**9)
    acct = f"/admin/accounts/{account_id}"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    bodies: list[tuple[str, str, str, str, dict[str, Any]]] = [
        # (document path, url path, token, why, body)
        ("/v1/chat/completions", "/v1/chat/completions", key, "empty model", {**chat, "model": ""}),
        ("/v1/quote", "/v1/quote", key, "a model", {**chat, "model": "gpt-4o-mini"}),
        ("/v1/quote", "/v1/quote", key, "empty model", {**chat, "model": ""}),
        ("/v1/embeddings", "/v1/embeddings", key, "empty model", {"model": "", "input": "a"}),
        ("/v1/responses", "/v1/responses", key, "empty model", {"model": "", "input": "a"}),
        ("/admin/accounts", "/admin/accounts", ADMIN_TOKEN, "blank name", {"name": "  "}),
        ("/admin/accounts", "/admin/accounts", ADMIN_TOKEN, "extra property", {"name": "a", "extra": 1}),
        ("/admin/accounts/{account_id}/projects", f"{acct}/projects", ADMIN_TOKEN, "policy extra property",
         {"name": "p", "policy": {"extra": 1}}),
        ("/admin/accounts/{account_id}/projects", f"{acct}/projects", ADMIN_TOKEN, "empty model in a policy",
         {"name": "p", "policy": {"allowed_models": [""]}}),
        ("/admin/accounts/{account_id}/projects", f"{acct}/projects", ADMIN_TOKEN, "empty preference list",
         {"name": "p", "policy": {"route_preference": []}}),
        ("/admin/accounts/{account_id}/keys", f"{acct}/keys", ADMIN_TOKEN, "empty project id",
         {"name": "k", "project_id": ""}),
        ("/admin/accounts/{account_id}/topups", f"{acct}/topups", ADMIN_TOKEN, "blank idempotency key",
         {"bucket": "credit", "amount_nanos": 5, "idempotency_key": " "}),
        ("/admin/accounts/{account_id}/topups", f"{acct}/topups", ADMIN_TOKEN, "empty note",
         {"bucket": "credit", "amount_nanos": 5, "idempotency_key": "n", "note": ""}),
        ("/admin/accounts/{account_id}/webhooks", f"{acct}/webhooks", ADMIN_TOKEN, "balance.low, no threshold",
         {"url": "http://127.0.0.1:9/h", "events": ["balance.low"]}),
        ("/admin/accounts/{account_id}/webhooks", f"{acct}/webhooks", ADMIN_TOKEN, "not http",
         {"url": "ftp://127.0.0.1/h", "events": ["pool.granted"]}),
        ("/admin/accounts/{account_id}/webhooks", f"{acct}/webhooks", ADMIN_TOKEN, "extra property",
         {"url": "http://127.0.0.1:9/h", "events": ["pool.granted"], "extra": 1}),
    ]
    for doc_path, url_path, token, why, body in bodies:
        documented_ok = _request_validator("POST", doc_path).is_valid(body)
        status, answer, _ = await _call(gw, "POST", url_path, token, body)
        assert documented_ok == (status < 300), (why, doc_path, documented_ok, status, answer)
    queries = [("/v1/usage", "after", ""), ("/v1/ledger", "after", ""), ("/v1/usage", "after", "12"),
               ("/v1/usage", "model", "a\x00"), ("/v1/usage", "route_kind", "\x00"), ("/v1/ledger", "bucket", "\x00"),
               ("/v1/usage", "model", "gpt-4o-mini")]
    for path, name, value in queries:
        documented_ok = _param_validator("GET", path, name).is_valid(value)
        async with gw.session.get(gw.url + path, params={name: value},
                                  headers={"authorization": f"Bearer {key}"}) as r:
            assert documented_ok == (r.status < 300), (path, name, value, documented_ok, r.status, await r.text())
