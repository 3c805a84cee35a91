"""Research reports are kept (SPEC §7): stored as a run goes, read back as JSON, markdown and from the CLI;
later sections see the reader's notes and the earlier sections."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp
import orjson

from tokensforge.research import (
    DISCLAIMER,
    EARLIER_MAX_BYTES,
    SECTION_EXCERPT_BYTES,
    ResearchRequest,
    earlier_excerpt,
    estimate_section_body,
    report_markdown,
    section_body,
)

from tokensforge.receipts import Trace, build_receipt
from tokensforge.research_store import NewReport, ReportStore, section_request_id

from .harness import Gw

TOPIC = "Copper futures into 2027"
NOTES = "My notes: LME warehouse stocks | Chilean mine strikes."


async def _report(gw: Gw, key: str, **body: Any) -> dict[str, Any]:
    status, report, headers = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 10**8, **body})
    assert status == 200, report
    assert headers["x-tokensforge-report-id"] == report["id"]
    return dict(report)


async def _charges(gw: Gw, key: str) -> dict[str, int]:
    """request id → charge, from the account's ledger."""
    _, ledger = await gw.get("/v1/ledger?limit=100", key)
    return {e["request_id"]: -e["amount_nanos"] for e in ledger["data"] if e["kind"] == "charge"}


