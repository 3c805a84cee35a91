"""What a client request sends to each kind of channel and how the answer is read back.

`ModelExchange` carries a canonical request (from any client dialect) to OpenAI-kind
or Anthropic-kind channels through the upstream codecs; `EmbeddingExchange` forwards an
embeddings body. Both are pure apart from the codecs they call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from .canonical import MalformedUpstream, Request, Response, Usage, token_count
from .catalog import Channel, Model, Route
from .channel_walk import StreamDecoder
from .pricing import Reservation, embedding_input_tokens, size_request, size_embedding, typical_request_tokens
from .upstream import anthropic as anthropic_codec
from .upstream import openai as openai_codec


class ModelExchange:
    """A canonical chat-like request; `allowance` is the output cap the reservation covers."""

    def __init__(self, request: Request, allowance: int, *, beta: str | None = None) -> None:
        self.request = request
        self.stream = request.stream
        self.allowance = allowance
        self.beta = beta  # anthropic-beta from the client, forwarded to Anthropic channels

    def payload(self, channel: Channel, upstream_model: str) -> tuple[str, bytes, dict[str, str]]:
        if channel.kind == "anthropic":
            req = self.request
            if req.max_output_tokens is None:  # Anthropic requires a cap: the one reserved for
                req = dataclasses.replace(req, max_output_tokens=self.allowance)
            headers = {"anthropic-beta": self.beta} if self.beta else {}
            return "/messages", anthropic_codec.build(req, upstream_model), headers
        return openai_codec.PATH, openai_codec.build(self.request, upstream_model), {}

    def parse(self, channel: Channel, data: dict[str, Any]) -> Response:
        if channel.kind == "anthropic":
            return anthropic_codec.parse_response(data)
        return openai_codec.parse_response(data)

    def decoder(self, channel: Channel) -> StreamDecoder:
        if channel.kind == "anthropic":
            return _AnthropicDecoder(anthropic_codec.StreamDecoder())
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

    def __init__(self, inner: anthropic_codec.StreamDecoder) -> None:
        self.inner = inner

    def feed(self, event: str | None, data: bytes) -> Any:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedUpstream("the upstream sent an event that is not JSON") from None
        if not isinstance(payload, dict):
            raise MalformedUpstream("the upstream sent an event that is not a JSON object")
        return self.inner.feed(event, payload)


class EmbeddingExchange:
    """An OpenAI embeddings body, forwarded with the channel's model name."""

    stream = False

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

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
