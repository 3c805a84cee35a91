"""The console at a phone's, a tablet's and a laptop's width (Playwright on Debian's Chromium, one browser
for the module): no page wider than its window, every control reachable, requests found by any id a
client holds, the receipt read as an invoice whose lines match the ledger, a refused key said plainly.

Set TF_PLAYGROUND_SHOTS=/some/dir to keep a screenshot of each state (docs/console*.png come from here).
"""
# ruff: noqa: F811  (the fixtures `chromium` and `pgw` are imported from test_playground and used by name)

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from playwright.async_api import Browser

from .harness import Gw
from .test_playground import (  # noqa: F401  (chromium and pgw are fixtures this module uses)
    Console,
    chat,
    chromium,
    exact_title,
    open_with_key,
    pgw,
    readable,
)

WIDTHS = {"phone": (390, 844), "tablet": (768, 1024), "laptop": (1366, 900)}
TABS = ("playground", "market", "usage", "research")

# Every visible control, scrolled to, must be on screen and be what a tap at its centre reaches.
UNREACHABLE_JS = """() => {
  const out = [];
  const vw = document.documentElement.clientWidth, vh = window.innerHeight;
  const sel = "button, input, select, textarea, summary, tr[tabindex], a[href]";
  for (const el of document.querySelectorAll(sel)) {
    const r0 = el.getBoundingClientRect();
    if (r0.width === 0 || r0.height === 0 || getComputedStyle(el).visibility === "hidden") continue;
    el.scrollIntoView({ block: "center", inline: "nearest" });
    const r = el.getBoundingClientRect();
    const x = Math.min(Math.max(r.left + Math.min(r.width, 40) / 2, 1), vw - 1);
    const y = Math.min(Math.max(r.top + r.height / 2, 1), vh - 1);
    const hit = document.elementFromPoint(x, y);
    const inside = el.tagName === "TR" || (r.left >= -1 && r.right <= vw + 1);
    if (!inside || !hit || !(hit === el || el.contains(hit) || (el.labels && [...el.labels].includes(hit)))) {
      out.push((el.id || el.tagName.toLowerCase() + "." + el.className) + " at " + Math.round(r.left) + ".." +
               Math.round(r.right) + " of " + vw + " hit " + (hit ? hit.tagName + "#" + hit.id : "nothing"));
    }
  }
  window.scrollTo(0, 0);
  return out;
}"""
OVERFLOW_JS = "document.documentElement.scrollWidth - document.documentElement.clientWidth"


@contextlib.asynccontextmanager
async def console_at(chromium: Browser, origin: str, width: int, height: int) -> AsyncIterator[Console]:
    context = await chromium.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    try:
        tab = Console(await context.new_page(), origin)
        missing: list[str] = []
        tab.page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
        yield tab
        await tab.js("1")  # collect the events still in flight
        assert tab.problems == [] and missing == [], (tab.problems, missing)
    finally:
        await context.close()


async def check_layout(tab: Console, where: str) -> None:
    assert await tab.js(OVERFLOW_JS) <= 0, f"{where}: the page is wider than the window"
    assert await tab.page.evaluate(UNREACHABLE_JS) == [], where


async def test_every_tab_fits_and_every_control_is_reachable_at_three_widths(pgw: Gw, chromium: Browser) -> None:
    _, key = await pgw.account(credit=10**9, routed=10**9)
    sent = [await chat(pgw, key, r) for r in ("gpt-4o-mini/official", "gpt-4o-mini/routed")]
    for name, (width, height) in WIDTHS.items():
        async with console_at(chromium, pgw.url, width, height) as tab:
            await open_with_key(tab, pgw.url, key)
            await tab.until("document.getElementById('quote').dataset.state === 'allowed'")
            for panel in TABS:
                await tab.click(f"#tab-{panel}")
                if panel == "usage":
                    row = f"#usage-rows tr[data-request-id={json.dumps(sent[0]['request_id'])}]"
                    await tab.page.wait_for_selector(row)
                    await tab.click(row)
                    await tab.until("document.querySelector('#usage-ledger table')")
                if panel == "research":
                    await tab.until("document.getElementById('reports-table').dataset.loaded === 'true'")
                await check_layout(tab, f"{name} {panel}")
                if name == "laptop" and panel == "market":  # the marketplace's tables fit their cards
                    spill = await tab.page.locator("#catalog .table-wrap").evaluate_all(
                        "els => els.map(e => e.scrollWidth - e.clientWidth)")
                    assert spill and max(spill) <= 0, spill
            await tab.click("#tab-playground")
            await tab.shot(f"console-{name}")


