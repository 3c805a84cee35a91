"""The research assistant (SPEC §7), pure part: request parsing, section prompts, the estimate.

A report is written section by section, each section one billed chat request
on the chosen route with its own usage record and ledger entry. Sections run
one after another, so at most one section's reservation is held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest

DISCLAIMER = "Research support, not financial advice."
DEFAULT_SECTIONS = (
    "Overview",
    "Market structure and key drivers",
    "Risks",
    "Scenarios and signals to watch",
    "Summary",
)
SECTION_MAX_TOKENS = 400
MAX_SECTIONS = 12


@dataclass(frozen=True, slots=True)
class ResearchRequest:
    topic: str
    model: str
    sections: tuple[str, ...]
    max_charge_nanos: int
    dry_run: bool
    stream: bool
    route: str | None


def parse_request(body: dict[str, Any]) -> ResearchRequest:
    topic = body.get("topic")
    if not isinstance(topic, str) or not topic.strip() or len(topic) > 500 or "\x00" in topic:
        raise InvalidRequest("'topic' must be a non-empty string of at most 500 characters (no NUL)", param="topic")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    sections = body.get("sections") or list(DEFAULT_SECTIONS)
    if (not isinstance(sections, list) or not 1 <= len(sections) <= MAX_SECTIONS
            or not all(isinstance(s, str) and s.strip() and "\x00" not in s for s in sections)):
        raise InvalidRequest(f"'sections' must be 1 to {MAX_SECTIONS} non-empty strings (no NUL)", param="sections")
    cap = body.get("max_charge_nanos")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
        raise InvalidRequest("'max_charge_nanos' must be a positive integer (nano-USD)", param="max_charge_nanos")
    flags = {}
    for name in ("dry_run", "stream"):
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise InvalidRequest(f"'{name}' must be a boolean", param=name)
        flags[name] = value
    route = body.get("route")
    if route is not None and (not isinstance(route, str) or not route):
        raise InvalidRequest("'route' must be a route id or kind", param="route")
    return ResearchRequest(topic.strip(), model, tuple(s.strip() for s in sections), cap,
                           flags["dry_run"], flags["stream"], route)


def section_body(req: ResearchRequest, index: int) -> dict[str, Any]:
    """The chat request that writes one section."""
    title = req.sections[index]
    outline = "; ".join(req.sections)
    return {
        "model": req.model,
        "max_tokens": SECTION_MAX_TOKENS,
        "messages": [
            {"role": "system", "content": (
                "You are a careful trading-research analyst. Write one section of a research report: "
                "factual, balanced, no recommendations to buy or sell. " + DISCLAIMER)},
            {"role": "user", "content": (
                f"Report topic: {req.topic}\nOutline: {outline}\n"
                f"Write section {index + 1} of {len(req.sections)}: {title}")},
        ],
    }


def estimate_view(req: ResearchRequest, section_reserves: list[int], available_nanos: int,
                  route: dict[str, Any], bucket: str) -> dict[str, Any]:
    """What the run would cost at most, what it holds at a time, and whether it may start."""
    expected = sum(section_reserves)
    largest = max(section_reserves)
    allowed, reason = True, None
    if available_nanos < expected:
        allowed, reason = False, (
            f"bucket {bucket!r} has {available_nanos} nano-USD available; the report may cost up to {expected}")
    elif req.max_charge_nanos < section_reserves[0]:
        allowed, reason = False, (
            f"max_charge_nanos {req.max_charge_nanos} cannot cover even the first section ({section_reserves[0]})")
    return {
        "sections": list(req.sections),
        "route": route,
        "bucket": bucket,
        "expected_nanos": expected,
        "reserve_nanos": largest,
        "available_nanos": available_nanos,
        "max_charge_nanos": req.max_charge_nanos,
        "allowed": allowed,
        "reason": reason,
    }
