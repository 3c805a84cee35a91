"""OpenAI *Responses* usage → canonical token classes (pure), for answers forwarded natively.

The Responses API counts like chat: `input_tokens` is all input, `input_tokens_details.cached_tokens` (cache
reads) a part of it; `output_tokens` is all output, `output_tokens_details.reasoning_tokens` a part of it.
Cache writes (`input_tokens_details.cache_write_tokens`, newer OpenAI models and relays) are part of
`input_tokens` too; `cache_write_tokens_details` splits them by retention: 30-minute writes are billed in the
short write class (`cache_write`), 12-hour writes in the long one (`cache_write_1h`). Writes the split does
not explain are short ones, so the long price is only charged for long writes the upstream reported."""

from __future__ import annotations

from typing import Any

from ..canonical import Usage, token_count
from .openai import split_input


def usage_of(payload: Any) -> Usage | None:
    """A Responses `usage` object (from a response or `response.completed`) → Usage; None when its totals
    are missing or not sane counts (settlement then estimates)."""
    if not isinstance(payload, dict):
        return None
    prompt = token_count(payload.get("input_tokens"))
    output = token_count(payload.get("output_tokens", 0))
    if prompt is None or output is None:
        return None
    details = payload.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    out_details = payload.get("output_tokens_details")
    out_details = out_details if isinstance(out_details, dict) else {}
    writes = token_count(details.get("cache_write_tokens")) or 0
    ttl = details.get("cache_write_tokens_details")
    long = (token_count(ttl.get("ttl_12h_tokens")) or 0) if isinstance(ttl, dict) else 0
    return split_input(prompt, output, token_count(details.get("cached_tokens")) or 0, writes,
                       token_count(out_details.get("reasoning_tokens")) or 0, cache_write_long=long)