async def test_phone_story_find_a_chatcmpl_id_from_the_sdk_and_read_its_invoice(pgw: Gw, chromium: Browser) -> None:
    """Done when: in a phone-sized window, the id an openai-SDK client holds finds its request, whose
    invoice lines are the receipt's cost lines and add up to the ledger's charge."""
    _, key = await pgw.account(credit=10**9, routed=5_000_000_000)
    async with pgw.client(key) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=24, messages=[{"role": "user", "content": "Say something about ledgers."}],
            extra_body={"route": "gpt-4o-mini/routed"})
    assert completion.id.startswith("chatcmpl-")
    others = [await chat(pgw, key, "gpt-4o-mini/official") for _ in range(3)]
    status, receipt = await pgw.get(f"/v1/receipts/{completion.id}", key)
    assert status == 200
    charge = receipt["charge_nanos"]
    entry = await pgw.ledger_entry(key, receipt["ledger_entry_id"])
    assert entry["amount_nanos"] == -charge == -sum(line["nanos"] for line in receipt["cost_lines"])
    width, height = WIDTHS["phone"]
    async with console_at(chromium, pgw.url, width, height) as tab:
        await open_with_key(tab, pgw.url, key, "usage")
        # every charge moves what is shown: the routed balance is not "$5.00" any more
        routed = (await pgw.balances(key))["routed"]["available_nanos"]
        shown = await tab.page.inner_text("[data-bucket=routed] .avail .money")
        assert shown == readable(routed) != "$5.00"
        assert await tab.page.get_attribute("[data-bucket=routed] .avail .money", "title") == exact_title(routed)
        await tab.page.wait_for_selector(f"#usage-rows tr[data-request-id={json.dumps(others[-1]['request_id'])}]")
        await tab.set("usage-id", completion.id)
        await tab.click("#usage-apply")
        await tab.until("document.getElementById('usage-receipt').dataset.requestId === "
                        + json.dumps(receipt["request_id"]))
        assert await tab.page.locator("#usage-rows tr[data-request-id]").count() == 1
        # the invoice opened where the user is looking
        top = await tab.js("document.getElementById('usage-receipt-panel').getBoundingClientRect().top")
        assert -2 <= top < height / 2, top
        lines = await tab.page.locator("#usage-receipt .invoice-lines tr[data-cost-line]").evaluate_all(
            "trs => trs.map(tr => [tr.dataset.costLine, Number(tr.dataset.tokens), Number(tr.dataset.nanos)])")
        assert lines == [[line["class"], line["tokens"], line["nanos"]] for line in receipt["cost_lines"]]
        assert sum(n for _, _, n in lines) == -entry["amount_nanos"]
        total = await tab.page.get_attribute("#usage-receipt tr.total", "data-total-nanos")
        assert total == str(charge)
        invoice = await tab.text("usage-receipt")
        assert "Fresh input" in invoice and "Output" in invoice and readable(charge) in invoice
        assert "null" not in invoice and "relay-a" in invoice and "gpt-4o-mini/routed" in invoice
        await tab.until(f"document.querySelector('#usage-ledger [data-ledger={json.dumps(entry['id'])}]')")
        ledger = await tab.text("usage-ledger")
        assert ledger.count("✓") == 3 and "✗" not in ledger and readable(-charge) in ledger
        await check_layout(tab, "phone invoice")
        await tab.shot("console-phone-invoice")


