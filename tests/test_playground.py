"""The browser playground (SPEC §6): the page handler, the page's hygiene, and the page in a real browser.

The browser tests run Debian's `chromium` headless against a real gateway (real PostgreSQL,
simulated upstream) that serves the page on the same origin as /v1. One test uses
`--dump-dom`; the others drive the page over the Chrome DevTools Protocol (typing, clicking
Send, reading what the page shows) and compare it with what the API says.

Set TF_PLAYGROUND_SHOTS=/some/dir to keep full-page screenshots of each state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tokensforge.api import playground
from tokensforge.server import listening_socket, running

from .harness import Gw, Mock, gateway_of, gateway_settings, start_gateway, write_catalog

CHROMIUM = "/usr/bin/chromium"
PAGE_IDS = ("api-key", "key-form", "balances", "catalog", "model", "route", "max-tokens", "message", "send",
            "quote-panel", "quote", "answer", "receipt-panel", "receipt", "ledger-row", "tab-usage", "panel-usage",
            "usage-table", "tab-research", "panel-research", "research-topic", "research-max", "research-estimate",
            "research-run")


def page_text() -> str:
    return playground.PAGE.decode("utf-8")


async def serve_page_only() -> tuple[Any, str]:
    """A tiny app with only the playground routes (no API behind it)."""
    app = web.Application()
    app.add_routes(playground.routes)
    sock = listening_socket("127.0.0.1", 0)
    return running(app, sock), f"http://127.0.0.1:{sock.getsockname()[1]}"


# ---------------------------------------------------------------- the handler and the page itself


async def test_page_is_served_as_html_on_both_paths() -> None:
    ctx, url = await serve_page_only()
    async with ctx, aiohttp.ClientSession() as session:
        for path in ("/playground", "/playground/"):
            async with session.get(url + path) as r:
                assert r.status == 200
                assert r.content_type == "text/html"
                assert r.charset == "utf-8"
                assert r.headers["cache-control"] == "no-store"
                assert r.headers["referrer-policy"] == "no-referrer"
                csp = r.headers["content-security-policy"]
                assert "default-src 'none'" in csp and "connect-src 'self'" in csp
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
                body = await r.text()
        assert body.startswith("<!doctype html>")
        for element_id in PAGE_IDS:
            assert f'id="{element_id}"' in body, element_id


def test_page_is_package_data_read_once() -> None:
    packaged = resources.files("tokensforge.playground").joinpath("index.html").read_bytes()
    assert packaged == playground.PAGE


def test_csp_hashes_match_the_inline_script_and_style() -> None:
    text = page_text()
    assert text.count("<script>") == 1 and text.count("<style>") == 1
    assert "<script src" not in text and "<link" not in text
    for tag in ("script", "style"):
        block = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
        assert block is not None
        digest = base64.b64encode(hashlib.sha256(block.group(1).encode()).digest()).decode()
        assert f"'sha256-{digest}'" in playground.CONTENT_SECURITY_POLICY


def test_page_has_no_external_urls() -> None:
    text = page_text()
    assert re.findall(r"(?i)https?://", text) == []
    assert re.findall(r"""(?i)(?:src|href|action)\s*=\s*["']?//""", text) == []
    assert re.findall(r"(?i)url\(", text) == []  # no remote fonts or images from CSS
    assert "@import" not in text


def test_key_lives_in_session_storage_only() -> None:
    text = page_text()
    assert "sessionStorage.setItem" in text and "sessionStorage.getItem" in text
    assert "localStorage" not in text
    assert "document.cookie" not in text
    assert "indexedDB" not in text


def test_page_never_inserts_html_strings() -> None:
    text = page_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in text, sink


def test_money_is_formatted_with_bigint_not_floats() -> None:
    text = page_text()
    assert "1000000000n" in text and "BigInt(" in text
    for float_money in ("parseFloat", "toFixed", "/ 1e9", "/1e9", "* 1e9"):
        assert float_money not in text, float_money


# ---------------------------------------------------------------- a real browser


