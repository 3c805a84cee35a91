"""The free research allowance under contention, and an estimate that agrees with the cap (SPEC §7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tokensforge.catalog import RESEARCH_FREE_BUCKET

from .harness import Gw, Mock, gateway_of, gateway_settings, start_gateway, write_catalog

FREE_USD, FREE_NANOS = "0.0005", 500_000
RUNS = 40


@pytest.fixture
async def fgw(dsn: str, mock_upstream: Mock, tmp_path: Path) -> AsyncIterator[Gw]:
    """A gateway whose catalog gives every account a small free research allowance."""
    await mock_upstream.reset()
    path = write_catalog(tmp_path / "catalog.toml", mock_upstream.url)
    path.write_text(path.read_text() + f'\n[research]\nfree_daily_allowance_usd = "{FREE_USD}"\n')
    ctx, url, app = await start_gateway(gateway_settings(path), dsn)
    async with ctx, aiohttp.ClientSession() as session:
        yield Gw(url, dsn, gateway_of(app), mock_upstream, session)


async def test_concurrent_runs_fall_back_to_the_route_bucket_when_the_free_pool_is_taken(
        fgw: Gw, caplog: pytest.LogCaptureFixture) -> None:
    """40 runs at once, each section checking the free pool before its hold: a section whose free money
    another run took is paid by the route's own bucket; no run fails for it."""
    caplog.set_level(logging.INFO, logger="tokensforge.research")
    _, key = await fgw.account(routed=10**9)
    request = {"topic": "Copper", "model": "gpt-4o-mini", "route": "routed", "sections": ["A", "B"],
               "max_charge_nanos": 10**8}
    answers = await asyncio.gather(*(fgw.post("/v1/research/reports", key, request) for _ in range(RUNS)))
    assert [(status, body["status"]) for status, body, _ in answers] == [(200, "completed")] * RUNS, [
        body for _, body, _ in answers if body.get("status") != "completed"][:1]
    receipts = [s["receipt"] for _, body, _ in answers for s in body["sections"]]
    assert len(receipts) == 2 * RUNS
    payers = {r["bucket"] for r in receipts}
    assert payers == {RESEARCH_FREE_BUCKET, "routed"}
    balances = await fgw.balances(key)
    free_spent = sum(r["charge_nanos"] for r in receipts if r["bucket"] == RESEARCH_FREE_BUCKET)
    assert balances[RESEARCH_FREE_BUCKET]["balance_nanos"] == FREE_NANOS - free_spent >= 0
    assert balances["routed"]["balance_nanos"] == 10**9 - sum(
        r["charge_nanos"] for r in receipts if r["bucket"] == "routed")
    status, failed = await fgw.get("/v1/usage?status=failed", key)
    assert status == 200 and failed["data"] == []  # no section was refused on the way
    fallbacks = [r for r in caplog.records if "free allowance was spent meanwhile" in r.getMessage()]
    assert fallbacks, "no section lost the free pool to another run: the race this test is about never happened"


async def test_estimate_is_not_allowed_above_the_cap_and_shows_the_free_allowance(fgw: Gw) -> None:
    _, key = await fgw.account(routed=10**9)
    base = {"topic": "Copper", "model": "gpt-4o-mini", "route": "routed", "dry_run": True}
    status, body, _ = await fgw.post("/v1/research/reports", key, {**base, "max_charge_nanos": 10**8})
    assert status == 200
    estimate = body["estimate"]
    assert estimate["allowed"] is True and estimate["reason"] is None
    assert estimate["sections_within_cap"] == len(estimate["sections"])
    free = estimate["free_allowance"]
    assert free["bucket"] == RESEARCH_FREE_BUCKET and free["available_nanos"] == FREE_NANOS
    assert free["available_usd"] == "0.000500000" and free["covers_sections"] >= 1
    cap = estimate["expected_nanos"] - 1
    status, body, _ = await fgw.post("/v1/research/reports", key, {**base, "max_charge_nanos": cap})
    assert status == 200
    below = body["estimate"]
    assert below["allowed"] is False and "above your cap" in below["reason"]
    assert below["expected_nanos"] > below["max_charge_nanos"] == cap
    assert below["sections_within_cap"] == len(below["sections"]) - 1
    assert f"after {below['sections_within_cap']} of {len(below['sections'])} sections" in below["reason"]
    assert "top up" not in below["reason"]
