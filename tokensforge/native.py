"""Native relays (SPEC §1 "native first"): the client's body goes up as sent, the answer comes down as received.

When the serving channel speaks the client's API, nothing is translated: on the way up only `model`
(→ the channel's upstream model), the output cap (→ what was reserved) and the stream-usage switch are
rewritten; on the way down the answer's `id` becomes the gateway's (so any id a client holds finds its
receipt) and its `model` the one the client asked for (relay names stay on the receipt), and the receipt
is added where SPEC §2 puts it — everything else (thinking and its signatures, reasoning items, cache
counts, annotations, event types the gateway has never heard of) passes unchanged. Pure: dicts and
bytes in, bytes out; the events were parsed once by the upstream decoder (`Frame.wire`).
"""

from __future__ import annotations

from typing import Any

import orjson

from .canonical import Frame, Usage, Wire
from .dialects import anthropic_messages
from .errors import TokensForgeError
from .upstream.openai_responses import FINAL_EVENTS

#: the field that carries the output cap, per client API
CAP_FIELDS = {"responses": "max_output_tokens", "messages": "max_tokens"}


def patch_body(api: str, body: dict[str, Any], upstream_model: str, cap: int) -> bytes:
    """The client's body for an upstream that speaks `api` ("responses" | "messages"): its model and cap
    rewritten, every other field as sent. (Chat bodies go through `upstream.openai.build`, which also sets
    the stream-usage switch.)"""
    out = dict(body)
    out["model"] = upstream_model
    out[CAP_FIELDS[api]] = cap
    return orjson.dumps(out)


def expand_previous(body: dict[str, Any], stored_items: list[dict[str, Any]]) -> dict[str, Any]:
    """A Responses body whose `previous_response_id` the upstream cannot know (the gateway stored that turn):
    the stored conversation is put in front of this turn's input, as the upstream would have done."""
    out = {key: value for key, value in body.items() if key != "previous_response_id"}
    current = body.get("input")
    if isinstance(current, str):
        current = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": current}]}]
    out["input"] = [*stored_items, *(current if isinstance(current, list) else [])]
    return out


def _sse(wire: Wire, payload: dict[str, Any] | None = None) -> bytes:
    data = wire.data if payload is None else orjson.dumps(payload)
    head = b"event: " + wire.event.encode() + b"\n" if wire.event is not None else b""
    return head + b"data: " + data + b"\n\n"


def relay_message(data: dict[str, Any], *, message_id: str, model: str, receipt: dict[str, Any]) -> dict[str, Any]:
    """A unary answer in the client's own API (an Anthropic message or a Responses object): the gateway's id and
    the model asked for, the receipt added."""
    data["id"], data["model"], data["receipt"] = message_id, model, receipt
    return data


class _Relay:
    """What every native stream relay shares: nothing to send before the upstream's first event."""

    def start(self) -> bytes:
        return b""


class MessagesRelay(_Relay):
    """An Anthropic Messages stream relayed as received. `message_start` takes the gateway's id and the model
    asked for; the closing `message_delta` and `message_stop` wait for settlement, which adds the receipt
    to the `message_delta` (SPEC §2)."""

    def __init__(self, *, message_id: str, model: str) -> None:
        self.message_id, self.model = message_id, model
        self._delta: dict[str, Any] | None = None

    def feed(self, frame: Frame) -> bytes:
        wire = frame.wire
        if wire is None:
            return b""
        kind = wire.payload.get("type")
        if kind == "message_start":
            message = wire.payload.get("message")
            if isinstance(message, dict):
                message["id"], message["model"] = self.message_id, self.model
                return _sse(wire, wire.payload)
        elif kind == "message_delta":
            self._delta = wire.payload
            return b""
        elif kind == "message_stop":
            return b""
        return _sse(wire)

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        delta = self._delta or {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": usage.completion_tokens}}
        delta["receipt"] = receipt
        return anthropic_messages.sse("message_delta", delta) + anthropic_messages.sse(
            "message_stop", {"type": "message_stop"})

    def fail(self, error: TokensForgeError, receipt: dict[str, Any] | None) -> bytes:
        return anthropic_messages.sse("error", anthropic_messages.error_body(error.status, error.message))


class ResponsesRelay(_Relay):
    """A Responses stream relayed as received. The lifecycle events take the gateway's id and the model asked
    for; the terminal event (`response.completed` / `response.incomplete`) waits for settlement, which adds
    the receipt to its `response` (SPEC §2)."""

    def __init__(self, *, response_id: str, model: str) -> None:
        self.response_id, self.model = response_id, model
        self.upstream_id: str | None = None  # the upstream's own id of this response
        self._final: Wire | None = None
        self._tail: bytes | None = None
        self._seq = 0

    def feed(self, frame: Frame) -> bytes:
        wire = frame.wire
        if wire is None:
            return b""
        seq = wire.payload.get("sequence_number")
        if type(seq) is int:
            self._seq = seq + 1
        kind = wire.payload.get("type")
        if kind in FINAL_EVENTS:
            self._final = wire
            return b""
        response = wire.payload.get("response")
        if isinstance(response, dict):
            if self.upstream_id is None and isinstance(response.get("id"), str):
                self.upstream_id = response["id"]
            response["id"], response["model"] = self.response_id, self.model
            return _sse(wire, wire.payload)
        return _sse(wire)

    def final_response(self, usage: Usage, receipt: dict[str, Any]) -> dict[str, Any]:
        """The terminal event's `response` exactly as `finish` sends it (stored before it is sent)."""
        self.finish(usage, receipt)
        assert self._final is not None
        response: dict[str, Any] = self._final.payload["response"]
        return response

    def finish(self, usage: Usage, receipt: dict[str, Any]) -> bytes:
        if self._tail is None:  # built once: final_response may have built it first
            self._tail = self._build_tail(receipt)
        return self._tail

    def _build_tail(self, receipt: dict[str, Any]) -> bytes:
        final = self._final
        if final is None:  # the upstream finished without a terminal event but said it was done: close it
            final = Wire("response.completed", b"", {"type": "response.completed", "sequence_number": self._seq,
                                                     "response": {"object": "response", "status": "completed"}})
            self._final = final
        response = final.payload.get("response")
        if isinstance(response, dict):
            response["id"], response["model"], response["receipt"] = self.response_id, self.model, receipt
        return _sse(final, final.payload)

    def fail(self, exc: TokensForgeError, receipt: dict[str, Any] | None) -> bytes:
        """`response.failed` with the receipt, then an `error` event with SPEC §2's `error` object."""
        error = exc.body()["error"]
        message = str(error.get("message") or "the upstream failed")
        failed = {"type": "response.failed", "sequence_number": self._seq,
                  "response": {"id": self.response_id, "object": "response", "model": self.model, "status": "failed",
                               "error": {"code": "server_error", "message": message}, "receipt": receipt}}
        tail = {"type": "error", "sequence_number": self._seq + 1, "code": error.get("code"), "message": message,
                "param": error.get("param"), "error": {"message": message, "type": error.get("type"),
                                                       "param": error.get("param"), "code": error.get("code")}}
        return _event(failed) + _event(tail)


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
