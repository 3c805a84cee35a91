"""The research assistant (SPEC §7): estimate first, a receipt per section, a cap that holds."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import orjson

from .harness import Gw

TOPIC = "Copper futures into 2027"


async def test_dry_run_estimates_and_charges_nothing(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    status, body, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 10**8, "dry_run": True})
    assert status == 200
    estimate = body["estimate"]
    assert estimate["route"] == {"id": "gpt-4o-mini/official", "kind": "official"} and estimate["bucket"] == "credit"
    assert len(estimate["sections"]) == 5 and estimate["allowed"] is True and estimate["reason"] is None
    assert estimate["expected_nanos"] >= 5 * estimate["reserve_nanos"] // 2 > 0
    assert estimate["available_nanos"] == 10**9
    assert (await gw.balances(key))["credit"]["balance_nanos"] == 10**9
    _, usage = await gw.get("/v1/usage", key)
    assert usage["data"] == []


async def test_report_sums_section_receipts_each_with_usage_and_ledger(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    status, report, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "sections": ["Overview", "Risks", "Summary"],
        "max_charge_nanos": 10**8, "route": "routed"})
    assert status == 200 and report["status"] == "completed"
    assert report["disclaimer"] == "Research support, not financial advice."
    charges = [s["receipt"]["charge_nanos"] for s in report["sections"]]
    assert len(charges) == 3 and all(c > 0 for c in charges) and report["total_charge_nanos"] == sum(charges)
    assert all(s["content"] and s["receipt"]["bucket"] == "routed" for s in report["sections"])
    assert report["balance_before_nanos"] - report["balance_after_nanos"] == sum(charges)
    _, ledger = await gw.get("/v1/ledger?bucket=routed", key)
    ids = {s["receipt"]["ledger_entry_id"] for s in report["sections"]}
    assert ids <= {e["id"] for e in ledger["data"]}
    for section in report["sections"]:
        _, receipt = await gw.get(f"/v1/receipts/{section['receipt']['request_id']}", key)
        assert receipt["charge_nanos"] == section["receipt"]["charge_nanos"]
    assert (await gw.balances(key))["credit"]["balance_nanos"] == 10**9


async def test_run_stops_before_a_section_that_would_pass_the_cap(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    _, dry, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 10**8, "dry_run": True})
    cap = dry["estimate"]["reserve_nanos"] * 2 + dry["estimate"]["reserve_nanos"] // 2
    status, report, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": cap})
    assert status == 200 and report["status"] == "stopped_at_cap"
    assert 1 <= len(report["sections"]) < 5 and report["total_charge_nanos"] <= cap


async def test_run_refuses_to_start_when_the_bucket_cannot_cover_the_estimate(gw: Gw) -> None:
    _, key = await gw.account(credit=50_000, routed=10**9)
    status, body, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 10**8})
    assert status == 402 and body["error"]["code"] == "insufficient_balance" and body["error"]["bucket"] == "credit"
    status, body, _ = await gw.post("/v1/research/reports", key, {
        "topic": TOPIC, "model": "gpt-4o-mini", "max_charge_nanos": 1, "route": "routed"})
    assert status == 402 and body["error"]["max_charge_nanos"] == 1
    assert {b: v["balance_nanos"] for b, v in (await gw.balances(key)).items()} == {"credit": 50_000,
                                                                                     "routed": 10**9}
    status, body, _ = await gw.post("/v1/research/reports", key, {"topic": "", "model": "gpt-4o-mini",
                                                                  "max_charge_nanos": 5})
    assert status == 400 and body["error"]["param"] == "topic"


async def test_streamed_report_sends_the_events_in_order(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/v1/research/reports", headers={"authorization": f"Bearer {key}"},
                                data=orjson.dumps({"topic": TOPIC, "model": "gpt-4o-mini", "stream": True,
                                                   "sections": ["A", "B"], "max_charge_nanos": 10**8})) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            name = None
            async for line in r.content:
                if line.startswith(b"event: "):
                    name = line[7:].strip().decode()
                elif line.startswith(b"data: "):
                    events.append((name, orjson.loads(line[6:])))
    assert [n for n, _ in events] == ["estimate", "section_started", "section_completed", "section_started",
                                      "section_completed", "report_completed"]
    final = events[-1][1]
    assert final["total_charge_nanos"] == sum(d["receipt"]["charge_nanos"] for n, d in events
                                              if n == "section_completed")


async def test_research_cli_shows_estimate_progress_report_and_receipts(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokensforge", "research", TOPIC, "--model", "gpt-4o-mini", "--max-charge", "0.05",
        "--yes", "--section", "Overview", "--section", "Risks", "--base-url", gw.url + "/v1", "--api-key", key,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Estimate: up to $" in text and "writing 1: Overview" in text and "## Risks" in text
    assert "Research support, not financial advice." in text and "status: completed" in text
    _, ledger = await gw.get("/v1/ledger?bucket=credit", key)
    assert sum(1 for e in ledger["data"] if e["kind"] == "charge") == 2
    assert all(e["id"] in text for e in ledger["data"] if e["kind"] == "charge")