async def test_usage_filters_latency_and_speed_columns(pgw: Gw, chromium: Browser, tmp_path: Path) -> None:
    _, key = await pgw.account(credit=10**9, routed=10**9)
    sent = [await chat(pgw, key, r) for r in ("gpt-4o-mini/official", "gpt-4o-mini/routed", "gpt-4o-mini/routed")]
    await pgw.mock.faults(**{"up-relay-a": {"error_status": 500}, "up-relay-b": {"error_status": 500}})
    status, _, _ = await pgw.post("/v1/chat/completions", key, {
        "model": "gpt-4o-mini", "route": "gpt-4o-mini/routed", "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}]})
    assert status == 502
    await pgw.mock.reset()
    async with console_at(chromium, pgw.url, 1366, 900) as tab:
        await open_with_key(tab, pgw.url, key, "usage")
        await tab.until("document.querySelectorAll('#usage-rows tr[data-request-id]').length === 4")

        async def shown(query: str) -> list[str]:
            await tab.until(f"document.getElementById('usage-table').dataset.query === {json.dumps(query)}")
            ids: list[str] = await tab.page.locator("#usage-rows tr[data-request-id]").evaluate_all(
                "trs => trs.map(tr => tr.dataset.requestId)")
            return ids

        await tab.set("usage-status", "failed")
        await tab.click("#usage-apply")
        failed = await shown("limit=20&status=failed")
        assert len(failed) == 1 and failed[0] not in {s["request_id"] for s in sent}
        await tab.set("usage-status", "")
        await tab.set("usage-route-kind", "routed")
        await tab.set("usage-bucket", "routed")
        await tab.click("#usage-apply")
        assert await shown("limit=20&route_kind=routed&bucket=routed") == [failed[0], sent[2]["request_id"],
                                                                             sent[1]["request_id"]]
        await tab.set("usage-since", "2999-01-01T00:00")
        await tab.click("#usage-apply")
        await tab.until("document.getElementById('usage-rows').innerText.includes('No request matches')")
        # the CSV export takes the filters on screen
        await tab.set("usage-since", "")
        await tab.click("#usage-apply")
        async with tab.page.expect_download() as info:
            await tab.click("#usage-csv")
        saved = tmp_path / "usage.csv"
        await (await info.value).save_as(saved)
        exported = [line.split(",")[0] for line in saved.read_text("utf-8").splitlines()[1:]]
        assert exported == [failed[0], sent[2]["request_id"], sent[1]["request_id"]]
        await tab.click("#usage-clear")
        assert len(await shown("limit=20")) == 4
        row = tab.page.locator(f"#usage-rows tr[data-request-id={json.dumps(sent[1]['request_id'])}]")
        record = sent[1]
        status, listed = await pgw.get(f"/v1/usage?id={record['request_id']}", key)
        latency = listed["data"][0]["latency_ms"]
        assert await row.locator("[data-latency-ms]").get_attribute("data-latency-ms") == str(latency)
        speed = await row.locator("[data-tokens-per-s]").get_attribute("data-tokens-per-s")
        if latency:
            rate = record["usage"]["completion_tokens"] * 1000 / latency
            assert abs(float(speed or "0") - rate) <= max(0.05, rate * 0.01)
        # a row opens its receipt in view
        await tab.js("window.scrollTo(0, 0)")
        await row.click()
        await tab.until("document.getElementById('usage-receipt').dataset.requestId === "
                        + json.dumps(record["request_id"]))
        top = await tab.js("document.getElementById('usage-receipt-panel').getBoundingClientRect().top")
        assert -2 <= top < 450, top
        assert await tab.js("document.activeElement.id") == "usage-receipt-title"


async def test_marketplace_shows_an_embedding_model_as_one(pgw: Gw, chromium: Browser) -> None:
    _, key = await pgw.account(credit=10**9, routed=10**9)
    async with console_at(chromium, pgw.url, 1366, 900) as tab:
        await open_with_key(tab, pgw.url, key, "market")
        card = tab.page.locator('[data-model="embed-small"]')
        text = await card.inner_text()
        assert "embedding" in text and "max output" not in text and "Output" not in text
        assert "Typical request" not in text and "Try" not in text
        cost = await card.locator('[data-route="embed-small/official"] [data-embedding-nanos]').get_attribute(
            "data-embedding-nanos")
        assert cost == str(1000 * 20)  # 1,000 tokens at $0.02 / 1M
        assert "Embedding 1,000 tokens" in text and readable(20_000) in text
        chat_card = await tab.page.locator('[data-model="gpt-4o-mini"]').inner_text()
        assert "max output 1,000 tokens" in chat_card and "Typical request" in chat_card
        await tab.shot("console-market")


async def test_a_refused_key_gets_one_plain_message(pgw: Gw, chromium: Browser) -> None:
    async with console_at(chromium, pgw.url, 390, 844) as tab:
        await tab.page.goto(f"{pgw.url}/playground#key=tf-not-a-real-key-0123456789")
        await tab.until("!document.getElementById('key-refused').hidden")
        assert "This API key was refused." in await tab.text("key-refused")
        await tab.js("new Promise(r => setTimeout(r, 300))")
        assert await tab.page.locator(".error-box").count() == 0  # no red panels besides the one message
        assert await tab.page.locator("[role=alert]:visible").count() == 1
        assert "no chat model" not in await tab.page.inner_text("body")
        assert "Key refused." in await tab.text("key-status")
        await check_layout(tab, "refused key")


async def test_the_research_estimate_agrees_with_the_cap(pgw: Gw, chromium: Browser) -> None:
    _, key = await pgw.account(credit=10**9)
    async with console_at(chromium, pgw.url, 390, 844) as tab:
        await open_with_key(tab, pgw.url, key, "research")
        await tab.set("research-max", "0.0003")
        await tab.click("#research-estimate")
        await tab.until("document.getElementById('research-estimate-out').dataset.state")
        text = await tab.text("research-estimate-out")
        status, body, _ = await pgw.post("/v1/research/reports", key, {
            "topic": await tab.js("document.getElementById('research-topic').value"), "model": "gpt-4o-mini",
            "max_charge_nanos": 300_000, "dry_run": True})
        estimate: dict[str, Any] = body["estimate"]
        assert status == 200 and estimate["expected_nanos"] > 300_000 and estimate["allowed"] is False
        assert await tab.js("document.getElementById('research-estimate-out').dataset.state") == "refused"
        assert "above your cap" in text and text.count("allowed") <= 1 and "null" not in text
        assert "free research allowance" in text and "top up" not in text
        await check_layout(tab, "research estimate")


async def test_favicon_is_served(pgw: Gw) -> None:
    async with pgw.session.get(pgw.url + "/favicon.ico") as r:
        assert r.status == 200 and r.content_type == "image/x-icon"
        body = await r.read()
    assert body[:4] == b"\x00\x00\x01\x00" and b"PNG" in body[:40]
