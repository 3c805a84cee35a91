"""Prompt caches of the simulated upstream, as the real providers bill them.

A prompt is cut into units (a tool, a system block, a message content block, a whole chat message,
a Responses item); each unit's boundary carries a digest chained over every unit before it and the
token count up to it, so "this prefix was seen" is one dictionary lookup. Pure logic: the handlers
build the units and report the returned counts in their provider's own usage fields.

- Anthropic caches only where the request puts a `cache_control` marker (5 minutes, or 1 hour with
  `"ttl": "1h"`); a read finds the longest live prefix ending at a block boundary up to 20 blocks
  before a marker; everything past it up to the last marker is written, at the ttl of the marker that
  ends each stretch.
- OpenAI caches automatically every whole-message prefix of at least the minimum and reports a read
  rounded down to a multiple of 128 tokens; it bills no writes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .mock_core import PER_MESSAGE_TOKENS, content_tokens, count_tokens

ANTHROPIC_TTLS_S = {"5m": 300.0, "1h": 3600.0}
ANTHROPIC_LOOKBACK_BLOCKS = 20
ANTHROPIC_MAX_MARKERS = 4
OPENAI_TTL_S = 300.0
OPENAI_EXTENDED_TTL_S = 24 * 3600.0
MAX_ENTRIES = 200_000  # beyond this, expired entries are swept before adding more


class CacheMarkerError(ValueError):
    """A request's cache markers are malformed; the handler answers 400 with this message."""


@dataclass(frozen=True)
class Unit:
    """One cacheable piece of a prompt: its identity (canonical bytes), its tokens, and the ttl of a
    cache_control marker placed on it (None: no marker)."""

    payload: bytes
    tokens: int
    marker_ttl_s: float | None = None


@dataclass(frozen=True)
class Boundary:
    """The end of a unit: digest of the whole prefix up to it and the tokens in that prefix."""

    digest: bytes
    tokens: int
    marker_ttl_s: float | None


@dataclass(frozen=True)
class CacheUse:
    """The input tokens a request read from cache and wrote to it (by ttl)."""

    read_tokens: int = 0
    write_5m_tokens: int = 0
    write_1h_tokens: int = 0


def scope_of(*parts: str) -> bytes:
    """Cache namespace: API, upstream model, credential and anything else that must match exactly."""
    return hashlib.sha256("\x00".join(parts).encode()).digest()


def boundaries(scope: bytes, units: Iterable[Unit]) -> list[Boundary]:
    """Chain the units' digests so equal digests mean equal prefixes (within one scope)."""
    digest, tokens = scope, 0
    out = []
    for unit in units:
        digest = hashlib.sha256(digest + unit.payload).digest()
        tokens += unit.tokens
        out.append(Boundary(digest, tokens, unit.marker_ttl_s))
    return out


