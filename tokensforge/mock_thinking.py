"""Signed reasoning of the simulated upstream: Anthropic thinking blocks and OpenAI encrypted reasoning.

Real providers sign (Anthropic) or encrypt (OpenAI) the model's reasoning and refuse it back when it
was altered; the mock does the same with an HMAC under its own secret, so a gateway that rewrites,
drops or re-serialises these blocks is caught by a 400 exactly as it would be in production.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

import orjson

from .mock_core import count_tokens, reply_text

THINKING_MIN_BUDGET_TOKENS = 1024
REASONING_TOKENS_BY_EFFORT = {"none": 0, "minimal": 8, "low": 16, "medium": 32, "high": 64, "xhigh": 96}
_MAC_BYTES = 32


class ThinkingError(ValueError):
    """A request's thinking settings or blocks are invalid; the handler answers 400 with this message."""


def sign(secret: bytes, text: str) -> str:
    """Opaque signature of a thinking text (base64 of an HMAC-SHA256)."""
    return base64.b64encode(hmac.new(secret, text.encode(), hashlib.sha256).digest()).decode()


def thinking_text(prompt: str, tokens: int) -> str:
    """Deterministic thinking of about `tokens` tokens that mentions the prompt's opening."""
    head = f"The user asks: {prompt[:48]!r}. "
    words = max(1, tokens - count_tokens(head))
    text = head + reply_text(words)
    while count_tokens(text) > tokens and words > 1:
        words -= 1
        text = head + reply_text(words)
    return text


def thinking_budget(body: dict[str, Any], max_tokens: int) -> int | None:
    """Budget of `thinking` (None: disabled), validated as Anthropic does."""
    thinking = body.get("thinking")
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return max_tokens - 1
    if kind != "enabled":
        raise ThinkingError("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < THINKING_MIN_BUDGET_TOKENS:
        raise ThinkingError(
            f"thinking.enabled.budget_tokens: Input should be greater than or equal to {THINKING_MIN_BUDGET_TOKENS}"
        )
    if budget >= max_tokens:
        raise ThinkingError("`max_tokens` must be greater than `thinking.budget_tokens`.")
    return budget


def check_thinking_blocks(messages: list[Any], secret: bytes, enabled: bool) -> None:
    """Refuse altered or unsigned thinking blocks, and (with thinking on) a final assistant tool turn
    that lost its leading thinking block; redacted_thinking is accepted as sent."""
    last_assistant: tuple[int, list[Any]] | None = None
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or message.get("role") != "assistant":
            continue
        last_assistant = (i, content)
        for j, block in enumerate(content):
            if isinstance(block, dict):
                _check_block(block, f"messages.{i}.content.{j}", secret)
    if not enabled or last_assistant is None:
        return
    i, content = last_assistant
    first = content[0] if content and isinstance(content[0], dict) else {}
    has_tool_use = any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content)
    if has_tool_use and first.get("type") not in ("thinking", "redacted_thinking"):
        raise ThinkingError(
            f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
            f"`{first.get('type')}`. When `thinking` is enabled, a final `assistant` message must start "
            "with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
        )


def _check_block(block: dict[str, Any], where: str, secret: bytes) -> None:
    kind = block.get("type")
    if kind == "thinking":
        text, signature = block.get("thinking"), block.get("signature")
        if not isinstance(text, str):
            raise ThinkingError(f"{where}.thinking.thinking: Field required")
        if not isinstance(signature, str):
            raise ThinkingError(f"{where}.thinking.signature: Field required")
        if not hmac.compare_digest(signature, sign(secret, text)):
            raise ThinkingError(f"{where}: Invalid `signature` in `thinking` block")
    elif kind == "redacted_thinking" and not isinstance(block.get("data"), str):
        raise ThinkingError(f"{where}.redacted_thinking.data: Field required")


# --------------------------------------------------------------------------- OpenAI reasoning items


def encrypt_reasoning(secret: bytes, item_id: str, text: str) -> str:
    """Opaque `encrypted_content`: the reasoning (encoded, not secret — it is a mock) and its MAC."""
    plain = orjson.dumps({"id": item_id, "reasoning": text})
    mac = hmac.new(secret, plain, hashlib.sha256).digest()
    return base64.b64encode(mac + plain).decode()


def reasoning_verifies(secret: bytes, blob: str) -> bool:
    """True when encrypted_content came from this mock unaltered."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return False
    mac, plain = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    return len(mac) == _MAC_BYTES and hmac.compare_digest(mac, hmac.new(secret, plain, hashlib.sha256).digest())
