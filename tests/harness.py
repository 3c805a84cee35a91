"""A real gateway on loopback for end-to-end tests: real PostgreSQL, the simulated upstream, the SDK."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tokensforge.catalog import Catalog, load_catalog
from tokensforge.mock_upstream import MockConfig, create_app as create_mock_app
from tokensforge.money import charge_nanos, classes_charge_nanos
from tokensforge.server import listening_socket, running
from tokensforge.app import create_app
from tokensforge.settings import Settings
from tokensforge.state import GATEWAY, Gateway

ADMIN_TOKEN = "adm-test-token"
UPSTREAM_SECRET = "sk-upstream-secret-never-shown"

CATALOG = """
[[buckets]]
id = "credit"
name = "Official Credit"

[[buckets]]
id = "routed"
name = "Routed balance"

[[channels]]
id = "official-a"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = {timeout_s}
connect_timeout_s = 1

[[channels]]
id = "responses-a"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
apis = ["chat", "responses"]
timeout_s = {timeout_s}
connect_timeout_s = 1

[[channels]]
id = "relay-a"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = {timeout_s}
connect_timeout_s = 1

[[channels]]
id = "relay-b"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = {timeout_s}
connect_timeout_s = 1

[[channels]]
id = "official-quick"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = 0.4
connect_timeout_s = 1

[[channels]]
id = "single-slot"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = {timeout_s}
max_concurrency = 1

[[channels]]
id = "dead"
base_url = "{dead}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = {timeout_s}
connect_timeout_s = 1

[[channels]]
id = "anthropic-a"
kind = "anthropic"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = {timeout_s}
connect_timeout_s = 1

