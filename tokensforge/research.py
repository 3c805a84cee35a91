"""The research assistant (SPEC §7), pure part: request parsing, section prompts, the estimate,
and the stored report's JSON and markdown views.

A report is written section by section, each section one billed chat request
on the chosen route with its own usage record and ledger entry. Sections run
one after another, so at most one section's reservation is held at a time.
Each section's prompt carries the reader's own notes (`context`) and the most
recent part of the sections written before it, so the report reads as one piece.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import InvalidRequest
from .money import usd

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
MAX_TITLE_CHARS = 200
MAX_CONTEXT_CHARS = 8000
#: what a later section sees of one earlier section (heading and content): room for a whole
#: section of SECTION_MAX_TOKENS at 8 UTF-8 bytes a token; longer ones are cut at the end
SECTION_EXCERPT_BYTES = SECTION_MAX_TOKENS * 8
#: what a later section sees of all earlier ones together: the most recent part
EARLIER_MAX_BYTES = 8000
ELLIPSIS = "…"
_SECTION_GAP = "\n\n"
STATUSES = ("running", "completed", "stopped_at_cap", "failed", "interrupted")


@dataclass(frozen=True, slots=True)
class ResearchRequest:
    topic: str
    model: str
    sections: tuple[str, ...]
    max_charge_nanos: int
    dry_run: bool
    stream: bool
    route: str | None
    context: str | None = None


def _text(value: str, param: str) -> str:
    """PostgreSQL text cannot hold NUL, and the report is stored: refuse it here (400)."""
    if "\x00" in value:
        raise InvalidRequest(f"'{param}' must not contain NUL characters", param=param)
    return value


def parse_request(body: dict[str, Any]) -> ResearchRequest:
    topic = body.get("topic")
    if not isinstance(topic, str) or not topic.strip() or len(topic) > 500:
        raise InvalidRequest("'topic' must be a non-empty string of at most 500 characters", param="topic")
    _text(topic, "topic")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    _text(model, "model")
    sections = body.get("sections") or list(DEFAULT_SECTIONS)
    if (not isinstance(sections, list) or not 1 <= len(sections) <= MAX_SECTIONS
            or not all(isinstance(s, str) and s.strip() and len(s) <= MAX_TITLE_CHARS for s in sections)):
        raise InvalidRequest(f"'sections' must be 1 to {MAX_SECTIONS} non-empty strings of at most "
                             f"{MAX_TITLE_CHARS} characters", param="sections")
    for title in sections:
        _text(title, "sections")
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
    context = body.get("context")
    if context is not None and (not isinstance(context, str) or len(context) > MAX_CONTEXT_CHARS):
        raise InvalidRequest(f"'context' must be a string of at most {MAX_CONTEXT_CHARS} characters",
                             param="context")
    notes = _text(context, "context").strip() if context is not None else ""
    return ResearchRequest(topic.strip(), model, tuple(s.strip() for s in sections), cap,
                           flags["dry_run"], flags["stream"], route, notes or None)


def section_body(req: ResearchRequest, index: int,
                 earlier: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The chat request that writes one section, given the (title, content) of the sections before it."""
    return _section_body(req, index, earlier_excerpt(earlier))


def estimate_section_body(req: ResearchRequest, index: int) -> dict[str, Any]:
    """`section_body` as large as it can get: every earlier section at its longest excerpt.

    The reservation estimate grows with the prompt's UTF-8 bytes, and the real excerpt of
    the earlier sections is never longer than this placeholder, so no section of the run
    reserves more than its estimate."""
    if index == 0:
        return _section_body(req, 0, "")
    size = min(EARLIER_MAX_BYTES, index * SECTION_EXCERPT_BYTES + (index - 1) * len(_SECTION_GAP))
    return _section_body(req, index, "x" * size)


def earlier_excerpt(earlier: Sequence[tuple[str, str]]) -> str:
    """What the next section sees of the earlier ones: each cut to SECTION_EXCERPT_BYTES, then
    the last EARLIER_MAX_BYTES of them all (UTF-8 bytes, cut on character boundaries)."""
    blocks = [_head(f"## {title}\n{content.strip()}", SECTION_EXCERPT_BYTES) for title, content in earlier]
    return _tail(_SECTION_GAP.join(blocks), EARLIER_MAX_BYTES)


def _head(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit - len(ELLIPSIS.encode())].decode("utf-8", "ignore") + ELLIPSIS


