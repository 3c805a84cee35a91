"""Tracing (SPEC §2 "Tracing"): with the OTEL_* variables set, one request's span tree reaches an OTLP/HTTP
receiver (an aiohttp server here, decoding the protobuf with opentelemetry-proto); the caller's traceparent
is continued and the attempt's passed upstream. Unset, nothing is created."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tokensforge import tracing
from tokensforge.settings import Settings

from .harness import Gw, Mock, gateway_of, gateway_settings, start_gateway, write_catalog

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_the_standard_variables_turn_tracing_on(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on
    assert Settings.from_env(env).tracing is on


async def test_unset_no_span_is_created(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a span was created with tracing off")

    for name in ("server_span", "request_span", "attempt_span", "_child", "finish_request", "end_server_span"):
        monkeypatch.setattr(tracing, name, forbidden)
    assert tracing.ON is False
    _, key = await gw.account(credit=10**9, routed=10**9)
    client = gw.client(key)
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5)
    assert answer.model_extra["receipt"]["charge_nanos"] > 0  # type: ignore[index]
    stream = await client.chat.completions.create(model="flaky-chain", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5, stream=True)
    assert [c async for c in stream]


# ------------------------------------------------------------------ an OTLP/HTTP receiver and a recording upstream

class Collector:
    """OTLP/HTTP traces endpoint: every span received, as dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.content_types: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append({
                        "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "status": span.status.code, "resource": resource,
                        "attributes": {a.key: _value(a.value) for a in span.attributes}})
        return web.Response(body=b"", content_type="application/x-protobuf")


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


class Recorder:
    """An upstream in front of the simulated one: keeps each request's traceparent, relays the rest."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock
        self.traceparents: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.traceparents.append(request.headers.get("traceparent"))
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with self.mock.session.post(self.mock.url.removesuffix("/v1") + request.path,
                                          data=await request.read(), headers=headers) as r:
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def traced(dsn: str, mock_upstream: Mock, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Gw, Collector, Recorder]]:
    await mock_upstream.reset()
    collector, recorder = Collector(), Recorder(mock_upstream)
    app = web.Application()
    app.router.add_post("/v1/traces", collector.handle)
    otlp_runner, otlp_url = await serve(app)
    up = web.Application()
    up.router.add_post("/{tail:.*}", recorder.handle)
    up_runner, up_url = await serve(up)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_url)  # the SDK reads the standard variables
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tokensforge-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    settings = gateway_settings(write_catalog(tmp_path / "catalog.toml", up_url + "/v1"), tracing=True)
    try:
        ctx, url, gw_app = await start_gateway(settings, dsn)
        async with ctx, aiohttp.ClientSession() as session:
            assert tracing.ON
            harness = Gw(url, dsn, gateway_of(gw_app), mock_upstream, session)
            try:
                yield harness, collector, recorder
            finally:
                for client in harness.clients:
                    await client.close()
        assert not tracing.ON  # the app's cleanup exported what was buffered and stopped
    finally:
        await up_runner.cleanup()
        await otlp_runner.cleanup()


async def test_one_request_is_one_trace_continued_from_the_caller_and_passed_upstream(
        traced: tuple[Gw, Collector, Recorder]) -> None:
    gw, collector, recorder = traced
    _, key = await gw.account(routed=10**9)
    status, answer, headers = await gw.post(
        "/v1/chat/completions", key, {"model": "flaky-chain", "route": "routed", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": "hi"}]},
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert status == 200, answer
    receipt = answer["receipt"]
    assert [a["outcome"] for a in receipt["attempts"]] == ["connect", "ok"]

    deadline = time.monotonic() + 10
    while not any(s["name"] == "POST /v1/chat/completions" for s in collector.spans):
        assert time.monotonic() < deadline, collector.spans
        await asyncio.sleep(0.05)
    spans = [s for s in collector.spans if s["trace_id"] == TRACE_ID]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)

    server = by_name["POST /v1/chat/completions"][0]
    assert server["parent"] == PARENT_ID and server["kind"] == 2  # SERVER, continuing the caller's trace
    assert server["resource"]["service.name"] == "tokensforge-test"
    attrs = server["attributes"]
    assert attrs["gen_ai.request.model"] == "flaky-chain" and attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.response.model"] == receipt["upstream_model"]
    assert attrs["gen_ai.usage.input_tokens"] == receipt["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == receipt["usage"]["completion_tokens"]
    request_id = {k.lower(): v for k, v in headers.items()}["x-request-id"]
    assert attrs["tokensforge.request_id"] == receipt["request_id"] == request_id
    assert attrs["tokensforge.route.kind"] == receipt["route"]["kind"]
    assert attrs["tokensforge.bucket"] == receipt["bucket"]
    assert attrs["tokensforge.charge_nanos"] == receipt["charge_nanos"] > 0
    assert attrs["http.response.status_code"] == 200

    admission = by_name["tokensforge.admission"][0]
    hold = by_name["tokensforge.hold"][0]
    settlement = by_name["tokensforge.settlement"][0]
    assert admission["parent"] == server["span_id"] and hold["parent"] == admission["span_id"]
    assert hold["attributes"]["tokensforge.reserved_nanos"] == receipt["reserved_nanos"]
    assert settlement["parent"] == server["span_id"]
    assert settlement["attributes"]["tokensforge.charge_nanos"] == receipt["charge_nanos"]

    attempts = [s for s in spans if s["kind"] == 3]  # CLIENT
    assert [a["attributes"]["tokensforge.channel"] for a in attempts] == ["dead", "relay-b"]
    assert all(a["parent"] == server["span_id"] for a in attempts)
    failed, served = attempts
    assert failed["attributes"]["tokensforge.attempt.outcome"] == "connect" and failed["status"] == 2  # ERROR
    assert served["attributes"]["tokensforge.attempt.outcome"] == "ok"
    assert served["attributes"]["http.response.status_code"] == 200
    assert served["name"] == "chat up-chain-b" and served["attributes"]["gen_ai.request.model"] == "up-chain-b"
    # the upstream was handed the served attempt's context
    assert recorder.traceparents == [f"00-{TRACE_ID}-{served['span_id']}-01"]
    assert len(spans) == 6