async def test_run_is_stored_and_reloads_as_json_and_markdown(gw: Gw) -> None:
    _, key = await gw.account(routed=10**9)
    _, dry, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 10**8, "route": "routed",
        "sections": ["Overview", "Risks", "Summary"], "context": NOTES, "dry_run": True})
    report = await _report(gw, key, route="routed", sections=["Overview", "Risks", "Summary"], context=NOTES)
    assert report["status"] == "completed" and report["context"] == NOTES and report["created_at"]
    assert [s["title"] for s in report["sections"]] == ["Overview", "Risks", "Summary"]
    assert all(s["content"] and s["receipt"]["bucket"] == "routed" for s in report["sections"])
    # totals equal the ledger, section by section
    charges = await _charges(gw, key)
    assert {s["receipt"]["request_id"]: s["receipt"]["charge_nanos"] for s in report["sections"]} == charges
    assert report["total_charge_nanos"] == sum(charges.values()) > 0
    assert report["balance_before_nanos"] - report["balance_after_nanos"] == sum(charges.values())
    # the estimate sized the longer prompts honestly: no section held more than it said
    reserved = [s["receipt"]["reserved_nanos"] for s in report["sections"]]
    assert max(reserved) <= dry["estimate"]["reserve_nanos"] and sum(reserved) <= dry["estimate"]["expected_nanos"]

    status, stored = await gw.get(f"/v1/research/reports/{report['id']}", key)
    assert status == 200 and stored == report
    assert stored["disclaimer"] == DISCLAIMER

    async with gw.session.get(f"{gw.url}/v1/research/reports/{report['id']}?format=markdown",
                              headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/markdown")
        assert r.headers["content-disposition"] == f'attachment; filename="research-{report["id"]}.md"'
        text = await r.text()
    assert text.startswith(f"# Research report: {TOPIC}\n") and "gpt-4o-mini/routed (routed)" in text
    assert "> My notes: LME warehouse stocks | Chilean mine strikes." in text
    for section in report["sections"]:
        receipt = section["receipt"]
        assert f"## {section['title']}\n\n{section['content']}" in text
        assert f"| {section['title']} | {receipt['request_id']} | {receipt['usage']['total_tokens']} " \
               f"| {receipt['charge_usd']} | {receipt['ledger_entry_id']} |" in text
    assert f"**{report['total_charge_usd']}**" in text and text.rstrip().endswith(f"*{DISCLAIMER}*")


async def test_later_sections_see_the_notes_and_the_earlier_sections(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    report = await _report(gw, key, sections=["Overview", "Risks"], context=NOTES)
    first = report["sections"][0]["content"]
    assert len(first) > 1000  # a whole section (the simulated upstream writes max_tokens words)
    stats = await gw.mock.stats()
    assert stats["requests"] == 2
    prompt = stats["last_request"]["body"]["messages"][-1]["content"]
    assert NOTES in prompt and first in prompt and "Write section 2 of 2: Risks" in prompt
    assert "## Overview" in prompt


async def test_reports_list_newest_first_in_pages(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    ids = [(await _report(gw, key, topic=f"Topic {i}", sections=["Only"]))["id"] for i in range(3)]
    status, page = await gw.get("/v1/research/reports?limit=2", key)
    assert status == 200 and page["object"] == "list" and page["has_more"] is True
    assert [r["id"] for r in page["data"]] == [ids[2], ids[1]]
    item = page["data"][0]
    assert set(item) == {"id", "object", "topic", "model", "status", "created_at", "total_charge_nanos",
                         "total_charge_usd", "sections"}
    assert item["object"] == "research.report" and item["topic"] == "Topic 2" and item["sections"] == 1
    assert item["status"] == "completed" and item["total_charge_nanos"] > 0
    status, rest = await gw.get(f"/v1/research/reports?limit=2&after={page['next_cursor']}", key)
    assert status == 200 and [r["id"] for r in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False and rest["next_cursor"] is None
    status, body = await gw.get("/v1/research/reports?after=abc", key)
    assert status == 400 and body["error"]["param"] == "after"


async def test_another_accounts_report_is_not_found(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    _, other = await gw.account(credit=10**9)
    report = await _report(gw, key, sections=["Only"])
    for path in (f"/v1/research/reports/{report['id']}", f"/v1/research/reports/{report['id']}?format=markdown",
                 "/v1/research/reports/rep_0000000000000000"):
        status, body = await gw.get(path, other)
        assert status == 404 and body["error"]["code"] == "not_found" and body["error"]["type"], body
    status, page = await gw.get("/v1/research/reports", other)
    assert status == 200 and page["data"] == []
    status, body = await gw.get(f"/v1/research/reports/{report['id']}?format=pdf", key)
    assert status == 400 and body["error"]["param"] == "format"


async def test_bad_notes_are_refused_and_charge_nothing(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    for context in ("a\x00b", "x" * 8001, 42):
        status, body, _ = await gw.post("/v1/research/reports", key, {
            "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 10**8, "context": context})
        assert status == 400 and body["error"]["param"] == "context", body
    status, body, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 10**8, "sections": ["A\x00"]})
    assert status == 400 and body["error"]["param"] == "sections"
    assert (await gw.balances(key))["credit"]["balance_nanos"] == 10**9
    _, page = await gw.get("/v1/research/reports", key)
    assert page["data"] == []


async def test_streamed_run_whose_client_leaves_is_kept_as_interrupted(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    await gw.mock.faults({"latency_ms": 300})  # section 2 is still upstream when the client leaves
    report_id = None
    async with aiohttp.ClientSession() as session:
        r = await session.post(gw.url + "/v1/research/reports", headers={"authorization": f"Bearer {key}"},
                               data=orjson.dumps({"topic": TOPIC, "model": "gpt-4o-mini", "stream": True,
                                                  "sections": ["A", "B", "C"], "max_charge_nanos": 10**8}))
        name = None
        async for line in r.content:
            if line.startswith(b"event: "):
                name = line[7:].strip().decode()
            elif line.startswith(b"data: "):
                data = orjson.loads(line[6:])
                report_id = data["report_id"]
                if name == "section_completed":
                    first = data
                    break
        r.close()  # the client leaves after the first section
    assert report_id is not None
    deadline = time.monotonic() + 10
    while True:
        status, report = await gw.get(f"/v1/research/reports/{report_id}", key)
        assert status == 200
        if report["status"] != "running" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert report["status"] == "interrupted"
    assert [s["title"] for s in report["sections"]] == ["A"]
    assert report["sections"][0]["content"] == first["content"]
    assert report["sections"][0]["receipt"] == first["receipt"]
    charges = await _charges(gw, key)
    assert report["total_charge_nanos"] == first["receipt"]["charge_nanos"] == sum(charges.values()) > 0
    assert report["balance_before_nanos"] - report["balance_after_nanos"] == report["total_charge_nanos"]
    _, usage = await gw.get("/v1/usage", key)
    later = [u for u in usage["data"] if u["request_id"] != first["receipt"]["request_id"]]
    assert len(later) <= 1, later  # the section in flight, if it had begun
    assert all(u["status"] == "client_cancelled" and u["charge_nanos"] == 0 for u in later), later
    balances = await gw.balances(key)
    assert balances["credit"]["reserved_nanos"] == 0


async def test_unary_run_whose_client_leaves_is_kept_as_interrupted(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    await gw.mock.faults({"latency_ms": 250})
    async with aiohttp.ClientSession() as session:
        try:  # the client gives up while the second section is upstream
            async with asyncio.timeout(0.4):
                await session.post(gw.url + "/v1/research/reports", headers={"authorization": f"Bearer {key}"},
                                   data=orjson.dumps({"topic": TOPIC, "model": "gpt-4o-mini",
                                                      "sections": ["A", "B", "C"], "max_charge_nanos": 10**8}))
            raise AssertionError("the run should still be going")
        except TimeoutError:
            pass
    report = await _settled_report(gw, key)
    assert report["status"] == "interrupted" and [s["title"] for s in report["sections"]] == ["A"]
    charges = await _charges(gw, key)
    assert report["total_charge_nanos"] == report["sections"][0]["receipt"]["charge_nanos"] == sum(charges.values())


async def _settled_report(gw: Gw, key: str) -> dict[str, Any]:
    """The account's one report, once its run has ended."""
    deadline = time.monotonic() + 10
    while True:
        _, page = await gw.get("/v1/research/reports", key)
        if page["data"] and page["data"][0]["status"] != "running" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(page["data"]) == 1
    status, report = await gw.get(f"/v1/research/reports/{page['data'][0]['id']}", key)
    assert status == 200
    return dict(report)


async def test_a_charged_section_whose_row_was_lost_is_recovered_from_its_usage_record(gw: Gw) -> None:
    """A cancellation between a section's settlement and its row: `finish` adds it from the usage record."""
    _, key = await gw.account(credit=10**9)
    report = await _report(gw, key, sections=["A", "B"])
    lost = report["sections"][1]["receipt"]
    async with gw.gateway.pool.acquire() as conn:
        await conn.execute("DELETE FROM research_sections WHERE report_id = $1 AND position = 1", report["id"])
    started = [(i, s["title"], s["receipt"]["request_id"]) for i, s in enumerate(report["sections"])]
    row, sections = await ReportStore(gw.gateway.pool).finish(report["id"], "interrupted", started)
    assert [s["title"] for s in sections] == ["A", "B"]
    assert sections[1]["content"] is None and sections[1]["error"]["code"] == "client_cancelled"
    assert sections[1]["charge_nanos"] == lost["charge_nanos"] > 0
    assert sections[1]["receipt"]["ledger_entry_id"] == lost["ledger_entry_id"]
    assert row["total_charge_nanos"] == report["total_charge_nanos"] == sum((await _charges(gw, key)).values())
    # finishing again changes nothing
    row2, sections2 = await ReportStore(gw.gateway.pool).finish(report["id"], "interrupted", started)
    assert row2["total_charge_nanos"] == row["total_charge_nanos"] and len(sections2) == 2


async def _cli(gw: Gw, key: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokensforge", "research", *args, "--base-url", gw.url + "/v1", "--api-key", key,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_lists_and_shows_kept_reports(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    report = await _report(gw, key, sections=["Overview", "Risks"])
    code, out, err = await _cli(gw, key, "--list")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith(report["id"]))
    assert "completed" in line and report["total_charge_usd"] in line and line.endswith(TOPIC)
    assert DISCLAIMER in out
    code, out, err = await _cli(gw, key, "--show", report["id"])
    assert code == 0, err
    assert f"# Research report: {TOPIC}" in out and "## Overview" in out and "## Risks" in out and DISCLAIMER in out
    assert report["sections"][1]["content"] in out
    assert all(s["receipt"]["ledger_entry_id"] in out for s in report["sections"])
    assert f"**{report['total_charge_usd']}**" in out and "status: completed" in out
    code, out, err = await _cli(gw, key, "--show", "rep_nope")
    assert code == 1 and "no research report 'rep_nope'" in err
    code, _, err = await _cli(gw, key, "--model", "gpt-4o-mini")
    assert code == 2 and "TOPIC" in err


# ---------------------------------------------------------------------- pure parts


def _req(sections: int, context: str | None = None) -> ResearchRequest:
    titles = tuple(f"Section {i}" for i in range(sections))
    return ResearchRequest(TOPIC, "m", titles, 10**8, False, False, None, context)


def _prompt_bytes(body: dict[str, Any]) -> int:
    return sum(len(m["content"].encode()) for m in body["messages"])


def test_earlier_sections_are_bounded_and_keep_the_most_recent() -> None:
    earlier = [(f"Section {i}", f"text {i} " + "é" * 3000) for i in range(6)]
    excerpt = earlier_excerpt(earlier)
    assert len(excerpt.encode()) <= EARLIER_MAX_BYTES
    assert "## Section 5" in excerpt and "## Section 0" not in excerpt
    assert excerpt.startswith("…")
    one = earlier_excerpt(earlier[:1])
    assert len(one.encode()) <= SECTION_EXCERPT_BYTES and one.endswith("…")
    assert earlier_excerpt([("A", "short")]) == "## A\nshort"


def test_estimate_prompt_is_never_smaller_than_the_real_one() -> None:
    req = _req(5, context="n" * 8000)
    worst = "€" * 5000  # 3 bytes each: longer than any excerpt keeps
    for index in range(5):
        real = section_body(req, index, [(t, worst) for t in req.sections[:index]])
        assert _prompt_bytes(real) <= _prompt_bytes(estimate_section_body(req, index))
    assert section_body(req, 0) == estimate_section_body(req, 0)
    assert "n" * 8000 in section_body(req, 0)["messages"][1]["content"]


def test_markdown_keeps_tables_whole() -> None:
    receipt = {"request_id": "req_1_s1", "usage": {"total_tokens": 9}, "charge_usd": "0.000000100",
               "ledger_entry_id": "le_7"}
    text = report_markdown({
        "id": "rep_1", "topic": "A | B", "model": "m", "route": {"id": "m/r", "kind": "routed"}, "bucket": "routed",
        "status": "failed", "context": None, "created_at": None, "total_charge_nanos": 100,
        "balance_before_nanos": 1000, "balance_after_nanos": 900,
        "sections": [{"title": "x|y\nz", "content": "body", "receipt": receipt},
                     {"title": "w", "content": None, "receipt": None, "error": {"message": "upstream down"}}]})
    assert "| x\\|y z | req_1_s1 | 9 | 0.000000100 | le_7 |" in text
    assert "_(no content: upstream down)_" in text and text.rstrip().endswith(f"*{DISCLAIMER}*")


async def test_a_run_whose_gateway_died_is_closed_as_interrupted_with_what_it_cost(gw: Gw) -> None:
    """A gateway killed mid-report leaves the row "running": once no section holds money any more and the
    row is older than a reservation lives, the sweeper closes it with the charged sections recovered."""
    account_id, key = await gw.account(routed=10**9)
    ledger, store = gw.gateway.ledger, ReportStore(gw.gateway.pool)
    request_id = "req_" + "d" * 24
    await store.create(NewReport(
        "rep_crashed", account_id, None, None, request_id, TOPIC, "gpt-4o-mini", "gpt-4o-mini/routed", "routed",
        "routed", None, ("Overview", "Risks", "Summary"), 10**8, 10**9))
    # section 1 was settled (charged, with its usage record) but the gateway died before recording it
    first = section_request_id(request_id, 0)
    trace = Trace(first, account_id, None, "key_x", selected_model="gpt-4o-mini",
                  route=gw.catalog.routes["gpt-4o-mini/routed"], endpoint="research.section", status="succeeded")
    await ledger.reserve(first, account_id, "routed", 5_000, receipt=build_receipt(trace))
    await ledger.finish(first, 1_234, build_receipt(trace))
    # section 2 still holds its reservation (the dead gateway's, until the reservation sweeper voids it)
    second = section_request_id(request_id, 1)
    await ledger.reserve(second, account_id, "routed", 5_000)
    async with gw.gateway.pool.acquire() as conn:
        await conn.execute("UPDATE research_reports SET updated_at = now() - interval '1 hour' WHERE id = $1",
                           "rep_crashed")
    assert await store.interrupt_stale(idle_s=60) == 0, "a section still holds money: the run may be alive"
    await ledger.finish(second, 0, None)  # what the reservation sweeper does after the TTL
    assert await store.interrupt_stale(idle_s=60) == 1
    status, report = await gw.get("/v1/research/reports/rep_crashed", key)
    assert status == 200 and report["status"] == "interrupted", report
    assert report["total_charge_nanos"] == 1_234 == (await _charges(gw, key))[first]
    assert [s["title"] for s in report["sections"]] == ["Overview"]
    assert await store.interrupt_stale(idle_s=60) == 0  # closed once
