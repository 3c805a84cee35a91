"""Size what is forwarded, not what is understood; find what the catalog cannot price (pure).

The canonical request carries only what the gateway understands, but an upstream reads the whole
body it is sent (SPEC §1 "Size what you forward"): unknown extensions, legacy `function_call`
arguments, `refusal` and `reasoning_content` texts, media inside tool messages, documents of any
length. `forwarded_input_tokens` bounds the input tokens of the client's own body, whatever fields
it holds; `unpriced_fields` / `strip_unpriced` find the fields that make an upstream spend money the
catalog has no price for (refused with a 400, or dropped with a note where agents send them by default).

The input bound, documented in the README:
- ceil(UTF-8 bytes / 3) of every string in the body — any field, known or not — except the value of
  the top-level `model` (the only top-level string that is not sent to the model: the caps, stream
  flags and sampling parameters are numbers or booleans, which count nothing). Object keys below the
  top level count too, except inside the conversation (`messages`, `input`, `system`), where keys and
  short `role` / `type` values are the API's own structure, covered by the per-message allowance (a
  tool schema's property names, by contrast, are read by the model);
- 4 tokens per message or input item, 3 per request, `TOOLS_PREAMBLE_TOKENS` when tools are given
  (the hidden tool-use system prompt both providers add), `PROVIDER_TOOL_TOKENS` per
  provider-defined Anthropic tool (bash, text editor, computer: their schema is not in the body);
- per media item found anywhere (tool messages included; base64 payloads are not text): an image
  `IMAGE_TOKENS` (`LOW_DETAIL_IMAGE_TOKENS` at detail "low"), an audio clip one token per
  `AUDIO_BYTES_PER_TOKEN` bytes (at least `IMAGE_TOKENS`), a document `PAGE_TOKENS` per page:
  a PDF's pages are counted from its `/Type /Page` objects (object streams decompressed, bounded);
  when they cannot be read, pages = size / `MIN_PAGE_BYTES`; a document by URL or file id, whose
  size is unknown here, is `URL_DOCUMENT_PAGES` pages; a non-PDF inline file counts as its text.
At most `MAX_MEDIA_PARTS` media items per request (a 400 beyond).
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest

API_OF_DIALECT = {"openai_chat": "chat", "openai_responses": "responses", "anthropic_messages": "messages"}

IMAGE_TOKENS = 2_000  # one image at high detail, an upper bound for both providers (Anthropic: ≤ ~1,600)
LOW_DETAIL_IMAGE_TOKENS = 85
#: a PDF page: its text (Anthropic documents 1,500–3,000 tokens a page) plus the page as an image (≤ 1,600)
PAGE_TOKENS = 4_600
MIN_PAGE_BYTES = 3_000  # a page smaller than this in a real PDF is rare: the fallback page count
URL_DOCUMENT_PAGES = 100  # both providers' page limit for one PDF
AUDIO_BYTES_PER_TOKEN = 200  # 10 audio tokens a second at 16 kbit/s, the lowest bitrate worth sending
PROVIDER_TOOL_TOKENS = 1_500  # Anthropic's computer tool: ~500 system-prompt tokens + ~735 for its definition
TOOLS_PREAMBLE_TOKENS = 400  # Anthropic documents 346 tokens of tool-use system prompt
MESSAGE_TOKENS = 4
REQUEST_TOKENS = 3
MAX_MEDIA_PARTS = 100
MAX_INFLATE_BYTES = 16 << 20  # work bound for reading a PDF's object streams, per request

#: top-level string fields that are not sent to the model as text
_NOT_TEXT = frozenset({"model"})
#: top-level fields the model never reads as prompt (options for the API, the transport or the gateway, none of
#: them free text an upstream bills as input): neither count reads them
_NOT_PROMPT = frozenset({
    "stream_options", "metadata", "user", "store", "include", "prompt_cache_key", "prompt_cache_retention",
    "client_metadata", "service_tier", "safety_identifier", "previous_response_id", "parallel_tool_calls",
    "reasoning", "reasoning_effort", "truncation", "modalities", "tool_choice", "temperature", "top_p",
    "stop", "stop_sequences", "logit_bias", "seed", "thinking", "context_management", "output_config",
})
#: top-level fields that hold the conversation: their keys are the API's structure
_CONVERSATION = frozenset({"messages", "input", "system"})
#: keys whose short values are structure inside the conversation (a long one is counted: it is not a role)
_STRUCTURE = frozenset({"role", "type"})
_STRUCTURE_MAX = 32
_IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
_AUDIO_TYPES = frozenset({"input_audio", "audio"})
_DOCUMENT_TYPES = frozenset({"file", "input_file", "document"})
#: keys of a media part that hold its payload or address (not text the model reads as text)
_PAYLOAD_KEYS = frozenset({"image_url", "source", "file_data", "file_url", "file_id", "input_audio", "file", "data",
                           "url"})
_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_OBJSTM = re.compile(rb"/Type\s*/ObjStm\b")
_STREAM = re.compile(rb"stream\r?\n")


@dataclass(slots=True)
class _Tally:
    text_bytes: int = 0
    tokens: int = 0
    media: int = 0
    inflate_budget: int = MAX_INFLATE_BYTES


def forwarded_input_tokens(body: dict[str, Any], api: str) -> int:
    """An upper bound of the input tokens an upstream bills for `body` forwarded as sent (see the module
    docstring for the rule); `api` is "chat", "responses" or "messages". Raises InvalidRequest when the
    body holds more than MAX_MEDIA_PARTS media items."""
    tally = _tally(body, api)
    return tally.tokens + -(-tally.text_bytes // 3)


def forwarded_typical_tokens(body: dict[str, Any], api: str) -> int:
    """A typical (not upper-bound) count of the forwarded body's text: ceil(bytes / 4) + 3 per message,
    what settlement charges when an upstream reports no usage (media allowances are bounds: left out)."""
    tally = _tally(body, api)
    return -(-tally.text_bytes // 4) + 3 * _message_count(body, api)


def _tally(body: dict[str, Any], api: str) -> _Tally:
    tally = _Tally()
    for key, value in body.items():
        if key in _NOT_TEXT or key in _NOT_PROMPT:
            continue
        _walk(value, tally, count_keys=key not in _CONVERSATION)
    tally.tokens += REQUEST_TOKENS + MESSAGE_TOKENS * _message_count(body, api)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        tally.tokens += TOOLS_PREAMBLE_TOKENS
        if api == "messages":
            tally.tokens += PROVIDER_TOOL_TOKENS * sum(1 for t in tools if _provider_tool(t))
    if tally.media > MAX_MEDIA_PARTS:
        raise InvalidRequest(f"at most {MAX_MEDIA_PARTS} media parts per request",
                             param="input" if api == "responses" else "messages")
    return tally


def _message_count(body: dict[str, Any], api: str) -> int:
    items = body.get("input" if api == "responses" else "messages")
    count = len(items) if isinstance(items, list) else 1
    return count + (1 if body.get("system") or body.get("instructions") else 0)


def _provider_tool(tool: Any) -> bool:
    """An Anthropic-defined client tool (bash_…, text_editor_…, computer_…): its schema is the provider's."""
    return isinstance(tool, dict) and isinstance(tool.get("type"), str) and tool["type"] not in ("custom", "function")


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _walk(root: Any, tally: _Tally, *, count_keys: bool) -> None:
    """Every string under `root` into tally.text_bytes; media dicts into tally.tokens. Iterative: a
    deeply nested body cannot exhaust the interpreter's stack."""
    stack: list[tuple[Any, bool]] = [(root, count_keys)]
    while stack:
        value, keys = stack.pop()
        if isinstance(value, str):
            tally.text_bytes += _utf8_len(value)
        elif isinstance(value, list):
            stack.extend((item, keys) for item in value)
        elif isinstance(value, dict):
            kind = value.get("type")
            media = isinstance(kind, str) and _media_tokens(kind, value, tally)
            for key, item in value.items():
                if media and key in _PAYLOAD_KEYS:
                    continue
                if keys:
                    tally.text_bytes += _utf8_len(key)
                elif key in _STRUCTURE and isinstance(item, str) and len(item) <= _STRUCTURE_MAX:
                    continue  # "role": "user", "type": "text": the API's structure, in the per-message allowance
                stack.append((item, keys))