def _tail(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return ELLIPSIS + raw[len(raw) - limit + len(ELLIPSIS.encode()):].decode("utf-8", "ignore")


def _section_body(req: ResearchRequest, index: int, earlier_text: str) -> dict[str, Any]:
    title = req.sections[index]
    outline = "; ".join(req.sections)
    parts = [f"Report topic: {req.topic}", f"Outline: {outline}"]
    if req.context:
        parts.append(f"The reader's own notes (use them where relevant):\n{req.context}")
    if earlier_text:
        parts.append("The report so far (continue it; do not repeat it):\n" + earlier_text)
    parts.append(f"Write section {index + 1} of {len(req.sections)}: {title}")
    return {
        "model": req.model,
        "max_tokens": SECTION_MAX_TOKENS,
        "messages": [
            {"role": "system", "content": (
                "You are a careful trading-research analyst. Write one section of a research report: "
                "factual, balanced, no recommendations to buy or sell. " + DISCLAIMER)},
            {"role": "user", "content": "\n\n".join(parts)},
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


def sections_within(section_reserves: list[int], cap_nanos: int) -> int:
    """How many leading sections a run starts before one that could pass the cap (as `write_sections`)."""
    total = 0
    for count, reserve in enumerate(section_reserves):
        if total + reserve > cap_nanos:
            return count
        total += reserve
    return len(section_reserves)


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
    elif expected > req.max_charge_nanos:
        fit = sections_within(section_reserves, req.max_charge_nanos)
        allowed, reason = False, (
            f"the report may cost up to ${usd(expected)}, above your cap of ${usd(req.max_charge_nanos)}: "
            f"a run would stop at the cap after {fit} of {len(section_reserves)} sections; "
            f"raise the cap to ${usd(expected)} for the whole report")
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
        "sections_within_cap": sections_within(section_reserves, req.max_charge_nanos),
        "free_allowance": None if free is None else {
            "bucket": free[0], "available_nanos": free[1], "available_usd": usd(free[1]),
            "covers_sections": covers},
    }


# ---------------------------------------------------------------------- the stored report


def _iso(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def section_view(row: Mapping[str, Any]) -> dict[str, Any]:
    section = {"title": row["title"], "content": row["content"], "receipt": row["receipt"]}
    if row["error"] is not None:
        section["error"] = row["error"]
    return section


def report_view(row: Mapping[str, Any], sections: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A report as POST answers it and GET /v1/research/reports/{id} shows it (a stored row and its
    section rows, or the same fields held in memory during a run)."""
    total = row["total_charge_nanos"]
    return {
        "id": row["id"], "object": "research.report", "topic": row["topic"], "model": row["model"],
        "route": {"id": row["route_id"], "kind": row["route_kind"]}, "bucket": row["bucket"],
        "status": row["status"], "context": row["context"],
        "sections": [section_view(s) for s in sections],
        "total_charge_nanos": total, "total_charge_usd": usd(total),
        "balance_before_nanos": row["balance_before_nanos"], "balance_after_nanos": row["balance_after_nanos"],
        "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
        "disclaimer": DISCLAIMER,
    }


def report_list_item(row: Mapping[str, Any]) -> dict[str, Any]:
    total = row["total_charge_nanos"]
    return {"id": row["id"], "object": "research.report", "topic": row["topic"], "model": row["model"],
            "status": row["status"], "created_at": _iso(row["created_at"]),
            "total_charge_nanos": total, "total_charge_usd": usd(total), "sections": row["sections"]}


def _cell(text: str) -> str:
    """One line of a markdown table cell or heading."""
    return " ".join(text.split()).replace("|", "\\|")


def report_markdown(report: Mapping[str, Any]) -> str:
    """A report as a markdown file to keep: its sections, a receipt table, totals, the disclaimer."""
    route = report["route"]
    lines = [f"# Research report: {_cell(report['topic'])}", "",
             f"- Report: `{report['id']}`, {report.get('created_at') or ''} · status: {report['status']}",
             f"- Model: {report['model']} · route: {route['id']} ({route['kind']}) · bucket: {report['bucket']}",
             ""]
    if report.get("context"):
        lines += ["## Your notes", "", *("> " + line for line in report["context"].splitlines()), ""]
    for section in report["sections"]:
        content = section.get("content")
        if content is None:
            error = section.get("error") or {}
            content = f"_(no content: {error.get('message', 'the section did not finish')})_"
        lines += [f"## {_cell(section['title'])}", "", content.strip(), ""]
    lines += ["## Receipts", "", "| section | request | tokens | charge USD | ledger entry |",
              "|---|---|---:|---:|---|"]
    for section in report["sections"]:
        r = section.get("receipt")
        if r:
            lines.append(f"| {_cell(section['title'])} | {r['request_id']} | {r['usage']['total_tokens']} "
                         f"| {r['charge_usd']} | {r['ledger_entry_id'] or ''} |")
    lines += [f"| **total** | | | **{usd(report['total_charge_nanos'])}** | |", "",
              f"Total charge: ${usd(report['total_charge_nanos'])} ({report['total_charge_nanos']} nano-USD)"
              f" · status: {report['status']}"]
    if report.get("balance_before_nanos") is not None and report.get("balance_after_nanos") is not None:
        lines.append(f"Balance {report['bucket']}: ${usd(report['balance_before_nanos'])} → "
                     f"${usd(report['balance_after_nanos'])}")
    lines += ["", "---", "", f"*{DISCLAIMER}*", ""]
    return "\n".join(lines)
