"""The OpenAI-compatible proxy endpoints: chat completions (unary and SSE) and embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..errors import InvalidRequest, LedgerUnavailable, TokensForgeError, UpstreamError
from ..pricing import (
    Usage,
    embedding_input_tokens,
    embedding_inputs,
    typical_input_tokens,
    usage_from,
)
from ..proxy import Call, Served
from ..receipts import Trace
from ..routing import find_model, select_route
from .auth import authenticate
from .common import REQUEST_ID, json_response, read_json

routes = web.RouteTableDef()

_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}


def route_pin(request: web.Request, body: dict[str, Any]) -> str | None:
    """x-tokensforge-route header or body "route" (removed: the upstream must not see it)."""
    pin = body.pop("route", None)
    header = request.headers.get("x-tokensforge-route")
    pin = header or pin
    if pin is not None and (not isinstance(pin, str) or not pin):
        raise InvalidRequest("'route' must be a route id or route kind", param="route")
    return pin


async def _start(request: web.Request, endpoint: str) -> tuple[Call, dict[str, Any]]:
    """Authenticate, choose the route and reserve; every refusal leaves a usage record."""
    gw, identity, policy = await authenticate(request)
    trace = Trace(request[REQUEST_ID], identity.account_id, identity.project_id, identity.key_id, endpoint=endpoint)
    call = Call(gw, identity, policy, trace)
    try:
        body = await read_json(request)
        model = find_model(gw.catalog, body.get("model"))
        trace.selected_model = model.id
        expected = "embedding" if endpoint == "embeddings" else "chat"
        if model.type != expected:
            raise InvalidRequest(f"model {model.id!r} is a {model.type} model, not usable at /v1/{endpoint}",
                                 param="model")
        pin = route_pin(request, body)
        route = select_route(model, policy, pin)
        trace.route = route
        call.pinned = pin is not None
        _validate(endpoint, body)
        await call.admit(model, route, body)
    except TokensForgeError as exc:
        if trace.selected_model is not None:
            await call.refuse(exc)
        raise
    except asyncio.CancelledError:  # the client left while the money was being held
        if call.reservation_id is not None:
            await call.abandon(UpstreamError("the client disconnected before the request ran"), "client_cancelled")
        raise
    return call, body


def _validate(endpoint: str, body: dict[str, Any]) -> None:
    if endpoint == "embeddings":
        embedding_inputs(body)
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be a non-empty array of message objects", param="messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")


def _payload_maker(body: dict[str, Any], *, stream: bool) -> Callable[[str], bytes]:
    """The forwarded body: unknown fields intact, `model` → the channel's upstream model."""
    body = dict(body)
    if stream:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True  # always: settlement needs the upstream's count
        body["stream_options"] = options

    def payload(upstream_model: str) -> bytes:
        body["model"] = upstream_model
        return orjson.dumps(body)
    return payload


def _headers(call: Call, served: Served | None = None) -> dict[str, str]:
    t = call.trace
    assert t.route is not None
    headers = {
        "x-tokensforge-route": t.route.id,
        "x-tokensforge-route-kind": t.route.kind,
        "x-tokensforge-bucket": t.route.bucket,
        "x-tokensforge-upstream-model": t.upstream_model or "",
        "x-tokensforge-reserved-nanos": str(t.reserved_nanos),
    }
    if served is not None:
        headers["x-tokensforge-channel"] = served.channel_id
        headers["x-tokensforge-fallback"] = t.fallback_kind
    return headers


async def _serve_or_abandon(call: Call, path: str, body: dict[str, Any], *, stream: bool) -> Served:
    try:
        return await call.serve(path, _payload_maker(body, stream=stream), stream=stream)
    except TokensForgeError as exc:
        await call.abandon(exc)
        raise
    except asyncio.CancelledError:  # the client went away while the upstream worked
        await call.abandon(UpstreamError("the client disconnected before the answer"), "client_cancelled")
        raise
    except BaseException:
        await call.abandon(UpstreamError("the request was interrupted"))
        raise


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    call, body = await _start(request, "chat.completions")
    if body.get("stream"):
        return await _stream_chat(request, call, body)
    return await _unary(call, body, "/chat/completions")


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    call, body = await _start(request, "embeddings")
    return await _unary(call, body, "/embeddings")


async def complete(call: Call, body: dict[str, Any], path: str) -> tuple[dict[str, Any], Served]:
    """Serve an admitted non-streamed request and settle it; the answer carries its receipt."""
    lease = asyncio.create_task(call.keep_alive())  # slow upstreams and retries may outlast the TTL
    try:
        served = await _serve_or_abandon(call, path, body, stream=False)
    finally:
        lease.cancel()
    data = served.data
    assert data is not None
    usage = usage_from(data.get("usage"))
    source = "upstream"
    if usage is None:
        usage, source = _estimate_unary(body, data, path), "estimated"
    try:
        receipt = await call.settle("succeeded", usage, source)
    except LedgerUnavailable:
        raise LedgerUnavailable("the ledger is unavailable, so the answer is withheld; nothing was charged") from None
    data["receipt"] = receipt
    return data, served


async def _unary(call: Call, body: dict[str, Any], path: str) -> web.Response:
    data, served = await complete(call, body, path)
    receipt = data["receipt"]
    headers = _headers(call, served)
    headers["x-tokensforge-charge-nanos"] = str(receipt["charge_nanos"])
    headers["x-tokensforge-ledger-entry"] = receipt["ledger_entry_id"] or ""
    return json_response(data, headers=headers)


