"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API over the shared lifecycle.

Errors on these paths are rendered in Anthropic's shape by the middleware (`anthropic_path`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import native
from ..canonical import Frame, MalformedUpstream, Request, Usage
from ..catalog import Model
from ..dialects import anthropic_messages
from ..errors import TokensForgeError, UpstreamError
from ..forwarded import forwardable_beta
from ..lifecycle import Lifecycle
from ..pricing import typical_request_tokens
from ..receipts import answer_id
from .auth import authenticate
from .client import admit_model_request, choose, receipt_headers, stream_answer
from .common import REQUEST_ID, json_response, read_json

routes = web.RouteTableDef()


def anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


class _MessagesStream:
    """anthropic_messages.StreamEncoder with the shared encoder protocol."""

    def __init__(self, inner: anthropic_messages.StreamEncoder, input_tokens: int) -> None:
        self.inner, self.input_tokens = inner, input_tokens

    def start(self) -> bytes:
        return self.inner.start(self.input_tokens)

    def feed(self, frame: Frame) -> bytes:
        return b"".join(self.inner.feed(event) for event in frame.events)

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        return self.inner.finish(usage, receipt)

    def fail(self, error: TokensForgeError, receipt: dict[str, Any] | None) -> bytes:
        body = anthropic_messages.error_body(error.status, error.message)["error"]
        return self.inner.fail(body["type"], body["message"])


def clamp_cap(req: Request, model: Model) -> None:
    """Messages requires `max_tokens`, so agents send their own default whatever the model (Claude Code: 32,000
    for a model it does not know): above the catalog model's limit it is lowered to the limit, noted, rather
    than refused — the reservation and the upstream get the limit."""
    cap = req.max_output_tokens
    if cap is not None and cap > model.max_output_tokens:
        req.max_output_tokens = model.max_output_tokens
        req.notes.append(f"clamped: max_tokens {cap} to {model.max_output_tokens} (the model's limit)")


@routes.post("/v1/messages")
async def create_message(request: web.Request) -> web.StreamResponse:
    gw, identity, policy = await authenticate(request)
    async with Lifecycle(gw, identity, policy, request[REQUEST_ID], "messages") as life:
        body = await read_json(request)
        model, route, pinned = choose(gw, policy, request, body, "chat", "/v1/messages")
        life.begin(model, route, pinned=pinned)
        req = anthropic_messages.decode(body, request.headers)  # notes a pricing beta it drops
        clamp_cap(req, model)
        exchange = await admit_model_request(life, model, route, req, api="messages", body=req.raw,
                                             beta=forwardable_beta(request.headers))
        message_id = answer_id(life.trace.request_id, "msg_")
        if req.stream:
            encoder = anthropic_messages.StreamEncoder(message_id=message_id, request=req)
            return await stream_answer(request, life, exchange,
                                       _MessagesStream(encoder, exchange.typical_input_tokens()),
                                       native.MessagesRelay(message_id=message_id, model=req.model))
        answer = await life.call(exchange)
        if answer.wire is not None:  # an Anthropic-kind channel answered: relayed as received
            receipt = await life.succeed(answer)
            data = native.relay_message(answer.wire, message_id=message_id, model=req.model, receipt=receipt)
            return json_response(data, headers=receipt_headers(life, receipt))
        try:  # an answer Messages cannot express (tool arguments that are no JSON object) is not billed
            anthropic_messages.encode_response(answer, message_id=message_id, request=req, usage=Usage(0, 0),
                                               receipt={})
        except MalformedUpstream as exc:
            raise UpstreamError(f"the upstream answer cannot be expressed as a Message: {exc}") from None
        receipt = await life.succeed(answer)
        data = anthropic_messages.encode_response(answer, message_id=message_id, request=req,
                                                  usage=life.trace.usage or Usage(0, 0), receipt=receipt)
        return json_response(data, headers=receipt_headers(life, receipt))


@routes.post("/v1/messages/count_tokens")
async def count_tokens(request: web.Request) -> web.Response:
    """The gateway's own count (the typical estimate settlement uses when an upstream reports none);
    it charges nothing and writes no ledger entry."""
    gw, _, policy = await authenticate(request)
    body = await read_json(request)
    choose(gw, policy, request, body, "chat", "/v1/messages/count_tokens")
    req = anthropic_messages.decode_count_tokens(body)
    return json_response(anthropic_messages.count_tokens_response(typical_request_tokens(req)))
