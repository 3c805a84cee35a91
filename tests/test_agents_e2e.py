"""The real coding agents, unchanged, against a gateway: Claude Code (`claude -p`) and Codex CLI (`codex exec`).

Each test starts its own gateway (real PostgreSQL, the simulated upstream) with a catalog of three models, each
pinned to one route: an Anthropic-kind channel, an OpenAI-kind channel that speaks Chat and Responses, and a
routed relay that speaks Chat only. A recording proxy between agent and gateway keeps what the agent sent and the
gateway's request ids. One prompt makes a two-request session: the simulated upstream answers the first with a
call of the tool the prompt names (it quotes the prompt as arguments), the agent runs it in a temp dir and sends
the result back, the upstream quotes it. Then: every receipt matches the ledger (and SPEC §5's invariants hold,
checked by the `dsn` fixture), and the second request, which re-sends the first one's prefix, shows cache reads
and costs less.

All checks of a run are collected and reported together (`Checks`), so one failing run says everything that is
wrong with it. Set TOKENSFORGE_AGENTS_RECORD=1 to (re)write tests/fixtures/agents/ from what the agents sent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tokensforge.catalog import CatalogError, load_catalog

from .agents import (
    AgentRun, Exchange, Recorder, claude_argv, claude_env, codex_argv, codex_env, ensure_agents, run_agent,
    write_fixtures,
)
from .harness import Gw, Mock, gateway_of, gateway_settings, start_gateway

FIXTURES = Path(__file__).parent / "fixtures" / "agents"
SECRET_WORD = "PLUM-7319"

#: one model per route kind; prices per 1M tokens, cache classes at the providers' usual ratios
#: (read 0.1×, 5-minute write 1.25×, 1-hour write 2× the input price)
ROUTES: dict[str, dict[str, str]] = {
    "anthropic": {"model": "claude-sonnet-4", "route": "claude-sonnet-4/official", "bucket": "credit",
                  "input": "3.00", "output": "15.00", "cache_read": "0.30", "cache_write": "3.75",
                  "cache_write_1h": "6.00"},
    "openai": {"model": "gpt-4o-mini", "route": "gpt-4o-mini/official", "bucket": "credit",
               "input": "0.15", "output": "0.60", "cache_read": "0.075", "cache_write": "0.15",
               "cache_write_1h": "0.15"},
    "routed": {"model": "llama-3.3-70b", "route": "llama-3.3-70b/routed", "bucket": "routed",
               "input": "0.60", "output": "0.60", "cache_read": "0.06", "cache_write": "0.60",
               "cache_write_1h": "0.60"},
}

CATALOG_HEAD = """
[[buckets]]
id = "credit"
name = "Official Credit"

[[buckets]]
id = "routed"
name = "Routed balance"

[[channels]]
id = "anthropic-up"
kind = "anthropic"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
anthropic_version = "2023-06-01"
timeout_s = 20

[[channels]]
id = "openai-up"
kind = "openai"
apis = ["chat", "responses"]
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = 20

[[channels]]
id = "relay-up"
kind = "openai"
apis = ["chat"]
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = 20
"""

MODEL = """
[[models]]
id = "{model}"
max_output_tokens = {max_output}

  [[models.routes]]
  id = "{route}"
  kind = "{kind}"
  bucket = "{bucket}"
  input_price_per_mtok = "{input}"
  output_price_per_mtok = "{output}"
{cache_prices}  channels = [{{ channel = "{channel}", upstream_model = "up-{model}" }}]
"""

CACHE_PRICES = """  cache_read_price_per_mtok = "{cache_read}"
  cache_write_price_per_mtok = "{cache_write}"
  cache_write_1h_price_per_mtok = "{cache_write_1h}"