[[models]]
id = "gpt-4o-mini"
max_output_tokens = 1000

  [[models.routes]]
  id = "gpt-4o-mini/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.15"
  output_price_per_mtok = "0.60"
  channels = [{{ channel = "official-a", upstream_model = "up-official" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}
  on_failure = "free"

  [[models.routes]]
  id = "gpt-4o-mini/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.06"
  output_price_per_mtok = "0.24"
  channels = [{{ channel = "relay-a", upstream_model = "up-relay-a" }},
              {{ channel = "relay-b", upstream_model = "up-relay-b" }}]
  retry = {{ max_attempts = 3, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}
  on_failure = "charge_delivered"

[[models]]
id = "flaky-chain"
max_output_tokens = 1000

  [[models.routes]]
  id = "flaky-chain/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.06"
  output_price_per_mtok = "0.24"
  channels = [{{ channel = "dead", upstream_model = "up-dead" }},
              {{ channel = "relay-b", upstream_model = "up-chain-b" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}

  [[models.routes]]
  id = "flaky-chain/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.15"
  output_price_per_mtok = "0.60"
  channels = [{{ channel = "official-a", upstream_model = "up-chain-official" }}]

[[models]]
id = "gpt-5-mini"
max_output_tokens = 1000

  [[models.routes]]
  id = "gpt-5-mini/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.25"
  output_price_per_mtok = "2.00"
  cache_read_price_per_mtok = "0.025"
  channels = [{{ channel = "responses-a", upstream_model = "up-responses" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}

  [[models.routes]]
  id = "gpt-5-mini/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.10"
  output_price_per_mtok = "0.80"
  channels = [{{ channel = "relay-a", upstream_model = "up-responses-relay" }}]

[[models]]
id = "quick-timeout"
max_output_tokens = 100

  [[models.routes]]
  id = "quick-timeout/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.15"
  output_price_per_mtok = "0.60"
  channels = [{{ channel = "official-quick", upstream_model = "up-quick" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}

[[models]]
id = "timeout-chain"
max_output_tokens = 100

  [[models.routes]]
  id = "timeout-chain/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.06"
  output_price_per_mtok = "0.24"
  channels = [{{ channel = "official-quick", upstream_model = "up-tc-quick" }},
              {{ channel = "relay-b", upstream_model = "up-tc-b" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}

[[models]]
id = "meta/llama-3:8b"
max_output_tokens = 100

  [[models.routes]]
  id = "meta/llama-3:8b/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.05"
  output_price_per_mtok = "0.05"
  channels = [{{ channel = "relay-b", upstream_model = "up-llama" }}]

[[models]]
id = "one-at-a-time"
max_output_tokens = 100

  [[models.routes]]
  id = "one-at-a-time/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.06"
  output_price_per_mtok = "0.24"
  channels = [{{ channel = "single-slot", upstream_model = "up-single" }}]

[[models]]
id = "fine-price"
max_output_tokens = 100

  [[models.routes]]
  id = "fine-price/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.0015"
  output_price_per_mtok = "0.0025"
  channels = [{{ channel = "official-a", upstream_model = "up-fine" }}]

[[models]]
id = "embed-small"
type = "embedding"
max_output_tokens = 1

  [[models.routes]]
  id = "embed-small/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.02"
  output_price_per_mtok = "0"
  channels = [{{ channel = "official-a", upstream_model = "up-embed" }}]

  [[models.routes]]
  id = "embed-small/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.01"
  output_price_per_mtok = "0"
  channels = [{{ channel = "relay-b", upstream_model = "up-embed-routed" }}]

[[models]]
id = "claude-test"
max_output_tokens = 1000

  [[models.routes]]
  id = "claude-test/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "3.00"
  output_price_per_mtok = "15.00"
  channels = [{{ channel = "anthropic-a", upstream_model = "up-claude" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}

  [[models.routes]]
  id = "claude-test/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "1.50"
  output_price_per_mtok = "7.50"
  channels = [{{ channel = "relay-a", upstream_model = "up-claude-relay" }},
              {{ channel = "anthropic-a", upstream_model = "up-claude-b" }}]
  retry = {{ max_attempts = 3, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 1 }}
  on_failure = "charge_delivered"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_catalog(path: Path, mock_url: str, *, timeout_s: float = 5) -> Path:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused
    path.write_text(CATALOG.format(mock=mock_url, dead=dead, timeout_s=timeout_s), encoding="utf-8")
    return path


@dataclass
class Mock:
    url: str
    session: aiohttp.ClientSession

    async def faults(self, default: dict[str, Any] | None = None, **per_model: dict[str, Any]) -> None:
        async with self.session.post(self.url.removesuffix("/v1") + "/_mock/faults",
                                     json={"default": default or {}, "per_model": per_model}) as r:
            assert r.status == 200, await r.text()

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(self.url.removesuffix("/v1") + "/_mock/stats") as r:
            return dict(await r.json())

    async def reset(self) -> None:
        await self.faults()
        async with self.session.post(self.url.removesuffix("/v1") + "/_mock/reset") as r:
            assert r.status == 200


@dataclass
class Gw:
    """One running gateway and helpers to drive it like a customer and an operator would."""

    url: str
    dsn: str
    gateway: Gateway
    mock: Mock
    session: aiohttp.ClientSession
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def catalog(self) -> Catalog:
        return self.gateway.catalog

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, data=orjson.dumps(body) if body is not None else None,
                                        headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            return r.status, await r.json()

    async def get(self, path: str, key: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path, headers={"authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()

    async def post(self, path: str, key: str, body: Any, headers: dict[str, str] | None = None
                   ) -> tuple[int, Any, dict[str, str]]:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        async with self.session.post(self.url + path, data=raw, headers={
                "authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})}) as r:
            return r.status, await r.json(), dict(r.headers)

    async def account(self, credit: int = 0, routed: int = 0, *, policy: dict[str, Any] | None = None,
                      project_policy: dict[str, Any] | None = None) -> tuple[str, str]:
        """A new funded account with one key; returns (account id, key)."""
        status, account = await self.admin("POST", "/admin/accounts", {"name": "test"})
        assert status == 201, account
        project_id = None
        if project_policy is not None:
            status, project = await self.admin("POST", f"/admin/accounts/{account['id']}/projects",
                                               {"name": "p", "policy": project_policy})
            assert status == 201, project
            project_id = project["id"]
        for bucket, amount in (("credit", credit), ("routed", routed)):
            if amount:
                status, entry = await self.admin("POST", f"/admin/accounts/{account['id']}/topups", {
                    "bucket": bucket, "amount_nanos": amount, "idempotency_key": f"fund-{bucket}"})
                assert status == 201, entry
        status, key = await self.admin("POST", f"/admin/accounts/{account['id']}/keys",
                                       {"name": "k", "project_id": project_id, "policy": policy or {}})
        assert status == 201, key
        return account["id"], key["key"]

    async def balances(self, key: str) -> dict[str, dict[str, int]]:
        status, body = await self.get("/v1/balance", key)
        assert status == 200, body
        return {b["bucket"]: b for b in body["buckets"]}

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        async with self.session.get(self.url + "/metrics") as r:
            text = await r.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def counter(self, name: str, **labels: str) -> float:
        samples = await self.metrics()
        return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))

    def route_charge(self, route_id: str, prompt_tokens: int, completion_tokens: int) -> int:
        """What the catalog's Decimal prices of `route_id` charge for these tokens (SPEC §1 money)."""
        route = self.catalog.routes[route_id]
        return charge_nanos(prompt_tokens, completion_tokens, route.input_price, route.output_price)

    def usage_charge(self, route_id: str, usage: dict[str, int]) -> int:
        """What a receipt's usage costs over its token classes at the catalog's Decimal prices (SPEC §1)."""
        route = self.catalog.routes[route_id]
        reads, writes, writes_1h = (usage.get(k, 0) for k in ("cache_read_tokens", "cache_write_tokens",
                                                              "cache_write_1h_tokens"))
        fresh = usage["prompt_tokens"] - reads - writes - writes_1h
        return classes_charge_nanos(((fresh, route.input_price), (reads, route.cache_read_price),
                                     (writes, route.cache_write_price), (writes_1h, route.cache_write_1h_price),
                                     (usage["completion_tokens"], route.output_price)))

    async def ledger_entry(self, key: str, entry_id: str) -> dict[str, Any]:
        """One ledger entry of the key's account, as GET /v1/ledger shows it (fails if it is not there)."""
        status, page = await self.get("/v1/ledger?limit=100", key)
        assert status == 200, page
        entries = {e["id"]: e for e in page["data"]}
        assert entry_id in entries, f"ledger entry {entry_id} is not in the ledger: {list(entries)}"
        return dict(entries[entry_id])

    async def assert_billed(self, key: str, receipt: dict[str, Any], answer_id: str | None = None) -> int:
        """A succeeded request's receipt tells the truth: charge = usage × the route's catalog prices, its
        ledger entry holds exactly that, and /v1/receipts/{answer id} is the same receipt. The charge."""
        assert receipt["status"] == "succeeded", receipt
        usage = receipt["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        charge = self.usage_charge(receipt["route"]["id"], usage)
        assert receipt["charge_nanos"] == charge > 0 and receipt["charge_nanos"] <= receipt["reserved_nanos"]
        entry = await self.ledger_entry(key, receipt["ledger_entry_id"])
        assert entry["kind"] == "charge" and entry["amount_nanos"] == -charge, entry
        assert entry["request_id"] == receipt["request_id"] and entry["bucket"] == receipt["bucket"]
        assert entry["balance_after_nanos"] == receipt["balance_after_nanos"]
        for lookup in {receipt["request_id"], answer_id or receipt["request_id"]}:
            status, stored = await self.get(f"/v1/receipts/{lookup}", key)
            assert status == 200, stored
            assert stored["request_id"] == receipt["request_id"] and stored["charge_nanos"] == charge
            assert stored["ledger_entry_id"] == receipt["ledger_entry_id"]
        return charge

    def client(self, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)
        self.clients.append(client)
        return client


async def start_mock(config: MockConfig | None = None):  # type: ignore[no-untyped-def]
    sock = listening_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    return running(create_mock_app(config or MockConfig(api_key=UPSTREAM_SECRET)), sock), url


def gateway_settings(catalog_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        config_path=catalog_path, admin_token=ADMIN_TOKEN, port=0, sweep_interval_s=0.2,
        channel_env={"TF_TEST_UPSTREAM_KEY": UPSTREAM_SECRET})
    values.update(overrides)
    return Settings(**values)


async def start_gateway(settings: Settings, dsn: str):  # type: ignore[no-untyped-def]
    """(context manager, url, app) for a gateway serving on a free loopback port."""
    catalog = load_catalog(settings.config_path) if settings.config_path else None
    assert catalog is not None
    app = create_app(settings, catalog, dsn)
    sock = listening_socket("127.0.0.1", 0)
    return running(app, sock), f"http://127.0.0.1:{sock.getsockname()[1]}", app


def gateway_of(app: Any) -> Gateway:
    return app[GATEWAY]  # type: ignore[no-any-return]