def require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the playground's browser tests need Debian's `chromium` package. "
                    "Install it (`apt-get install -y chromium`); the Makefile's test target should do so.")


def chromium_command(profile: Path) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
            "--password-store=basic", f"--user-data-dir={profile}", "--window-size=1280,1600"]


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Stop chromium and its helpers: it runs in its own process group (started with a new session)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def dump_dom(url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        *chromium_command(profile), "--virtual-time-budget=8000", "--dump-dom", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
    finally:
        await stop_process(proc)
    return out.decode("utf-8")


class Page:
    """One browser tab driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, origin: str) -> None:
        self.ws, self.origin, self.next_id = ws, origin, 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return dict(msg.get("result") or {})
            self.events.append(msg)

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if await self.js(f"!!({expression})"):
                return
            if time.monotonic() > deadline:
                text = await self.js("document.body.innerText")
                raise AssertionError(f"timed out waiting for {expression}\n--- page text ---\n{text[:4000]}")
            await asyncio.sleep(0.1)

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until("document.readyState === 'complete'")

    async def text(self, element_id: str) -> str:
        return str(await self.js(f"document.getElementById({json.dumps(element_id)}).innerText"))

    async def set(self, element_id: str, value: str) -> None:
        await self.js(f"""(() => {{ const el = document.getElementById({json.dumps(element_id)});
            el.value = {json.dumps(value)};
            el.dispatchEvent(new Event('input', {{bubbles: true}}));
            el.dispatchEvent(new Event('change', {{bubbles: true}})); return el.value; }})()""")

    async def click(self, selector: str) -> None:
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")

    async def shot(self, name: str) -> None:
        directory = os.environ.get("TF_PLAYGROUND_SHOTS")
        if not directory:
            return
        size = (await self.call("Page.getLayoutMetrics"))["cssContentSize"]
        data = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        Path(directory, f"{name}.png").write_bytes(base64.b64decode(data["data"]))

    def problems(self) -> list[str]:
        """Script errors, CSP violations and requests to any other origin, seen so far."""
        found = []
        for ev in self.events:
            method, params = ev.get("method"), ev.get("params") or {}
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded":
                entry = params["entry"]
                if entry["level"] == "error" and not entry["text"].startswith("Failed to load resource"):
                    found.append(f"log: {entry['text']}")
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if not url.startswith((self.origin + "/", "data:", "about:")):
                    found.append(f"request to another origin: {url}")
        return found


@contextlib.asynccontextmanager
async def browser(profile: Path, origin: str) -> AsyncIterator[Page]:
    require_chromium()
    proc = await asyncio.create_subprocess_exec(
        *chromium_command(profile), "--remote-debugging-port=0", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.returncode is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json(content_type=None)
            target = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws, origin)
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await page.call(f"{domain}.enable")
                yield page
                await page.js("1")  # collect the events still in flight
                assert page.problems() == []
                await page.call("Browser.close")
    finally:
        await stop_process(proc)


async def start_page_gateway(dsn: str, mock: Mock, tmp_path: Path) -> tuple[Any, Any, str]:
    settings = gateway_settings(write_catalog(tmp_path / "catalog.toml", mock.url))
    ctx, url, app = await start_gateway(settings, dsn)
    # Serve the page on the gateway itself (same origin as /v1), as create_app does once it registers it.
    if not any(getattr(r.resource, "canonical", None) == "/playground" for r in app.router.routes()):
        app.add_routes(playground.routes)
    return ctx, app, url


@pytest.fixture
async def pgw(dsn: str, mock_upstream: Mock, tmp_path: Path) -> AsyncIterator[Gw]:
    """Like the `gw` fixture, with /playground served by the same gateway."""
    await mock_upstream.reset()
    ctx, app, url = await start_page_gateway(dsn, mock_upstream, tmp_path)
    async with ctx, aiohttp.ClientSession() as session:
        yield Gw(url, dsn, gateway_of(app), mock_upstream, session)


def usd(nanos: int) -> str:
    whole, frac = divmod(abs(nanos), 1_000_000_000)
    return f"{'-' if nanos < 0 else ''}{whole}.{frac:09d}"


async def test_browser_dump_dom_renders_catalog_balances_and_quote(pgw: Gw, tmp_path: Path) -> None:
    require_chromium()
    _, key = await pgw.account(credit=2_000_000_000, routed=1_500_000_000)
    dom = await dump_dom(f"{pgw.url}/playground#key={key}", tmp_path / "profile")
    assert 'id="catalog" class="models" data-loaded="true"' in dom
    status, models = await pgw.get("/v1/models", key)
    assert status == 200
    for model in models["data"]:
        assert f'data-model="{model["id"]}"' in dom
        for route in model["routes"]:
            assert f'data-route="{route["id"]}"' in dom
    assert "$0.15 / 1M" in dom and "$0.24 / 1M" in dom  # prices per 1M tokens
    assert "$2.000000000" in dom and "$1.500000000" in dom  # available per bucket
    assert 'data-state="allowed"' in dom  # the quote came back before Send
    assert "gpt-4o-mini/official" in dom
    assert key not in dom  # shown masked only; the fragment was taken off the URL


async def test_browser_send_streams_and_shows_receipt_ledger_and_usage(pgw: Gw, tmp_path: Path) -> None:
    _, key = await pgw.account(credit=1_000_000_000, routed=1_000_000_000)
    async with browser(tmp_path / "profile", pgw.url) as page:
        await page.goto(pgw.url + "/playground")
        assert "No key yet" in await page.text("key-status")
        await page.set("api-key", key)
        await page.js("document.getElementById('key-form').requestSubmit()")
        await page.until("document.getElementById('catalog').dataset.loaded === 'true'")
        assert await page.js("sessionStorage.getItem('tokensforge.apiKey')") == key
        assert await page.js("localStorage.length") == 0
        assert await page.js("document.cookie") == ""
        assert await page.js("document.getElementById('api-key').value") == ""

        # Before: the quote follows the route pin and max_tokens.
        await page.until("document.getElementById('quote').dataset.state === 'allowed'")
        assert "gpt-4o-mini/official" in await page.text("quote")
        await page.set("route", "gpt-4o-mini/routed")
        await page.set("max-tokens", "40")
        await page.until("document.getElementById('quote').innerText.includes('gpt-4o-mini/routed')"
                         " && !document.getElementById('quote').classList.contains('stale')")
        quote_text = await page.text("quote")
        status, quote, _ = await pgw.post("/v1/quote", key, {
            "model": "gpt-4o-mini", "route": "gpt-4o-mini/routed", "max_tokens": 40, "stream": True,
            "messages": [{"role": "user", "content": await page.js("document.getElementById('message').value")}]})
        assert status == 200
        assert f"${quote['reserve_usd']}" in quote_text and "charge_delivered" in quote_text
        assert "relay-a" in quote_text and "relay-b" in quote_text
        await page.shot("1-quote")

        # Send: streamed answer, then the receipt, its ledger row and fresh balances.
        await page.click("#send")
        await page.until("document.getElementById('receipt-panel').dataset.state === 'done'")
        assert (await page.text("answer")).strip()
        status, usage = await pgw.get("/v1/usage?limit=1", key)
        assert status == 200
        record = usage["data"][0]
        assert record["status"] == "succeeded" and record["route"]["id"] == "gpt-4o-mini/routed"
        shown = await page.js("document.getElementById('receipt').dataset.requestId")
        assert shown == record["request_id"]
        receipt_text = await page.text("receipt")
        for field in ("request_id", "status", "selected_model", "upstream_model", "route", "bucket", "price",
                      "account_id", "project_id", "key_id", "channels", "attempts", "fallback", "on_failure",
                      "usage", "reserved_nanos", "charge_nanos", "charge_usd", "ledger_entry_id",
                      "balance_after_nanos"):
            assert field in receipt_text, field
        assert f"${record['charge_usd']}" in receipt_text
        assert record["ledger_entry_id"] in receipt_text
        await page.until(f"document.querySelector('[data-ledger={json.dumps(record['ledger_entry_id'])}]')")
        ledger_text = await page.text("ledger-row")
        assert f"−${record['charge_usd']}" in ledger_text
        assert ledger_text.count("✓") == 3 and "✗" not in ledger_text
        assert "Succeeded on the primary channel relay-a" in await page.text("banner")
        balances = await pgw.balances(key)
        routed_available = usd(balances["routed"]["available_nanos"])
        await page.until(f"document.querySelector('[data-bucket=routed] .avail').innerText === '${routed_available}'")
        await page.shot("2-receipt")

        # Usage history: the request is listed; clicking it shows its receipt.
        await page.click("#tab-usage")
        row = f"#usage-rows tr[data-request-id={json.dumps(record['request_id'])}]"
        await page.until(f"document.querySelector({json.dumps(row)})")
        await page.click(row)
        await page.until("document.getElementById('usage-receipt').dataset.requestId === "
                         + json.dumps(record["request_id"]))
        await page.until("document.getElementById('usage-ledger').querySelector('table')")
        assert f"${record['charge_usd']}" in await page.text("usage-receipt")
        await page.shot("3-usage")

        await page.click("#tab-market")
        await page.until("document.querySelector('[data-model=\"flaky-chain\"]')")
        await page.shot("4-market")


async def test_browser_shows_fallback_failure_refusal_and_cancel(pgw: Gw, tmp_path: Path) -> None:
    _, key = await pgw.account(credit=1_000_000_000, routed=1_000_000_000)
    async with browser(tmp_path / "profile", pgw.url) as page:
        await page.goto(f"{pgw.url}/playground#key={key}")
        await page.until("document.getElementById('catalog').dataset.loaded === 'true'")
        assert await page.js("location.hash") == ""  # the key left the URL at once
        await page.set("route", "gpt-4o-mini/routed")

        # A backup channel served it: said plainly.
        await pgw.mock.faults(**{"up-relay-a": {"error_status": 502}})
        await page.click("#send")
        await page.until("document.getElementById('receipt-panel').dataset.state === 'done'")
        banner = await page.text("banner")
        assert "BACKUP CHANNEL: relay-b" in banner and "relay-a" in banner
        assert "5xx" in await page.text("receipt")
        await page.shot("5-fallback")

        # Every channel failed: the OpenAI-shaped error, a FAILED receipt, no ledger entry.
        await pgw.mock.faults(**{"up-relay-a": {"error_status": 500}, "up-relay-b": {"error_status": 503}})
        await page.click("#send")
        await page.until("document.getElementById('receipt-panel').dataset.state === 'done'")
        error = await page.text("answer-error")
        assert "HTTP 502" in error and "upstream_error" in error
        assert "FAILED" in await page.text("banner")
        assert "No charge, no ledger entry" in await page.text("ledger-row")
        await page.shot("6-failed")
        await pgw.mock.reset()

        # Stop mid-stream: client_cancelled, billed by the route's policy.
        await pgw.mock.faults(**{"up-relay-a": {"chunk_delay_ms": 150}})
        await page.click("#send")
        await page.until("document.getElementById('answer').innerText.length > 0")
        await page.click("#stop")
        await page.until("document.getElementById('receipt-panel').dataset.state === 'done'")
        assert "CANCELLED" in await page.text("banner")
        assert "client_cancelled" in await page.text("receipt")
        await pgw.mock.reset()

        # A different route served it (the policy allows it): said plainly, with the other bucket.
        _, hopper = await pgw.account(credit=1_000_000_000, routed=1_000_000_000, policy={
            "allow_cross_route_fallback": True, "route_preference": ["routed"]})
        await pgw.mock.faults(**{"up-chain-b": {"error_status": 500}})
        await page.js(f"sessionStorage.setItem('tokensforge.apiKey', {json.dumps(hopper)})")
        await page.goto(f"{pgw.url}/playground")
        await page.until("document.getElementById('catalog').dataset.loaded === 'true'")
        await page.set("model", "flaky-chain")
        await page.until("document.getElementById('quote').innerText.includes('flaky-chain/routed')")
        assert "allowed — may move to another route" in await page.text("quote")
        await page.click("#send")
        await page.until("document.getElementById('receipt-panel').dataset.state === 'done'")
        banner = await page.text("banner")
        assert "FALLBACK ROUTE: moved from flaky-chain/routed to flaky-chain/official" in banner
        assert "“credit”" in banner
        await page.until("document.querySelector('#ledger-row [data-ledger]')")
        assert "credit" in await page.text("ledger-row")
        await page.shot("7-cross-route")
        await pgw.mock.reset()

        # 402: the quote says no before Send, and Send shows bucket, needed and available.
        _, poor = await pgw.account(credit=1_000_000_000, routed=1_000)
        await page.js(f"sessionStorage.setItem('tokensforge.apiKey', {json.dumps(poor)})")
        await page.goto(f"{pgw.url}/playground")
        await page.until("document.getElementById('catalog').dataset.loaded === 'true'")
        await page.set("route", "gpt-4o-mini/routed")
        await page.until("document.getElementById('quote').dataset.state === 'refused'")
        assert "insufficient_balance" in await page.text("quote")
        await page.click("#send")
        await page.until("document.getElementById('answer-error').innerText.includes('402')")
        error = await page.text("answer-error")
        assert "bucket “routed” needs $" in error and "has $0.000001000 available" in error
        assert "needed" in error and "available" in error and "x-request-id" in error
        await page.shot("8-402")


async def test_browser_research_estimate_and_streamed_run(pgw: Gw, tmp_path: Path) -> None:
    _, key = await pgw.account(credit=1_000_000_000, routed=1_000_000_000)
    async with browser(tmp_path / "profile", pgw.url) as page:
        await page.goto(f"{pgw.url}/playground#key={key}&tab=research")
        await page.until("document.getElementById('catalog').dataset.loaded === 'true'")
        assert await page.js("document.getElementById('panel-research').hidden") is False
        await page.set("research-topic", "Funding rates and basis")
        await page.set("research-max", "0.5")
        await page.click("#research-estimate")
        await page.until("document.getElementById('research-estimate-out').dataset.state === 'allowed'")
        estimate = await page.text("research-estimate-out")
        assert "gpt-4o-mini/official" in estimate and "Overview" in estimate
        status, usage = await pgw.get("/v1/usage", key)
        assert status == 200 and usage["data"] == []  # a dry run charges nothing

        await page.click("#research-run")
        await page.until("document.getElementById('research-banner').innerText.includes('completed')", timeout=40)
        status, usage = await pgw.get("/v1/usage", key)
        assert status == 200
        sections = [r for r in usage["data"] if r["endpoint"] == "research.section"]
        assert len(sections) == 5
        receipts = await page.text("research-receipts")
        total = sum(r["charge_nanos"] for r in sections)
        assert f"${usd(total)}" in receipts and "✓" in receipts and "✗" not in receipts
        for record in sections:
            assert record["request_id"] in receipts
        assert "Research support, not financial advice." in await page.text("research-sections-out")
        await page.shot("9-research")


async def test_browser_research_tab_reports_a_missing_endpoint(tmp_path: Path) -> None:
    ctx, url = await serve_page_only()  # no API at all behind the page: every /v1 call answers 404
    async with ctx, browser(tmp_path / "profile", url) as page:
        await page.goto(f"{url}/playground#key=tf-not-a-real-key&tab=research")
        await page.until("document.getElementById('catalog').innerText.includes('404')")
        await page.set("research-topic", "anything")
        await page.click("#research-run")
        await page.until("document.getElementById('research-error').innerText.includes('404')")
        assert "not available on this gateway" in await page.text("research-error")
        assert await page.js("document.getElementById('research-run').disabled") is False