class PromptCache:
    """Prefix digests with their expiry; a read refreshes the entry for its own ttl, as both providers do."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.skew_s = 0.0  # tests move time forward to expire entries
        self._entries: dict[bytes, tuple[float, float]] = {}  # digest -> (expires_at_s, ttl_s)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def clock(self) -> float:
        return self._clock() + self.skew_s

    def _live(self, digest: bytes, now_s: float) -> bool:
        entry = self._entries.get(digest)
        return entry is not None and entry[0] > now_s

    def _refresh(self, digest: bytes, now_s: float) -> None:
        _, ttl_s = self._entries[digest]
        self._entries[digest] = (now_s + ttl_s, ttl_s)

    def _keep(self, digest: bytes, ttl_s: float, now_s: float) -> None:
        if len(self._entries) >= MAX_ENTRIES:
            self._entries = {d: e for d, e in self._entries.items() if e[0] > now_s}
        old = self._entries.get(digest)
        if old is None or old[0] < now_s + ttl_s:
            self._entries[digest] = (now_s + ttl_s, ttl_s)

    def anthropic(self, bounds: list[Boundary], min_tokens: int) -> CacheUse:
        """Read the longest live prefix near a marker, write the rest up to the last marker."""
        markers = [i for i, b in enumerate(bounds) if b.marker_ttl_s is not None and b.tokens >= min_tokens]
        if not markers:
            return CacheUse()
        now_s = self.clock()
        near = {j for m in markers for j in range(max(0, m - ANTHROPIC_LOOKBACK_BLOCKS + 1), m + 1)}
        hits = [j for j in near if bounds[j].tokens >= min_tokens and self._live(bounds[j].digest, now_s)]
        read = 0
        if hits:
            best = max(hits)
            read = bounds[best].tokens
            self._refresh(bounds[best].digest, now_s)
        written_5m = written_1h = 0
        done = read
        for m in markers:
            ttl_s = bounds[m].marker_ttl_s or ANTHROPIC_TTLS_S["5m"]
            if bounds[m].tokens > done:
                if ttl_s == ANTHROPIC_TTLS_S["1h"]:
                    written_1h += bounds[m].tokens - done
                else:
                    written_5m += bounds[m].tokens - done
                done = bounds[m].tokens
            self._keep(bounds[m].digest, ttl_s, now_s)
        return CacheUse(read, written_5m, written_1h)

    def openai(self, bounds: list[Boundary], min_tokens: int, quantum_tokens: int, ttl_s: float) -> int:
        """Cached tokens of the longest live whole-unit prefix (rounded down to the quantum); every
        prefix long enough is kept for later requests."""
        eligible = [b for b in bounds if b.tokens >= min_tokens]
        if not eligible:
            return 0
        now_s = self.clock()
        cached = 0
        for b in reversed(eligible):
            if self._live(b.digest, now_s):
                self._refresh(b.digest, now_s)
                cached = b.tokens // quantum_tokens * quantum_tokens
                break
        for b in eligible:
            self._keep(b.digest, ttl_s, now_s)
        return cached if cached >= min_tokens else 0


CACHE_KEY = web.AppKey("tokensforge_mock_cache", PromptCache)  # one cache per mock app


# --------------------------------------------------------------------------- Anthropic units


def _marker_ttl_s(block: Any, where: str) -> float | None:
    """The ttl of a block's cache_control marker, None without one; a bad marker is refused like Anthropic."""
    if not isinstance(block, dict) or "cache_control" not in block:
        return None
    marker = block["cache_control"]
    if marker is None:
        return None
    if not isinstance(marker, dict) or marker.get("type") != "ephemeral":
        raise CacheMarkerError(f"{where}.cache_control.type: Input should be 'ephemeral'")
    ttl = marker.get("ttl", "5m")
    if ttl not in ANTHROPIC_TTLS_S:
        raise CacheMarkerError(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    return ANTHROPIC_TTLS_S[ttl]


def _identity(block: Any, *context: str) -> bytes:
    """Canonical bytes of a block without its marker: moving a marker must not change the prefix."""
    if isinstance(block, dict) and "cache_control" in block:
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return "\x00".join(context).encode() + orjson.dumps(block, option=orjson.OPT_SORT_KEYS)


def _system_units(system: Any) -> list[Unit]:
    """System blocks; their tokens add up to what anthropic_prompt_tokens counts for the system."""
    if not system:
        return []
    if not isinstance(system, list):
        return [Unit(_identity(system, "system"), count_tokens(str(system)) + PER_MESSAGE_TOKENS)]
    units, text, counted = [], "", 0
    for i, block in enumerate(system):
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            text += block["text"]
        total = count_tokens(text) + PER_MESSAGE_TOKENS
        ttl_s = _marker_ttl_s(block, f"system.{i}")
        units.append(Unit(_identity(block, "system"), total - counted, ttl_s))
        counted = total
    return units


def _message_units(i: int, message: Any) -> list[Unit]:
    role = message.get("role") if isinstance(message, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    tag = str(role)
    if not isinstance(content, list) or not content:
        return [Unit(_identity(content, tag), content_tokens(content) + PER_MESSAGE_TOKENS)]
    units = []
    for j, block in enumerate(content):
        tokens = content_tokens([block]) + (PER_MESSAGE_TOKENS if j == 0 else 0)
        ttl_s = _marker_ttl_s(block, f"messages.{i}.content.{j}")
        units.append(Unit(_identity(block, tag if j == 0 else ""), tokens, ttl_s))
    return units


def anthropic_units(body: dict[str, Any]) -> list[Unit]:
    """Messages prompt in Anthropic's cache order: tools, then system, then messages' content blocks.
    Tools cost no tokens in the mock's counting but are part of every prefix."""
    tools = body.get("tools")
    units = [
        Unit(_identity(tool, "tool"), 0, _marker_ttl_s(tool, f"tools.{i}"))
        for i, tool in enumerate(tools if isinstance(tools, list) else ())
    ]
    units += _system_units(body.get("system"))
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        units += _message_units(i, message)
    markers = sum(u.marker_ttl_s is not None for u in units)
    if markers > ANTHROPIC_MAX_MARKERS:
        raise CacheMarkerError(
            f"A maximum of {ANTHROPIC_MAX_MARKERS} blocks with cache_control may be provided. Found {markers}."
        )
    return units


# --------------------------------------------------------------------------- OpenAI units


def chat_units(messages: list[Any]) -> list[Unit]:
    """Chat prompt as whole messages; tokens add up to prompt_tokens(messages)."""
    return [
        Unit(
            orjson.dumps(m, option=orjson.OPT_SORT_KEYS),
            content_tokens(m.get("content") if isinstance(m, dict) else None) + PER_MESSAGE_TOKENS,
        )
        for m in messages
    ]


def openai_scope(api: str, model: str, credential: str, body: dict[str, Any]) -> bytes:
    """OpenAI's cache is per organisation and model; tools head every prefix and prompt_cache_key
    routes requests to the same cache."""
    key = body.get("prompt_cache_key")
    tools = orjson.dumps(body.get("tools"), option=orjson.OPT_SORT_KEYS).decode()
    return scope_of(api, model, credential, key if isinstance(key, str) else "", tools)


def openai_ttl_s(body: dict[str, Any], default_s: float) -> float:
    """`prompt_cache_retention: "24h"` keeps prefixes for a day; otherwise the in-memory default."""
    return OPENAI_EXTENDED_TTL_S if body.get("prompt_cache_retention") == "24h" else default_s