def _estimate_unary(body: dict[str, Any], data: dict[str, Any], path: str) -> Usage:
    if path == "/embeddings":
        return Usage(embedding_input_tokens(body, upper=False), 0)
    delivered = 0
    for choice in data.get("choices") or []:
        content = (choice.get("message") or {}).get("content") if isinstance(choice, dict) else None
        if isinstance(content, str):
            delivered += -(-len(content.encode("utf-8")) // 4)
    return Usage(typical_input_tokens(body), delivered)


class _StreamState:
    """What a stream delivered so far: enough to bill it whatever way it ends."""

    def __init__(self) -> None:
        self.content_chunks = 0
        self.usage: Usage | None = None
        self.usage_event: dict[str, Any] | None = None
        self.done = False
        self.upstream_error: str | None = None


async def _stream_chat(request: web.Request, call: Call, body: dict[str, Any]) -> web.StreamResponse:
    served = await _serve_or_abandon(call, "/chat/completions", body, stream=True)
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": call.trace.request_id,
                                            **_headers(call, served)})
    state = _StreamState()
    lease = asyncio.create_task(call.keep_alive())
    try:
        await response.prepare(request)
        client_gone = not await _pump(served, response, state)
    except (ConnectionError, asyncio.CancelledError):
        lease.cancel()
        served.end(abort=True)  # cancel the upstream request now, not when it would finish
        await _finish_stream(call, body, state, None, wants_usage, client_gone=True)
        raise
    lease.cancel()
    served.end(abort=client_gone or state.upstream_error is not None)
    await _finish_stream(call, body, state, response, wants_usage, client_gone)
    return response


async def _pump(served: Served, response: web.StreamResponse, state: _StreamState) -> bool:
    """Copy upstream events to the client verbatim; hold back the usage event. False: client left."""
    content = served.response.content
    while True:
        try:
            line = await content.readline()
        except (TimeoutError, aiohttp.ClientError) as exc:
            state.upstream_error = f"the upstream stream broke ({type(exc).__name__})"
            return True
        if not line:
            if not state.done:
                state.upstream_error = "the upstream stream ended early"
            return True
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            state.done = True
            return True
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        if "error" in event:
            state.upstream_error = "the upstream reported an error mid-stream"
            return True
        usage = usage_from(event.get("usage"))
        if usage is not None and not event.get("choices"):
            state.usage, state.usage_event = usage, event
            continue
        if usage is not None:
            state.usage = usage
        for choice in event.get("choices") or ():
            if isinstance(choice, dict) and (choice.get("delta") or {}).get("content"):
                state.content_chunks += 1
        try:
            await response.write(b"data: " + data + b"\n\n")
        except ConnectionError:
            return False


async def _finish_stream(call: Call, body: dict[str, Any], state: _StreamState,
                         response: web.StreamResponse | None, wants_usage: bool, client_gone: bool) -> None:
    """Bill by how the stream ended and the route's failure policy; then close it properly."""
    route = call.trace.route
    assert route is not None
    delivered = Usage(state.usage.prompt_tokens if state.usage else typical_input_tokens(body),
                      state.content_chunks)
    if client_gone or state.upstream_error:
        status = "client_cancelled" if client_gone else "failed"
        if state.upstream_error:
            call.trace.error = {"code": "upstream_error", "message": state.upstream_error}
        billed = delivered if route.on_failure == "charge_delivered" and state.content_chunks else Usage(0, 0)
        usage, source = (state.usage, "upstream") if state.usage else (delivered, "estimated")
        try:
            await call.settle(status, usage, source, charge_usage=billed)
        except LedgerUnavailable:
            call.settle_later(status, usage, source, charge_usage=billed)
        if response is not None and state.upstream_error:
            await _write_quietly(response, _error_event("upstream_error", state.upstream_error))
        return
    usage, source = (state.usage, "upstream") if state.usage else (delivered, "estimated")
    try:
        receipt = await call.settle("succeeded", usage, source)
    except LedgerUnavailable as exc:  # the answer is out: its charge is posted when the ledger returns
        call.settle_later("succeeded", usage, source)
        assert response is not None
        await _write_quietly(response, _error_event(
            exc.code, "the answer was delivered but the ledger is unavailable: no receipt yet; the charge "
                      f"is posted when the ledger is back (GET /v1/receipts/{call.trace.request_id})"))
        return
    assert response is not None
    if wants_usage:
        event = state.usage_event or {"id": call.trace.request_id, "object": "chat.completion.chunk",
                                      "model": call.trace.selected_model, "choices": []}
        event["usage"] = usage.as_dict()
        event["receipt"] = receipt
        await _write_quietly(response, b"data: " + orjson.dumps(event) + b"\n\n")
    await _write_quietly(response, b"data: [DONE]\n\n")
    await _eof_quietly(response)


def _error_event(code: str, message: str) -> bytes:
    error = {"message": message, "type": "upstream_error" if code.startswith("upstream") else "server_error",
             "param": None, "code": code}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionError:
        pass


async def _eof_quietly(response: web.StreamResponse) -> None:
    try:
        await response.write_eof()
    except ConnectionError:
        pass