"""

#: the agent and route pairs where client and channel speak the same API (SPEC §1 "native first")
NATIVE = frozenset({("claude", "anthropic"), ("codex", "openai")})
CHANNEL_OF = {"anthropic": "anthropic-up", "openai": "openai-up", "routed": "relay-up"}
MAX_OUTPUT = {"anthropic": 64000, "openai": 16384, "routed": 8192}  # the real models' limits


def catalog_text(mock_url: str, *, cache_prices: bool) -> str:
    models = "".join(MODEL.format(
        kind="official" if name != "routed" else "routed", channel=CHANNEL_OF[name], max_output=MAX_OUTPUT[name],
        cache_prices=CACHE_PRICES.format(**r) if cache_prices else "", **r) for name, r in ROUTES.items())
    return CATALOG_HEAD.format(mock=mock_url) + models


def write_agent_catalog(path: Path, mock_url: str) -> bool:
    """The catalog with cache prices; without them when this gateway's catalog does not know the keys yet
    (then the cache-billing checks fail on their own, with the reason). True when cache prices are in."""
    path.write_text(catalog_text(mock_url, cache_prices=True), encoding="utf-8")
    try:
        load_catalog(path)
        return True
    except CatalogError as exc:
        if "cache_read_price_per_mtok" not in str(exc):
            raise
    path.write_text(catalog_text(mock_url, cache_prices=False), encoding="utf-8")
    return False


@dataclass
class AgentGw:
    gw: Gw
    key: str
    cache_prices: bool


@pytest.fixture
async def agent_gw(dsn: str, mock_upstream: Mock, tmp_path: Path) -> AsyncIterator[AgentGw]:
    ensure_agents()
    await mock_upstream.reset()
    catalog = tmp_path / "catalog.toml"
    cache_prices = write_agent_catalog(catalog, mock_upstream.url)
    ctx, url, app = await start_gateway(gateway_settings(catalog), dsn)
    async with ctx, aiohttp.ClientSession() as session:
        gw = Gw(url, dsn, gateway_of(app), mock_upstream, session)
        _, key = await gw.account(credit=50_000_000_000, routed=50_000_000_000)
        yield AgentGw(gw, key, cache_prices)


# ------------------------------------------------------------------------------------------ soft checks


@dataclass
class Checks:
    """Every check of one run, failures collected; `done()` fails with all of them and the evidence."""

    failures: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok

    def done(self) -> None:
        if self.failures:
            lines = "\n".join(f"  - {f}" for f in self.failures)
            raise AssertionError(f"{len(self.failures)} check(s) failed:\n{lines}\n\n" + "\n\n".join(self.evidence))


def per_mtok_nanos(tokens: int, price: str) -> Decimal:
    return Decimal(tokens) * Decimal(price) * 1000  # price USD/1M tokens → nano-USD per token is price × 1000


def expected_charge_nanos(usage: dict[str, Any], prices: dict[str, str], cache_prices: bool) -> int:
    """SPEC §1: Σ class × its price, rounded half up once; a class the route does not price costs input."""
    cache_read = int(usage.get("cache_read_tokens") or 0)
    cache_write = int(usage.get("cache_write_tokens") or 0)
    cache_write_1h = int(usage.get("cache_write_1h_tokens") or 0)
    fresh = int(usage["prompt_tokens"]) - cache_read - cache_write - cache_write_1h
    price = (lambda k: prices[k] if cache_prices else prices["input"])  # noqa: E731
    total = (per_mtok_nanos(fresh, prices["input"]) + per_mtok_nanos(cache_read, price("cache_read"))
             + per_mtok_nanos(cache_write, price("cache_write"))
             + per_mtok_nanos(cache_write_1h, price("cache_write_1h"))
             + per_mtok_nanos(int(usage["completion_tokens"]), prices["output"]))
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def check_receipts(checks: Checks, agw: AgentGw, requests: list[Exchange], route: dict[str, str]
                         ) -> list[dict[str, Any]]:
    """Each answered model request's receipt: succeeded on the pinned route, charge = Σ class × price, and its
    ledger entry holds exactly that (SPEC §5: receipts match the ledger)."""
    receipts = []
    for i, exchange in enumerate(requests):
        if not checks.check(exchange.request_id is not None, f"request {i + 1} got no x-request-id"):
            continue
        status, receipt = await agw.gw.get(f"/v1/receipts/{exchange.request_id}", agw.key)
        if not checks.check(status == 200, f"GET /v1/receipts/{exchange.request_id} → {status} {receipt}"):
            continue
        receipts.append(receipt)
        checks.evidence.append(f"receipt {i + 1}: {orjson.dumps(receipt).decode()}")
        if not checks.check(receipt.get("status") == "succeeded", f"receipt {i + 1} status {receipt.get('status')}"):
            continue
        checks.check((receipt.get("route") or {}).get("id") == route["route"],
                     f"receipt {i + 1} route {receipt.get('route')} is not the pinned {route['route']}")
        charge = expected_charge_nanos(receipt["usage"], route, agw.cache_prices)
        checks.check(receipt["charge_nanos"] == charge > 0,
                     f"receipt {i + 1} charges {receipt['charge_nanos']} nanos; its usage {receipt['usage']} at the "
                     f"route's class prices is {charge}")
        checks.check(receipt["charge_nanos"] <= receipt["reserved_nanos"],
                     f"receipt {i + 1} charge {receipt['charge_nanos']} > reserved {receipt['reserved_nanos']}")
        entry = await agw.gw.ledger_entry(agw.key, receipt["ledger_entry_id"])
        checks.check(entry["kind"] == "charge" and entry["amount_nanos"] == -receipt["charge_nanos"]
                     and entry["request_id"] == receipt["request_id"] and entry["bucket"] == route["bucket"]
                     and entry["balance_after_nanos"] == receipt["balance_after_nanos"],
                     f"receipt {i + 1} does not match its ledger entry {entry}")
    return receipts


def check_cache(checks: Checks, receipts: list[dict[str, Any]], cache_prices: bool) -> None:
    """The second model request re-sends the first one's prefix: the upstream reads it from its cache, the
    receipt says so, and that turn costs less than the first although it carries more input."""
    if not checks.check(len(receipts) >= 2, f"only {len(receipts)} succeeded receipt(s): no second turn to compare"):
        return
    first, second = receipts[0], receipts[1]
    checks.check(cache_prices, "the gateway's catalog does not accept cache_read_price_per_mtok / "
                               "cache_write_price_per_mtok / cache_write_1h_price_per_mtok (route prices)")
    cache_read = (second.get("usage") or {}).get("cache_read_tokens")
    checks.check(isinstance(cache_read, int) and cache_read > 0,
                 f"second turn's receipt shows no cache reads: usage.cache_read_tokens = {cache_read!r}")
    checks.check(second["usage"]["prompt_tokens"] >= first["usage"]["prompt_tokens"],
                 "second turn carries less input than the first: it should re-send the whole session")
    checks.check(second["charge_nanos"] < first["charge_nanos"],
                 f"second turn costs {second['charge_nanos']} nanos, not less than the first's {first['charge_nanos']}")


def describe_requests(recorder: Recorder) -> str:
    return "\n".join(f"{e.method} {e.path} model={e.model} → {e.status} id={e.request_id} "
                     f"{e.response_text[:300] if e.status != 200 else ''}" for e in recorder.exchanges)


def tool_results_of(exchange: Exchange) -> list[str]:
    """The tool results a request sends back, in any of the three dialects, as text."""
    body = exchange.body if isinstance(exchange.body, dict) else {}
    found: list[str] = []
    for item in body.get("messages") or []:  # Messages: tool_result blocks; Chat: role "tool"
        if not isinstance(item, dict):
            continue
        if item.get("role") == "tool":
            found.append(orjson.dumps(item.get("content")).decode())
        content = item.get("content")
        if isinstance(content, list):
            found += [orjson.dumps(b.get("content")).decode() for b in content
                      if isinstance(b, dict) and b.get("type") == "tool_result"]
    for item in body.get("input") or [] if isinstance(body.get("input"), list) else []:  # Responses
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            found.append(orjson.dumps(item.get("output")).decode())
    return found


def check_session(checks: Checks, recorder: Recorder, run: AgentRun, final_text: str) -> list[Exchange]:
    """A multi-turn session with a tool call: every model request answered (an agent that retries a refused
    request without the refused field still counts the refusal), the second answered one carrying the tool's
    result (the file's content), and the agent's final answer quoting it. The answered requests."""
    requests = recorder.model_requests()
    checks.evidence.append("requests:\n" + describe_requests(recorder))
    checks.evidence.append(run.describe())
    checks.check(run.returncode == 0, f"the agent exited with {run.returncode}")
    for i, e in enumerate(requests):
        checks.check(e.status == 200, f"model request {i + 1} ({e.path}) answered {e.status}: {e.response_text[:400]}")
    answered = [e for e in requests if e.status == 200]
    if not checks.check(len(answered) >= 2, f"{len(answered)} answered model request(s); a tool session needs 2"):
        return answered
    results = tool_results_of(answered[1])
    checks.check(bool(results), "the second model request sends no tool result back")
    checks.check(any(SECRET_WORD in r for r in results),
                 f"the tool did not read the file: its result has no {SECRET_WORD!r}: {[r[:200] for r in results]}")
    checks.check("The tool said" in final_text and SECRET_WORD in final_text,
                 f"the agent's final answer does not quote the file: {final_text[:300]!r}")
    return answered


async def agent_session(agw: AgentGw, tmp_path: Path, which: str, route_name: str) -> None:
    route = ROUTES[route_name]
    # The simulated upstream calls the tool the prompt names (else the first offered) and passes the prompt's
    # first 64 characters as every required string argument: for Claude Code (only tool: Read) the prompt is
    # the file's absolute path, so the work dir is a short one; for Codex it is a shell command naming its tool.
    work = Path(tempfile.mkdtemp(prefix="tf-agent-"))
    try:
        (work / "notes.txt").write_text(f"the secret word is {SECRET_WORD}\n", encoding="utf-8")
        home = tmp_path / "home"
        home.mkdir()
        recorder = Recorder(agw.gw.url)
        ctx, proxy_url = recorder.start()
        async with ctx:
            if which == "claude":
                env = claude_env(home, proxy_url, agw.key, route["model"])
                run = await run_agent(claude_argv(str(work / "notes.txt"), tools="Read"), env, work)
                final_text = claude_result(run)
            else:
                env = codex_env(home, proxy_url, agw.key, route["model"])
                run = await run_agent(codex_argv("cat notes.txt  # exec_command", work), env, work)
                final_text = codex_result(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if os.environ.get("TOKENSFORGE_AGENTS_RECORD"):
        write_fixtures(FIXTURES, f"{which}-{route_name}", recorder.exchanges)
    checks = Checks()
    answered = check_session(checks, recorder, run, final_text)
    receipts = await check_receipts(checks, agw, answered, route)
    if (which, route_name) in NATIVE:
        # a hosted tool the catalog cannot price is dropped on every route (SPEC §1); nothing else may be
        dropped = [n for r in receipts for n in r.get("notes") or ()
                   if "dropped" in str(n) and "not priced" not in str(n)]
        checks.check(not dropped, f"a native route forwards the request as sent, yet the receipts say {dropped}")
    check_cache(checks, receipts, agw.cache_prices)
    checks.done()


def claude_result(run: AgentRun) -> str:
    """`claude -p --output-format json` prints one result object; its `result` is the final answer."""
    try:
        result = orjson.loads(run.stdout)
    except orjson.JSONDecodeError:
        return ""
    return str(result.get("result") or "") if isinstance(result, dict) and not result.get("is_error") else ""


def codex_result(run: AgentRun) -> str:
    """`codex exec --json` prints JSON events; the last agent message is the final answer."""
    text = ""
    for line in run.stdout.splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        item = event.get("item") if isinstance(event, dict) else None
        if isinstance(item, dict) and item.get("type") == "agent_message":
            text = str(item.get("text") or "")
    return text


#: Claude Code's tool session on an OpenAI-kind model is not driven by the simulated upstream yet: for a model it
#: does not know it sends deferred tools and a different turn layout, and the upstream's scripted tool call never
#: reaches the Read tool (its requests are served and billed; issue #15 stays open for this). Those routes run
#: here once the upstream can script that session.
CLAUDE_ROUTES = list(ROUTES)


@pytest.mark.parametrize("route_name", CLAUDE_ROUTES)
async def test_claude_code_tool_session(agent_gw: AgentGw, tmp_path: Path, route_name: str) -> None:
    await agent_session(agent_gw, tmp_path, "claude", route_name)


@pytest.mark.parametrize("route_name", list(ROUTES))
async def test_codex_tool_session(agent_gw: AgentGw, tmp_path: Path, route_name: str) -> None:
    await agent_session(agent_gw, tmp_path, "codex", route_name)
