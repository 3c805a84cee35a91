"""The one internal shape of a model request, its answer and its stream events (pure).

Every client dialect (OpenAI chat, OpenAI Responses, Anthropic Messages) decodes
into a `Request` and encodes a `Response` / a sequence of `StreamEvent`s back;
every upstream kind (OpenAI chat, Anthropic Messages) encodes a `Request` and
decodes its answer into the same types. Everything between the codecs (route
choice, reservation sizing, the request lifecycle, settlement, receipts) only
sees these types, so the dialects cannot diverge on money.

Conventions: finish reasons use OpenAI's names ("stop", "length", "tool_calls",
"content_filter"); tool-call arguments are JSON text, as both APIs stream them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = str  # "stop" | "length" | "tool_calls" | "content_filter"


# ------------------------------------------------------------------ request


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class MediaPart:
    """An image, audio clip or file. `url` is an http(s) or data: URL; or `data_b64` with `media_type`."""

    kind: Literal["image", "audio", "file"]
    url: str | None = None
    data_b64: str | None = None
    media_type: str | None = None
    detail: str | None = None  # OpenAI image detail ("low" | "high" | "auto")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asked to call a tool; `id` links the result back (OpenAI call_id, Anthropic tool_use id)."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What the client's tool returned for call `call_id`."""

    call_id: str
    content: str
    is_error: bool = False


Part = TextPart | MediaPart | ToolCall | ToolResult


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. System text is a message with role "system" (Anthropic's top-level `system` decodes
    to leading system messages; OpenAI "developer" messages decode to "system")."""

    role: Role
    parts: tuple[Part, ...]

    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True, slots=True)
class Tool:
    """A function tool."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """"auto" | "none" | "required" (Anthropic "any"), or one named function (`name`)."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


@dataclass(slots=True)
class Request:
    """A model request, whatever dialect it arrived in.

    `max_output_tokens` is the cap the client asked for (None: the model's maximum); the
    lifecycle replaces it with the cap it reserved for, and upstream codecs forward exactly
    that one. `raw` is the client's original body, in its own dialect (minus what the catalog cannot
    price), kept for native forwarding and for sizing what is forwarded (`forwarded.py`).
    `untranslatable` names what the client sent that this request cannot carry into another
    dialect; an upstream codec that translates turns each into a note ("dropped: thinking").
    """

    model: str
    messages: list[Message]
    dialect: Literal["openai_chat", "openai_responses", "anthropic_messages"] = "openai_chat"
    stream: bool = False
    max_output_tokens: int | None = None
    n: int = 1
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None  # Responses `reasoning` ({"effort": …}); OpenAI channels only
    response_format: dict[str, Any] | None = None  # OpenAI chat response_format / Responses text.format
    raw: dict[str, Any] | None = None
    #: dialect fields an upstream kind could not express, noted in the receipt ("dropped: reasoning")
    notes: list[str] = field(default_factory=list)
    untranslatable: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ answer


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens an upstream billed, by class (SPEC §1 Money).

    `prompt_tokens` is all input and `completion_tokens` all output (reasoning included), as every
    dialect reports totals; the cache classes are parts of `prompt_tokens`, exclusive of each other,
    so fresh input is what is left (`fresh_input_tokens`). Each upstream codec builds this exactly once
    from its provider's own shape (`Usage.of`), which keeps the parts inside the totals."""

    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0  # 5-minute cache writes (Anthropic's default; OpenAI bills none)
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0  # part of completion_tokens, priced as output

    @classmethod
    def of(cls, *, fresh_input: int, output: int, cache_read: int = 0, cache_write: int = 0,
           cache_write_1h: int = 0, reasoning: int = 0) -> Usage:
        """From exclusive classes (Anthropic's shape): the totals are their sums."""
        return cls(fresh_input + cache_read + cache_write + cache_write_1h, output, cache_read, cache_write,
                   cache_write_1h, min(reasoning, output))

    @property
    def fresh_input_tokens(self) -> int:
        return self.prompt_tokens - self.cache_read_tokens - self.cache_write_tokens - self.cache_write_1h_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cache_write_1h_tokens": self.cache_write_1h_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason | None = "stop"
    refusal: str | None = None


@dataclass(slots=True)
class Response:
    """A complete (non-streamed) answer. `raw` is the upstream's JSON when it was OpenAI chat; `wire` is the
    upstream's JSON when it spoke the client's own API (a native relay hands it on)."""

    model: str
    choices: list[Choice]
    usage: Usage | None
    raw: dict[str, Any] | None = None
    wire: dict[str, Any] | None = None

    @property
    def output_text(self) -> str:
        return "".join(c.text or "" for c in self.choices)


# ------------------------------------------------------------------ stream events


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    choice: int = 0


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """Part of tool call `index` of a choice: the first delta carries `id` and `name`, later ones
    only more `arguments` text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    choice: int = 0


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Thinking or reasoning text the upstream streamed (Anthropic thinking, Responses reasoning summaries).
    No translated dialect shows it, but it reached a native client and is output it pays for."""

    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: FinishReason
    choice: int = 0


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The upstream's count. `final=False`: only the input is known yet (Anthropic's message_start), so a
    stream cut before the end is still billed the upstream's real input, not an estimate."""

    usage: Usage
    final: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """The upstream reported an error inside a stream that had started."""

    message: str


StreamEvent = TextDelta | ReasoningDelta | ToolCallDelta | Finish | UsageReport | UpstreamFailure


@dataclass(frozen=True, slots=True)
class Wire:
    """One upstream SSE event as it arrived, for a client that speaks the upstream's API (native relay):
    the event name, its data bytes and their parsed JSON (parsed once, by the decoder)."""

    event: str | None
    data: bytes
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Frame:
    """What one upstream SSE event meant: canonical events, the upstream's own JSON when it is an
    OpenAI chat chunk (so an OpenAI-chat client can receive it verbatim, id and model aside), and for a
    native relay the event as it arrived (`wire`)."""

    events: tuple[StreamEvent, ...]
    raw: dict[str, Any] | None = None
    wire: Wire | None = None


def carries_content(event: StreamEvent) -> bool:
    """Content that a client is billed for once it reached it."""
    return (isinstance(event, (TextDelta, ReasoningDelta)) and bool(event.text)) or (
        isinstance(event, ToolCallDelta) and bool(event.arguments or event.name))


class MalformedUpstream(ValueError):
    """An upstream answer that does not have the shape its API promises (an upstream failure, never a 500)."""


MAX_TOKEN_COUNT = 2**53


def token_count(value: Any) -> int | None:
    """A sane token count from an untrusted upstream: a non-negative integer below 2**53, else None
    (booleans and floats are not counts; None means "missing", and settlement then estimates)."""
    if type(value) is not int or not 0 <= value < MAX_TOKEN_COUNT:
        return None
    return value
