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
    if not isinstance(topic, str) or not topic.strip() or len(topic) > 500:
        raise InvalidRequest("'topic' must be a non-empty string of at most 500 characters", param="topic")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    sections = body.get("sections") or list(DEFAULT_SECTIONS)
    if (not isinstance(sections, list) or not 1 <= len(sections) <= MAX_SECTIONS
            or not all(isinstance(s, str) and s.strip() for s in sections)):
        raise InvalidRequest(f"'sections' must be 1 to {MAX_SECTIONS} non-empty strings", param="sections")
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


def free_sections(section_reserves: list[int], free_available_nanos: int) -> int:
    """How many leading sections the free research allowance pays for: a section is paid from it
    while it can still cover that section's whole reservation (assuming each costs its reservation)."""
    covered = 0
    for reserve in section_reserves:
        if reserve > free_available_nanos:
            break
        free_available_nanos -= reserve
        covered += 1
    return covered


def estimate_view(req: ResearchRequest, section_reserves: list[int], available_nanos: int,
                  route: dict[str, Any], bucket: str, free: tuple[str, int] | None = None) -> dict[str, Any]:
    """What the run would cost at most, what it holds at a time, and whether it may start.

    `free` is (bucket, available) of the free research allowance, if the catalog has one: the
    sections it covers need nothing from the route's bucket."""
    expected = sum(section_reserves)
    largest = max(section_reserves)
    covers = free_sections(section_reserves, free[1]) if free is not None else 0
    from_bucket = sum(section_reserves[covers:])
    allowed, reason = True, None
    if available_nanos < from_bucket:
        allowed, reason = False, (
            f"bucket {bucket!r} has {available_nanos} nano-USD available; the report may cost up to {from_bucket}"
            + (f" beyond the {covers} section(s) the free allowance covers" if covers else ""))
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
        "free_allowance": None if free is None else {
            "bucket": free[0], "available_nanos": free[1], "covers_sections": covers},
    }