def _media_tokens(kind: str, part: dict[str, Any], tally: _Tally) -> bool:
    """Count one media part's allowance; False when `part` is not media (or is text to walk, such as
    an Anthropic document whose source is text or content blocks)."""
    if kind in _IMAGE_TYPES and (kind != "image" or isinstance(part.get("source"), dict)):
        tally.media += 1
        tally.tokens += LOW_DETAIL_IMAGE_TOKENS if _detail(part) == "low" else IMAGE_TOKENS
        return True
    if kind in _AUDIO_TYPES:
        tally.media += 1
        tally.tokens += max(IMAGE_TOKENS, _decoded_len(_audio_data(part)) // AUDIO_BYTES_PER_TOKEN)
        return True
    if kind in _DOCUMENT_TYPES:
        data, known = _document_payload(kind, part)
        if not known:
            return False
        tally.media += 1
        tally.tokens += document_tokens(data, tally)
        return True
    return False


def _detail(part: dict[str, Any]) -> Any:
    image = part.get("image_url")
    return image.get("detail") if isinstance(image, dict) else part.get("detail")


def _audio_data(part: dict[str, Any]) -> str:
    audio = part.get("input_audio")
    data = audio.get("data") if isinstance(audio, dict) else part.get("data")
    return data if isinstance(data, str) else ""


def _document_payload(kind: str, part: dict[str, Any]) -> tuple[str | None, bool]:
    """(base64 or data: URL payload or None when the document is remote, is this a document to allow for).
    Anthropic documents with a text or content source are plain text: walked as text, not media."""
    if kind == "document":
        source = part.get("source")
        if not isinstance(source, dict) or source.get("type") in ("text", "content"):
            return None, False
        data = source.get("data") if source.get("type") == "base64" else None
        return (data if isinstance(data, str) else None), True
    holder = part.get("file") if kind == "file" else part
    if not isinstance(holder, dict):
        return None, kind == "input_file"
    data = holder.get("file_data")
    return (data if isinstance(data, str) else None), True


def document_tokens(data: str | None, tally: _Tally | None = None) -> int:
    """The input allowance of one document given as base64 or a data: URL (None: remote, size unknown)."""
    tally = tally if tally is not None else _Tally()
    if data is None:  # by URL or file id: its size is unknown here
        return URL_DOCUMENT_PAGES * PAGE_TOKENS
    raw = _b64decode(data)
    if raw is None:  # not base64: the upstream refuses it or reads it as text
        return -(-_utf8_len(data) // 3)
    if not raw.startswith(b"%PDF"):
        return -(-len(raw) // 3)  # a text file is its text
    return pdf_pages(raw, tally) * PAGE_TOKENS


def _decoded_len(data: str) -> int:
    return len(data.partition(",")[2] if data.startswith("data:") else data) * 3 // 4


def _b64decode(data: str) -> bytes | None:
    payload = data.partition(",")[2] if data.startswith("data:") else data
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return None


def pdf_pages(pdf: bytes, tally: _Tally | None = None) -> int:
    """An upper bound of a PDF's page count: its `/Type /Page` objects, including those inside Flate
    object streams (inflated up to a work bound); when none are found or an object stream cannot be
    read, at least size / MIN_PAGE_BYTES pages (a page can hide where this reader does not look)."""
    budget = tally if tally is not None else _Tally()
    pages = len(_PAGE.findall(pdf))
    readable = True
    for match in _OBJSTM.finditer(pdf):
        inflated = _inflate_stream(pdf, match.end(), budget)
        if inflated is None:
            readable = False
        else:
            pages += len(_PAGE.findall(inflated))
    if pages == 0 or not readable:
        pages = max(pages, -(-len(pdf) // MIN_PAGE_BYTES))
    return max(pages, 1)


def _inflate_stream(pdf: bytes, start: int, budget: _Tally) -> bytes | None:
    """The inflated stream that follows an object dictionary at `start`, or None (not Flate, corrupt, or
    the request's inflate budget is spent)."""
    found = _STREAM.search(pdf, start, start + 4096)
    if found is None or budget.inflate_budget <= 0:
        return None
    end = pdf.find(b"endstream", found.end())
    if end < 0:
        return None
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(pdf[found.end():end], budget.inflate_budget)
    except zlib.error:
        return None
    budget.inflate_budget -= len(out)
    return out if inflater.unconsumed_tail == b"" else None


# ------------------------------------------------------------------ unpriced fields


#: top-level fields that make a relay spend money the catalog cannot price: a 400 naming them
REFUSED_FIELDS = {
    "models": "relay model fallback lists pick models the route does not price",
    "provider": "relay provider routing picks upstreams the route does not price",
    "plugins": "relay plugins (web search, file parsing) are billed apart",
    "best_of": "best_of bills every candidate generated",
}
#: Responses hosted tools: run and billed by the upstream per call, which the catalog cannot price
HOSTED_TOOLS = frozenset({
    "web_search", "web_search_preview", "web_search_preview_2025_03_11", "web_search_2025_08_26", "file_search",
    "code_interpreter", "image_generation", "computer_use_preview", "computer_use", "mcp",
})
#: Anthropic server tools (type prefixes): run and billed by Anthropic per use
SERVER_TOOL_PREFIXES = ("web_search_", "web_fetch_", "code_execution_")
#: anthropic-beta values that change the price of the tokens (long-context pricing)
PRICED_BETA_PREFIXES = ("context-1m",)


@dataclass(slots=True)
class Stripped:
    """A client body without what the catalog cannot price, the anthropic-beta header to forward
    (None: none), and one note per removal ("dropped: web_search (hosted tool, not priced)")."""

    body: dict[str, Any]
    beta: str | None = None
    notes: list[str] = field(default_factory=list)


def unpriced_fields(body: dict[str, Any], api: str, headers: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(top-level fields to refuse, things to drop). A drop is "tools:<type>" for a hosted/server tool,
    "anthropic-beta:<value>" for a pricing beta, or a top-level field name; `strip_unpriced` removes them."""
    refused = [name for name in REFUSED_FIELDS if _sets(body, name)]
    dropped = [f"tools:{kind}" for kind in _unpriced_tools(body.get("tools"), api)]
    if api == "messages":
        if body.get("mcp_servers"):
            dropped.append("mcp_servers")
        dropped.extend(f"anthropic-beta:{value}" for value in _betas(headers) if _priced_beta(value))
    return refused, dropped


def _sets(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if name == "best_of":
        return value not in (None, 1)
    return value is not None


def _unpriced_tools(tools: Any, api: str) -> list[str]:
    if not isinstance(tools, list):
        return []
    kinds: list[str] = []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and _unpriced_tool(kind, api) and kind not in kinds:
            kinds.append(kind)
    return kinds


def _unpriced_tool(kind: str, api: str) -> bool:
    if api == "messages":
        return kind.startswith(SERVER_TOOL_PREFIXES)
    return kind in HOSTED_TOOLS


def _betas(headers: Mapping[str, str]) -> list[str]:
    header = headers.get("anthropic-beta")
    if header is None:
        header = next((v for k, v in headers.items() if k.lower() == "anthropic-beta"), None)
    return [v.strip() for v in (header or "").split(",") if v.strip()]


def _priced_beta(value: str) -> bool:
    return value.startswith(PRICED_BETA_PREFIXES)


def strip_unpriced(body: dict[str, Any], api: str, headers: Mapping[str, str] | None = None) -> Stripped:
    """`body` (a shallow copy when something is removed) without the unpriced drops, or InvalidRequest
    naming every refused field. The caller forwards `Stripped.body` and `Stripped.beta`."""
    headers = headers or {}
    refused, dropped = unpriced_fields(body, api, headers)
    if refused:
        reasons = "; ".join(f"'{name}': {REFUSED_FIELDS[name]}" for name in refused)
        raise InvalidRequest(f"not supported, the catalog cannot price them: {reasons}", param=refused[0])
    betas = _betas(headers)
    out = Stripped(body, ", ".join(betas) or None)
    if not dropped:
        return out
    out.body = dict(body)
    kinds = {d.partition(":")[2] for d in dropped if d.startswith("tools:")}
    if kinds:
        tools = [t for t in body["tools"] if not (isinstance(t, dict) and t.get("type") in kinds)]
        choice = body.get("tool_choice")
        if tools:
            out.body["tools"] = tools
        else:
            out.body.pop("tools")
        if not tools or isinstance(choice, dict) and choice.get("type") in kinds:
            out.body.pop("tool_choice", None)  # a choice naming a removed tool would be refused upstream
        what = "server tool" if api == "messages" else "hosted tool"
        out.notes.extend(f"dropped: {kind} ({what}, not priced)" for kind in sorted(kinds))
    if "mcp_servers" in dropped:
        out.body.pop("mcp_servers")
        out.notes.append("dropped: mcp_servers (remote MCP tools, not priced)")
    removed = [d.partition(":")[2] for d in dropped if d.startswith("anthropic-beta:")]
    if removed:
        out.beta = ", ".join(b for b in betas if b not in removed) or None
        out.notes.extend(f"dropped: anthropic-beta {b} (changes the price)" for b in removed)
    return out


def forwardable_beta(headers: Mapping[str, str]) -> str | None:
    """The client's anthropic-beta header without the betas that change the price (None: nothing left);
    byte for byte as sent when there are none."""
    betas = _betas(headers)
    if not any(_priced_beta(b) for b in betas):
        return headers.get("anthropic-beta") or next(
            (v for k, v in headers.items() if k.lower() == "anthropic-beta"), None)
    return ", ".join(b for b in betas if not _priced_beta(b)) or None
