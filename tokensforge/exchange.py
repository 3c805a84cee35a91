"""What a client request sends to each kind of channel and how the answer is read back.

`ModelExchange` carries a canonical request (from any client dialect) to OpenAI-kind
or Anthropic-kind channels through the upstream codecs; `EmbeddingExchange` forwards an
embeddings body. Both are pure apart from the codecs they call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from . import native
from .canonical import Frame, MalformedUpstream, Request, Response, Usage, Wire, token_count
from .catalog import Channel, Model, Route
from .channel_walk import StreamDecoder
from .pricing import Reservation, embedding_input_tokens, size_request, size_embedding, typical_request_tokens
from .upstream import anthropic as anthropic_codec
from .upstream import openai as openai_codec
from .upstream import openai_responses as responses_codec


class ModelExchange:
    """A chat-like request from any client API; `allowance` is the output cap the reservation covers.

    Per attempt it is native or translated (SPEC §1): a channel that speaks the client's `api` gets the
    client's own `body` with model, cap and stream-usage switch rewritten, and its answer is relayed as
    received; any other channel gets the canonical request encoded by its upstream codec."""

    def __init__(self, request: Request, allowance: int, *, api: str = "chat", body: dict[str, Any] | None = None,
                 beta: str | None = None) -> None:
        self.request = request
        self.stream = request.stream
        self.allowance = allowance
        self.api = api  # "chat" | "responses" | "messages"
        self.body = body if body is not None else request.raw  # the client's body (native relays send it)
        self.bodies: dict[str, dict[str, Any]] = {}  # channel id → the body that channel gets instead
        self.beta = beta  # anthropic-beta from the client, forwarded to Anthropic channels

    def native(self, channel: Channel) -> bool:
        """Whether `channel` is sent the client's own body (it speaks the client's API)."""
        return channel.speaks(self.api) and (self.body is not None or self.api == "chat")

    def payload(self, channel: Channel, upstream_model: str) -> tuple[str, bytes, dict[str, str]]:
        headers = {"anthropic-beta": self.beta} if self.beta and channel.kind == "anthropic" else {}
        if self.api != "chat" and self.native(channel):
            assert self.body is not None
            path = "/messages" if self.api == "messages" else responses_codec.PATH
            body = self.bodies.get(channel.id, self.body)
            return path, native.patch_body(self.api, body, upstream_model, self.allowance), headers
        if channel.kind == "anthropic":
            req = self.request
            if req.max_output_tokens is None:  # Anthropic requires a cap: the one reserved for
                req = dataclasses.replace(req, max_output_tokens=self.allowance)
            return "/messages", anthropic_codec.build(req, upstream_model), headers
        req = self.request
        if req.raw is not None and self.api != "chat":  # the raw body is forwarded only to a chat-speaking peer
            req = dataclasses.replace(req, raw=None)
        return openai_codec.PATH, openai_codec.build(req, upstream_model), {}

    def parse(self, channel: Channel, data: dict[str, Any]) -> Response:
        if channel.kind == "anthropic":
            answer = anthropic_codec.parse_response(data)
            if self.native(channel):
                answer.wire = data
            return answer
        if self.api == "responses" and self.native(channel):
            return responses_codec.parse_response(data)
        return openai_codec.parse_response(data)

    def decoder(self, channel: Channel) -> StreamDecoder:
        if channel.kind == "anthropic":
            return _AnthropicDecoder(anthropic_codec.StreamDecoder(), wire=self.native(channel))
        if self.api == "responses" and self.native(channel):
            return responses_codec.StreamDecoder()
        return openai_codec.StreamDecoder()

    def typical_input_tokens(self) -> int:
        return typical_request_tokens(self.request)

    def size(self, model: Model, route: Route) -> Reservation:
        return size_request(self.request, model, route)

    def estimate(self, response: Response) -> Usage:
        """Usage when the upstream reported none: typical input, ceil(bytes / 4) of the answer."""
        output = sum(len((c.text or "").encode("utf-8")) + sum(len(t.arguments) for t in c.tool_calls)
                     for c in response.choices)
        return Usage(self.typical_input_tokens(), -(-output // 4))


class _AnthropicDecoder:
    """Adapts the Anthropic stream decoder to the walk's (event, bytes) interface."""

    def __init__(self, inner: anthropic_codec.StreamDecoder, *, wire: bool) -> None:
        self.inner = inner
        self.wire = wire  # keep each event as it arrived, for a Messages client (native relay)

    def feed(self, event: str | None, data: bytes) -> Any:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedUpstream("the upstream sent an event that is not JSON") from None
        if not isinstance(payload, dict):
            raise MalformedUpstream("the upstream sent an event that is not a JSON object")
        frame = self.inner.feed(event, payload)
        return Frame(frame.events, wire=Wire(event, data, payload)) if self.wire else frame


class EmbeddingExchange:
    """An OpenAI embeddings body, forwarded with the channel's model name."""

    stream = False

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def native(self, channel: Channel) -> bool:
        return True  # forwarded as sent, model aside

    def payload(self, channel: Channel, upstream_model: str) -> tuple[str, bytes, dict[str, str]]:
        assert channel.kind == "openai", "the catalog only lets OpenAI-kind channels serve embeddings"
        return "/embeddings", orjson.dumps({**self.body, "model": upstream_model}), {}

    def parse(self, channel: Channel, data: dict[str, Any]) -> Response:
        if not isinstance(data.get("data"), list):
            problem = openai_codec.error_in(data)
            raise MalformedUpstream(problem or "the upstream embeddings answer has no data")
        usage = data.get("usage")
        prompt = token_count(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        model = data.get("model")
        return Response(model if isinstance(model, str) else "", [], None if prompt is None else Usage(prompt, 0),
                        raw=data)

    def decoder(self, channel: Channel) -> StreamDecoder:
        raise AssertionError("embeddings are never streamed")

    def typical_input_tokens(self) -> int:
        return embedding_input_tokens(self.body, upper=False)

    def size(self, model: Model, route: Route) -> Reservation:
        return size_embedding(self.body, route)

    def estimate(self, response: Response) -> Usage:
        return Usage(self.typical_input_tokens(), 0)
