"""POST /v1/responses: the OpenAI Responses API over the same lifecycle, billing and receipts as chat."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from .. import native
from ..canonical import Frame, MalformedUpstream, Request, Response, Usage
from ..conversations import ConversationStore, input_items
from ..dialects import openai_responses
from ..errors import LedgerUnavailable, TokensForgeError
from ..lifecycle import Lifecycle, StreamOutcome
from ..receipts import answer_id
from ..upstream import openai_responses as responses_codec
from .auth import authenticate
from .client import admit_model_request, choose, receipt_headers, stream_answer
from .common import REQUEST_ID, json_response, read_json

log = logging.getLogger("tokensforge.api")
routes = web.RouteTableDef()


class _ResponsesStream:
    """openai_responses.StreamEncoder with the shared encoder protocol."""

    def __init__(self, inner: openai_responses.StreamEncoder) -> None:
        self.inner = inner
        self._tail: bytes | None = None

    def start(self) -> bytes:
        return self.inner.start()

    def feed(self, frame: Frame) -> bytes:
        return b"".join(self.inner.feed(event) for event in frame.events)

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        if self._tail is None:  # built once: final_response may have built it first
            self._tail = self.inner.finish(usage, receipt)
        return self._tail

    def final_response(self, usage: Usage, receipt: dict[str, Any]) -> dict[str, Any]:
        """The terminal event's `response`, exactly as `finish` will send it (stored before it is sent)."""
        tail = self.finish(usage, receipt)
        response: dict[str, Any] = orjson.loads(tail[tail.rindex(b"\ndata: ") + 7:])["response"]
        return response

    def fail(self, error: TokensForgeError, receipt: dict[str, Any] | None) -> bytes:
        return self.inner.fail(error.body()["error"], receipt)


async def _save(store: ConversationStore, response_id: str, account_id: str, request: Request,
                answer: Response, *, response: dict[str, Any], client_input: Any,
                upstream: tuple[Lifecycle, str | None] | None = None) -> None:
    """Keep what a follow-up turn needs and what GET /v1/responses/{id} shows: `response` as the client
    receives it and the client's `input` as items; a ledger outage costs the chain, never the answer.
    `upstream`: a native answer's own id at its channel (a follow-up served there names it instead)."""
    upstream_id = channel_id = None
    if upstream is not None and upstream[0].native and upstream[1]:  # stored here ⇒ `store` was not false there
        upstream_id, channel_id = upstream[1], upstream[0].trace.served_by
    try:
        await store.save(response_id, account_id, openai_responses.history(request, answer), response=response,
                         input_items=input_items(client_input, response_id), upstream_response_id=upstream_id,
                         channel_id=channel_id)
    except LedgerUnavailable:
        log.warning("could not store response %s for a follow-up turn", response_id)


def _relayed(response: dict[str, Any] | None) -> Response | None:
    """The canonical form of a relayed response object (what a follow-up turn needs), None if unreadable."""
    if response is None:
        return None
    try:
        return responses_codec.parse_response(response)
    except MalformedUpstream:
        return None


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    gw, identity, policy = await authenticate(request)
    async with Lifecycle(gw, identity, policy, request[REQUEST_ID], "responses") as life:
        body = await read_json(request)
        options = openai_responses.options(body)
        model, route, pinned = choose(gw, policy, request, body, "chat", "/v1/responses")
        life.begin(model, route, pinned=pinned)
        store = ConversationStore(gw.pool)
        turn = await store.load_turn(options.previous_response_id, identity.account_id) \
            if options.previous_response_id else None
        req = openai_responses.decode(body, openai_responses.load_history(turn.history) if turn else [])
        exchange = await admit_model_request(life, model, route, req, api="responses",
                                             body=native.expand_previous(body, turn.history) if turn else body)
        if turn is not None and turn.upstream_response_id and turn.channel_id:
            # the channel that served the previous turn natively knows it by its own id: it gets the client's
            # body with that id; any other channel gets the stored turns in front of the input
            exchange.bodies[turn.channel_id] = {**body, "previous_response_id": turn.upstream_response_id}
        response_id, created = answer_id(life.trace.request_id, "resp_"), int(time.time())
        if req.stream:
            encoder = openai_responses.StreamEncoder(response_id=response_id, request=req, created_at=created)
            events = _ResponsesStream(encoder)
            relay = native.ResponsesRelay(response_id=response_id, model=req.model)

            async def keep(outcome: StreamOutcome) -> None:
                if not (options.store and outcome.status == "succeeded" and outcome.receipt is not None):
                    return
                if life.native:
                    shown = relay.final_response(outcome.usage, outcome.receipt)
                    answer = _relayed(shown)
                    if answer is not None:
                        await _save(store, response_id, identity.account_id, req, answer, response=shown,
                                    client_input=body.get("input"), upstream=(life, relay.upstream_id))
                else:
                    await _save(store, response_id, identity.account_id, req, encoder.output(),
                                response=events.final_response(outcome.usage, outcome.receipt),
                                client_input=body.get("input"))

            return await stream_answer(request, life, exchange, events, relay, keep)
        answer = await life.call(exchange)
        receipt = await life.succeed(answer)
        upstream_id = None
        if answer.wire is not None:  # a Responses-speaking channel answered: relayed as received
            upstream_id = answer.wire.get("id")
            data = native.relay_message(answer.wire, message_id=response_id, model=req.model, receipt=receipt)
        else:
            data = openai_responses.encode_response(answer, response_id=response_id, request=req,
                                                    created_at=created, usage=life.trace.usage or Usage(0, 0),
                                                    receipt=receipt)
        if options.store:
            await _save(store, response_id, identity.account_id, req, answer, response=data,
                        client_input=body.get("input"),
                        upstream=(life, upstream_id if isinstance(upstream_id, str) else None))
        return json_response(data, headers=receipt_headers(life, receipt))
