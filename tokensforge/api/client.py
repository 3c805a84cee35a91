"""The OpenAI-compatible proxy endpoints: chat completions (unary and SSE) and embeddings.

Handlers only translate HTTP: they decode the dialect, hand the canonical request to a
`Lifecycle` (which owns reservation, channel, upstream response and settlement), and
encode the answer back. `stream_answer` and `proxy_headers` are shared by every dialect.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from ..canonical import Frame, Request, Response, Usage
from ..catalog import Model, Route
from ..dialects import openai_chat
from ..errors import InvalidRequest, TokensForgeError, UpstreamError
from ..exchange import EmbeddingExchange, ModelExchange
from ..lifecycle import Lifecycle, StreamOutcome
from ..policy import EffectivePolicy
from ..pricing import embedding_inputs, output_allowance, size_request, size_embedding
from ..receipts import answer_id
from ..routing import find_model, select_route
from ..state import Gateway
from .auth import authenticate
from .common import REQUEST_ID, STREAM, json_response, read_json

log = logging.getLogger("tokensforge.api")
routes = web.RouteTableDef()

SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}


def route_pin(request: web.Request, body: dict[str, Any]) -> str | None:
    """x-tokensforge-route header or body "route" (removed: the upstream must not see it)."""
    pin = body.pop("route", None)
    header = request.headers.get("x-tokensforge-route")
    pin = header or pin
    if pin is not None and (not isinstance(pin, str) or not pin):
        raise InvalidRequest("'route' must be a route id or route kind", param="route")
    return pin


def choose(gw: Gateway, policy: EffectivePolicy, request: web.Request, body: dict[str, Any],
           model_type: str, where: str) -> tuple[Model, Route, bool]:
    """The model and route a request is charged on (SPEC §1 route selection)."""
    model = find_model(gw.catalog, body.get("model"))
    if model.type != model_type:
        raise InvalidRequest(f"model {model.id!r} is a {model.type} model, not usable at {where}", param="model")
    pin = route_pin(request, body)
    return model, select_route(model, policy, pin), pin is not None


def proxy_headers(life: Lifecycle, *, answered: bool) -> dict[str, str]:
    t = life.trace
    route = life.route
    headers = {
        "x-request-id": t.request_id,
        "x-tokensforge-route": route.id,
        "x-tokensforge-route-kind": route.kind,
        "x-tokensforge-bucket": route.bucket,
        "x-tokensforge-upstream-model": t.upstream_model or "",
        "x-tokensforge-reserved-nanos": str(t.reserved_nanos),
    }
    if answered:
        headers["x-tokensforge-channel"] = t.served_by or ""
        headers["x-tokensforge-fallback"] = t.fallback_kind
    if t.notes:  # what the serving channel could not take, named (the receipt's notes say why)
        headers["x-tokensforge-dropped"] = dropped_header(t.notes)
    return headers


def dropped_header(notes: list[str]) -> str:
    """"dropped: web_search (hosted tool)" notes → "web_search, …" (header-safe)."""
    names = (n.removeprefix("dropped:").strip().split(" (")[0] for n in notes if n.startswith("dropped:"))
    return ", ".join(n for n in names if n).encode("ascii", "replace").decode()[:1000]


def receipt_headers(life: Lifecycle, receipt: dict[str, Any]) -> dict[str, str]:
    headers = proxy_headers(life, answered=True)
    headers["x-tokensforge-charge-nanos"] = str(receipt["charge_nanos"])
    headers["x-tokensforge-ledger-entry"] = receipt["ledger_entry_id"] or ""
    return headers


async def admit_model_request(life: Lifecycle, model: Model, route: Route, req: Request, *, api: str = "chat",
                              body: dict[str, Any] | None = None, beta: str | None = None) -> ModelExchange:
    """Size and hold a request; the exchange forwards exactly the output cap reserved for, natively to a
    channel that speaks `api` (the client's `body` as sent) and translated to any other."""
    sizing = size_request(req, model, route)
    life.trace.notes = req.notes  # the same list: upstream codecs add what they had to drop
    await life.admit(sizing)
    return ModelExchange(req, output_allowance(req.max_output_tokens, model), api=api, body=body, beta=beta)


class StreamEncoder(Protocol):
    """A dialect's stream encoder, as `stream_answer` drives it."""

    def start(self) -> bytes: ...

    def feed(self, frame: Frame) -> bytes: ...

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes: ...

    def fail(self, error: TokensForgeError, receipt: dict[str, Any] | None) -> bytes: ...


async def stream_answer(request: web.Request, life: Lifecycle, exchange: ModelExchange, translated: StreamEncoder,
                        native: StreamEncoder | None = None,
                        on_settled: Callable[[StreamOutcome], Awaitable[None]] | None = None,
                        ) -> web.StreamResponse:
    """Open the upstream stream, relay it in the client's dialect (as received when the serving channel
    speaks it: `native`), settle, and end with the receipt (or the error event). A client that leaves is
    billed by the lifecycle for what reached it."""
    await life.open_stream(exchange)
    encoder = native if native is not None and life.native else translated
    response = web.StreamResponse(headers={**SSE_HEADERS, **proxy_headers(life, answered=True)})
    # Events that arrived in one read leave in one write: a write is a syscall and a chunk of aiohttp's
    # framing, the largest per-event cost of a relay. Nothing waits in `batch` while the upstream is
    # awaited: it is written as soon as no further event is already buffered. `next_frame` counts the
    # previous frame as delivered; `unsent` is what it counted of frames still in `batch`, taken back
    # if their write fails (a client that leaves is billed for what was written to it).
    batch, unsent = b"", 0
    try:
        await response.prepare(request)
        request[STREAM] = response
        batch = encoder.start()
        while True:
            counted = life.delivered
            frame = await life.next_frame()
            if batch:
                unsent += life.delivered - counted
            if frame is None:
                break
            batch += encoder.feed(frame)
            if batch and not life.frame_ready():
                await response.write(batch)
                batch, unsent = b"", 0
        if batch:
            await response.write(batch)
            batch, unsent = b"", 0
        outcome = await life.finish_stream()
        if on_settled is not None:  # before the client hears the end (a follow-up may come at once)
            await on_settled(outcome)
    except ConnectionError:
        life.delivered -= unsent
        life.client_gone()
        return response
    except Exception as exc:  # a gateway bug after the answer started: end the stream, the exit settles
        life.interrupted(exc)
        await _write_quietly(response, encoder.fail(UpstreamError("the stream was interrupted by a gateway error"),
                                                    None))
        return response
    if outcome.error is None and outcome.receipt is not None:
        tail = encoder.finish(outcome.usage, outcome.receipt)
    else:
        assert outcome.error is not None
        tail = encoder.fail(outcome.error, outcome.receipt)
    await _write_quietly(response, tail)
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    """The last bytes of a stream whose money is already settled: a client that left misses only them."""
    try:
        await response.write(data)
        await response.write_eof()
    except Exception:  # whatever broke the tail, the money is settled
        log.info("the end of a stream did not reach its client")


class _ChatStream:
    """openai_chat.StreamEncoder with the shared encoder protocol."""

    def __init__(self, inner: openai_chat.StreamEncoder) -> None:
        self.inner = inner

    def start(self) -> bytes:
        return self.inner.start()

    def feed(self, frame: Frame) -> bytes:
        return self.inner.feed(frame)

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        return self.inner.finish(usage, receipt)

    def fail(self, error: TokensForgeError, receipt: dict[str, Any] | None) -> bytes:
        return self.inner.fail(error.body()["error"])


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    gw, identity, policy = await authenticate(request)
    async with Lifecycle(gw, identity, policy, request[REQUEST_ID], "chat.completions") as life:
        body = await read_json(request)
        model, route, pinned = choose(gw, policy, request, body, "chat", "/v1/chat/completions")
        life.begin(model, route, pinned=pinned)
        req = openai_chat.decode(body)
        exchange = await admit_model_request(life, model, route, req)
        completion_id = answer_id(life.trace.request_id, "chatcmpl-")
        if req.stream:
            encoder = openai_chat.StreamEncoder(completion_id=completion_id, request=req,
                                                include_usage=openai_chat.wants_usage(body))
            return await stream_answer(request, life, exchange, _ChatStream(encoder))
        answer = await life.call(exchange)
        receipt = await life.succeed(answer)
        usage = life.trace.usage or Usage(0, 0)
        data = openai_chat.encode_response(answer, completion_id=completion_id, request=req, usage=usage,
                                           receipt=receipt)
        return json_response(data, headers=receipt_headers(life, receipt))


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    gw, identity, policy = await authenticate(request)
    async with Lifecycle(gw, identity, policy, request[REQUEST_ID], "embeddings") as life:
        body = await read_json(request)
        model, route, pinned = choose(gw, policy, request, body, "embedding", "/v1/embeddings")
        life.begin(model, route, pinned=pinned)
        embedding_inputs(body)
        await life.admit(size_embedding(body, route))
        answer = await life.call(EmbeddingExchange(body))
        receipt = await life.succeed(answer)
        data = answer.raw or {}
        if not isinstance(data.get("usage"), dict) and life.trace.usage is not None:
            data["usage"] = {"prompt_tokens": life.trace.usage.prompt_tokens,
                             "total_tokens": life.trace.usage.prompt_tokens}
        data["receipt"] = receipt
        return json_response(data, headers=receipt_headers(life, receipt))


async def complete(life: Lifecycle, model: Model, route: Route, req: Request) -> tuple[Response, dict[str, Any]]:
    """Admit, serve and settle a non-streamed canonical request (the research assistant's sections)."""
    exchange = await admit_model_request(life, model, route, req)
    answer = await life.call(exchange)
    return answer, await life.succeed(answer)
