"""Chaos soak with exact reconciliation (issue 8): money must add up whatever crashes.

Two `tokensforge serve` processes share a throwaway PostgreSQL; a simulated upstream injects ~20 % faults
(5xx, timeouts, cut streams, malformed JSON). A bounded set of clients (the official openai SDK, and raw
aiohttp for clients that leave mid-stream) sends mixed traffic while one gateway is SIGKILLed and
restarted and PostgreSQL is stopped with `-m immediate` and started again. Then, once the sweepers have
resolved every reservation, the database is reconciled against what the clients were shown.

    python -m tests.chaos --duration 180      # `make chaos`; exits 1 if any check fails (drift ≠ 0 included)

tests/test_chaos.py runs a short version in the normal suite.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson

from tokensforge.db import migrate
from tokensforge.embedded_pg import DATABASE, EmbeddedPostgres

from .harness import ADMIN_TOKEN, start_mock
from .invariants import assert_ledger_invariants
from .procs import GatewayProcess, crash_postgres

# One public model per fault kind, all on the same three channels, so the circuit breakers see the mix
# (≈ 20 % of upstream attempts fail) rather than a channel that always fails.
CATALOG = """
[[buckets]]
id = "credit"
name = "Official Credit"

[[buckets]]
id = "routed"
name = "Routed balance"
{channels}
{models}
"""
CHANNEL = """
[[channels]]
id = "{id}"
base_url = "{mock}"
api_key_env = "TF_TEST_UPSTREAM_KEY"
timeout_s = 3
connect_timeout_s = 1
first_byte_timeout_s = 0.7
"""
MODEL = """
[[models]]
id = "{model}"
max_output_tokens = 64

  [[models.routes]]
  id = "{model}/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.15"
  output_price_per_mtok = "0.60"
  channels = [{{ channel = "official-a", upstream_model = "{up}-off" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 5 }}
  on_failure = "free"

  [[models.routes]]
  id = "{model}/routed"
  kind = "routed"
  bucket = "routed"
  input_price_per_mtok = "0.06"
  output_price_per_mtok = "0.24"
  channels = [{{ channel = "relay-a", upstream_model = "{up}-ra" }},
              {{ channel = "relay-b", upstream_model = "{up}-rb" }}]
  retry = {{ max_attempts = 3, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 5 }}
  on_failure = "charge_delivered"
"""
CHUNK_DELAY_MS = 15  # streams last ~0.1–0.4 s, so kills and disconnects land mid-stream
# public model → (share of the traffic, faults of its upstream models)
MODELS: dict[str, tuple[float, dict[str, Any]]] = {
    "chaos-mini": (0.88, {}),  # healthy, except the 5xx rates below
    "chaos-cut": (0.05, {"cut_after_chunks": 3}),  # streams only; a unary answer is whole
    "chaos-hang": (0.03, {"hang": True}),  # → first-byte timeouts
    "chaos-bad": (0.04, {"malformed_json": True}),
}
FIVE_XX = {"chaos-mini-off": {"error_status": 500, "error_rate": 0.08},
           "chaos-mini-ra": {"error_status": 502, "error_rate": 0.12}}
MESSAGES = [{"role": "user", "content": "chaos soak: say something short"}]
RICH, POOR = 10**10, 300_000  # nano-USD per bucket; the poor account runs dry and meets 402s
CYCLE_S = 45  # one gateway kill and one database crash per this much load


def catalog_text(mock_url: str) -> str:
    channels = "".join(CHANNEL.format(id=c, mock=mock_url) for c in ("official-a", "relay-a", "relay-b"))
    models = "".join(MODEL.format(model=m, up=m) for m in MODELS)
    return CATALOG.format(channels=channels, models=models)


def mock_faults() -> dict[str, dict[str, Any]]:
    per_model: dict[str, dict[str, Any]] = {}
    for model, (_, faults) in MODELS.items():
        for suffix in ("off", "ra", "rb"):
            name = f"{model}-{suffix}"
            per_model[name] = {"chunk_delay_ms": CHUNK_DELAY_MS, **faults, **FIVE_XX.get(name, {})}
    return per_model


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 15.0
    clients: int = 8
    accounts: int = 3  # plus one poor account
    reservation_ttl_s: float = 3.0
    outage_s: float = 1.5  # PostgreSQL down this long
    seed: int = 8
    request_timeout_s: float = 20.0


@dataclass
class Outcome:
    """What one client request saw."""

    kind: str  # unary | stream | leave (raw aiohttp, disconnects mid-stream) | probe (on a gateway about to die)
    model: str
    pin: str | None
    account: int
    started: float
    finished: float = 0.0
    status: int | None = None  # HTTP status; None: no answer (connection refused or cut)
    request_id: str | None = None
    error_code: str | None = None
    ending: str = ""  # how a stream ended: done, error:<code>, cut, left, …
    receipt: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        status = "no answer" if self.status is None else str(self.status)
        code = f" {self.error_code}" if self.error_code and self.status != 200 else ""
        ending = f" → {self.ending}" if self.ending else ""
        return f"{self.kind:6} {status}{code}{ending}"

    @property
    def succeeded(self) -> bool:
        return self.status == 200 and self.receipt is not None and self.receipt.get("status") == "succeeded"


@dataclass
class Account:
    id: str
    key: str
    funded: dict[str, int]


@dataclass
class Report:
    config: SoakConfig
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    recovery_s: list[float | None] = field(default_factory=list)
    upstream_attempts: dict[str, int] = field(default_factory=dict)  # per upstream model (mock stats)
    charged_nanos: int = 0
    shown_charged_nanos: int = 0
    drift_nanos: dict[str, int] = field(default_factory=dict)
    checks: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.checks.values())

    def failures(self) -> list[str]:
        return [f"{name}: {len(v)} violation(s), e.g. {v[:3]}" for name, v in self.checks.items() if v]

    def fault_line(self) -> str:
        """Upstream attempts and the share that met a fault (5xx counted by their injected rate)."""
        total = sum(self.upstream_attempts.values())
        faulted = sum(n for m, n in self.upstream_attempts.items() if not m.startswith("chaos-mini-"))
        faulted_5xx = sum(self.upstream_attempts.get(m, 0) * f["error_rate"] for m, f in FIVE_XX.items())
        share = (faulted + faulted_5xx) / total if total else 0.0
        return (f"upstream attempts (retries included): {total}; on fault-injecting models (cut streams, "
                f"hangs, malformed JSON): {faulted}; injected 5xx ≈{faulted_5xx:.0f}; ≈{share:.0%} of attempts")

    def text(self) -> str:
        c = self.config
        lines = [f"chaos soak: {c.duration_s:g} s, {c.clients} clients, {c.accounts + 1} accounts, "
                 f"2 gateways, reservation TTL {c.reservation_ttl_s:g} s, seed {c.seed}",
                 *(f"  event {e}" for e in self.events),
                 f"requests sent: {len(self.outcomes)}", self.fault_line(),
                 "outcomes (kind, HTTP status, stream ending):"]
        for label, n in sorted(Counter(o.label for o in self.outcomes).items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:6}  {label}")
        recovery = ", ".join("never" if r is None else f"{r:.2f} s" for r in self.recovery_s)
        lines += [f"charged total: {self.charged_nanos} nano-USD in the ledger "
                  f"({self.shown_charged_nanos} shown on receipts)",
                  f"recovery after the database restart (first successful request): {recovery}",
                  "drift (funded − charges − balance) per account: "
                  + ", ".join(f"{a[-8:]}={d}" for a, d in self.drift_nanos.items()),
                  f"drift total: {sum(abs(d) for d in self.drift_nanos.values())} nano-USD"]
        for name, violations in self.checks.items():
            lines.append(f"check {name}: {'ok' if not violations else f'FAILED ({len(violations)})'}")
            lines += [f"    {v}" for v in violations[:10]]
        return "\n".join(lines)


# --------------------------------------------------------------------------- traffic


class Traffic:
    """A bounded set of clients sending mixed requests until `stop` is set."""

    def __init__(self, config: SoakConfig, accounts: list[Account], urls: list[str]) -> None:
        self.config = config
        self.accounts = accounts
        self.urls = urls  # gateways currently in rotation (the chaos task swaps a restarted one in)
        self.rng = random.Random(config.seed)
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()
        self._sdk: dict[tuple[str, str], openai.AsyncOpenAI] = {}

    async def run(self, session: aiohttp.ClientSession) -> None:
        try:
            await asyncio.gather(*(self._client(session) for _ in range(self.config.clients)))
        finally:
            for client in self._sdk.values():
                await client.close()

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            outcome = await self._one(session)
            self.outcomes.append(outcome)
            if outcome.status is None or outcome.status >= 500:
                await asyncio.sleep(0.02)  # a dead gateway or ledger refuses at once: back off a little

    def _choose(self) -> tuple[str, Account, Outcome, dict[str, Any]]:
        rng = self.rng
        model = rng.choices(list(MODELS), weights=[share for share, _ in MODELS.values()])[0]
        pin = rng.choice(["official", "routed", "official", "routed", None])
        poor = len(self.accounts) - 1  # the last account is the poor one: a tenth of the traffic
        index = poor if rng.random() < 0.1 else rng.randrange(poor)
        kind = rng.choices(["unary", "stream", "leave"], weights=[40, 40, 20])[0]
        body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": rng.randint(4, 24)}
        outcome = Outcome(kind, model, pin, index, time.monotonic())
        return rng.choice(self.urls), self.accounts[index], outcome, body

    async def _one(self, session: aiohttp.ClientSession) -> Outcome:
        url, account, outcome, body = self._choose()
        headers = {"x-tokensforge-route": outcome.pin} if outcome.pin else {}
        try:
            if outcome.kind == "leave":
                await self._leave(session, url, account, outcome, body, headers)
            else:
                await self._sdk_call(self._client_for(url, account), outcome, body, headers)
        finally:
            outcome.finished = time.monotonic()
        return outcome

    async def stream_in_flight(self, session: aiohttp.ClientSession, url: str) -> asyncio.Task[None]:
        """A slow stream on `url` that has delivered content; the returned task records how it ends."""
        delivering = asyncio.Event()
        account = self.accounts[0]

        async def probe() -> None:
            for _ in range(10):  # the upstream's injected 5xx may refuse a try
                o = Outcome("probe", "chaos-mini", "official", 0, time.monotonic())
                body = {"model": o.model, "messages": MESSAGES, "max_tokens": 60}
                await self._leave(session, url, account, o, body, {"x-tokensforge-route": "official"},
                                  after=10**6, delivering=delivering)
                o.finished = time.monotonic()
                self.outcomes.append(o)
                if delivering.is_set():
                    return
            delivering.set()  # give up waiting: kill anyway

        task = asyncio.create_task(probe())
        try:
            await asyncio.wait_for(delivering.wait(), timeout=30)
        except BaseException:
            task.cancel()
            raise
        return task

    def _client_for(self, url: str, account: Account) -> openai.AsyncOpenAI:
        client = self._sdk.get((url, account.key))
        if client is None:
            client = self._sdk[(url, account.key)] = openai.AsyncOpenAI(
                base_url=url + "/v1", api_key=account.key, max_retries=0, timeout=self.config.request_timeout_s)
        return client

    async def _sdk_call(self, client: openai.AsyncOpenAI, o: Outcome, body: dict[str, Any],
                        headers: dict[str, str]) -> None:
        try:
            if o.kind == "unary":
                raw = await client.chat.completions.with_raw_response.create(**body, extra_headers=headers)
                o.status, o.request_id = raw.status_code, raw.headers.get("x-request-id")
                o.receipt = (raw.parse().model_extra or {}).get("receipt")
                return
            o.ending = "open"
            stream = await client.chat.completions.create(**body, stream=True, extra_headers=headers,
                                                          stream_options={"include_usage": True})
            o.status, o.request_id, o.ending = stream.response.status_code, stream.response.headers.get(
                "x-request-id"), "no [DONE]"
            async for chunk in stream:
                if not chunk.choices and chunk.model_extra and "receipt" in chunk.model_extra:
                    o.receipt = chunk.model_extra["receipt"]
            o.ending = "done" if o.receipt is not None else "done without receipt"
        except openai.APIStatusError as exc:
            o.status, o.request_id, o.ending = exc.status_code, exc.response.headers.get("x-request-id"), ""
            o.error_code = _error_code(exc.body)
        except openai.APIConnectionError as exc:  # refused, or the answer was cut (a killed gateway)
            o.ending = "timeout" if isinstance(exc, openai.APITimeoutError) else "cut"
        except openai.APIError as exc:  # the SDK raises this on a `data: {"error": …}` event
            o.error_code = _error_code(exc.body)
            o.ending = f"error:{o.error_code}"

    async def _leave(self, session: aiohttp.ClientSession, url: str, account: Account, o: Outcome,
                     body: dict[str, Any], headers: dict[str, str], *, after: int | None = None,
                     delivering: asyncio.Event | None = None) -> None:
        """Raw SSE: read `after` content chunks (0: only the headers), then drop the connection."""
        after = self.rng.randint(0, 3) if after is None else after
        payload = orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        try:
            async with session.post(url + "/v1/chat/completions", data=payload, timeout=timeout, headers={
                    "authorization": f"Bearer {account.key}", "content-type": "application/json", **headers}) as r:
                o.status, o.request_id = r.status, r.headers.get("x-request-id")
                if r.status != 200:
                    o.error_code = _error_code(_json_or_none(await r.read()))
                    return
                o.ending = await _read_then_leave(r, o, after, delivering)
                r.close()
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            o.ending = "timeout" if isinstance(exc, TimeoutError) else "cut"


async def _read_then_leave(r: aiohttp.ClientResponse, o: Outcome, after: int,
                           delivering: asyncio.Event | None = None) -> str:
    """How the stream ended for a client that meant to leave after `after` content chunks."""
    if after == 0:
        return "left before content"
    content_chunks = 0
    async for line in r.content:
        if not line.startswith(b"data:"):
            continue
        if line[5:].strip() == b"[DONE]":
            return "done" if o.receipt is not None else "done without receipt"
        event = _json_or_none(line[5:])
        if not isinstance(event, dict):
            continue
        if "error" in event:
            o.error_code = _error_code(event)
            return f"error:{o.error_code}"
        if "receipt" in event:
            o.receipt = event["receipt"]
        if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
            content_chunks += 1
            if delivering is not None:
                delivering.set()
            if content_chunks >= after:
                return f"left after {after} chunk(s)"
    return "cut"


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _error_code(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("code") or error.get("type") or "unknown")
    return None


# --------------------------------------------------------------------------- the soak


class Soak:
    """Owns every process of one run; `close()` stops them all, whatever happened."""

    def __init__(self, config: SoakConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.cluster = EmbeddedPostgres.throwaway()
        self.gateways: list[GatewayProcess] = []
        self.report = Report(config)
        self.catalog = workdir / "catalog.toml"
        self.dsn = ""

    def gateway(self, name: str) -> GatewayProcess:
        env = {"TOKENSFORGE_RESERVATION_TTL_S": str(self.config.reservation_ttl_s),
               "TOKENSFORGE_LEASE_TTL_S": str(self.config.reservation_ttl_s),
               "TOKENSFORGE_SWEEP_INTERVAL_S": "0.2", "TOKENSFORGE_BREAKER_COOLDOWN_S": "1",
               # a lost stream's trace waits this long after its lease ended before it is recorded (SPEC §5.9)
               "TOKENSFORGE_TRACE_GRACE_S": str(self.config.reservation_ttl_s)}
        gw = GatewayProcess(self.catalog, dsn=self.dsn, env=env, log_path=self.workdir / f"gateway-{name}.log")
        self.gateways.append(gw)
        return gw

    async def start_database(self) -> None:
        self.dsn = await asyncio.to_thread(self.cluster.start)
        conn = await asyncpg.connect(self.dsn)
        try:
            # The throwaway cluster runs with synchronous_commit=off; an immediate stop would then lose
            # commits a client was already told about. Durable commits for this database keep the check
            # "every shown receipt is in the ledger" about the gateway, not about the test cluster.
            await conn.execute(f"ALTER DATABASE {DATABASE} SET synchronous_commit = on")
        finally:
            await conn.close()
        await migrate(self.dsn)

    def close(self) -> None:
        try:
            for gw in self.gateways:
                gw.stop(signal.SIGTERM, timeout_s=10)  # falls back to SIGKILL
        finally:
            self.cluster.close()

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for gw in self.gateways:
            tail = "\n".join(gw.log().splitlines()[-lines:])
            out.append(f"--- {gw.log_path.name}\n{tail}")
        return "\n".join(out)


async def run_soak(config: SoakConfig, workdir: Path | None = None) -> Report:
    """Run the soak; all processes are stopped before this returns or raises."""
    own_dir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="tokensforge-chaos-"))
    soak = Soak(config, workdir)
    try:
        await soak.start_database()
        mock_ctx, mock_url = await start_mock()
        async with mock_ctx, aiohttp.ClientSession() as session:
            async with session.post(mock_url.removesuffix("/v1") + "/_mock/faults",
                                    json={"default": {}, "per_model": mock_faults()}) as r:
                assert r.status == 200, await r.text()
            soak.catalog.write_text(catalog_text(mock_url), encoding="utf-8")
            a, b = soak.gateway("a"), soak.gateway("b")
            await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
            accounts = await _accounts(session, a.url, config)
            traffic = Traffic(config, accounts, [a.url, b.url])
            load = asyncio.create_task(traffic.run(session))
            try:
                await _chaos(soak, traffic, session)
            finally:
                traffic.stop.set()
                await load
            soak.report.outcomes = traffic.outcomes
            soak.report.upstream_attempts = await _upstream_attempts(session, mock_url)
            await _reconcile(soak, accounts)
            soak.report.checks["GET /v1/receipts/{id} agrees with the books"] = await _receipts_endpoint(
                session, traffic.urls[0], soak, accounts)
        return soak.report
    except BaseException:
        print(soak.logs_tail(), file=sys.stderr)
        raise
    finally:
        soak.close()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


async def _accounts(session: aiohttp.ClientSession, url: str, config: SoakConfig) -> list[Account]:
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}

    async def admin(path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with session.post(url + path, json=body, headers=headers) as r:
            assert r.status == 201, await r.text()
            return dict(await r.json())

    accounts = []
    for i in range(config.accounts + 1):
        amount = POOR if i == config.accounts else RICH
        account = await admin("/admin/accounts", {"name": f"chaos-{i}"})
        for bucket in ("credit", "routed"):
            await admin(f"/admin/accounts/{account['id']}/topups", {
                "bucket": bucket, "amount_nanos": amount, "idempotency_key": f"chaos-{bucket}"})
        key = await admin(f"/admin/accounts/{account['id']}/keys", {"name": "chaos", "policy": {}})
        accounts.append(Account(account["id"], key["key"], {"credit": amount, "routed": amount}))
    return accounts


async def _chaos(soak: Soak, traffic: Traffic, session: aiohttp.ClientSession) -> None:
    """The schedule, once per cycle (one cycle per ~45 s of load): SIGKILL a gateway at 20 % of the cycle and
    restart it (the two take turns), crash PostgreSQL at 50 %, then let the load run on."""
    config, report = soak.config, soak.report
    t0 = time.monotonic()
    cycles = max(1, round(config.duration_s / CYCLE_S))
    span_s = config.duration_s / cycles
    slots = list(soak.gateways)

    async def until(t: float) -> None:
        await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))

    def event(what: str) -> None:
        report.events.append(f"t={time.monotonic() - t0:6.1f} s  {what}")

    for cycle in range(cycles):
        start, slot = cycle * span_s, cycle % 2
        await until(start + 0.2 * span_s)
        victim = slots[slot]
        probe = await traffic.stream_in_flight(session, victim.url)  # the kill always lands mid-stream
        victim.stop(signal.SIGKILL)
        traffic.urls.remove(victim.url)
        await probe
        event(f"gateway {_name(victim)} SIGKILLed")
        await asyncio.sleep(0.5)
        slots[slot] = soak.gateway(f"{'ab'[slot]}{cycle + 2}")
        await asyncio.to_thread(slots[slot].wait_ready)
        traffic.urls.append(slots[slot].url)
        event(f"gateway {_name(slots[slot])} started in its place and ready")
        await until(start + 0.5 * span_s)
        await asyncio.to_thread(crash_postgres, soak.cluster)
        event("PostgreSQL stopped (pg_ctl stop -m immediate)")
        await asyncio.sleep(config.outage_s)
        await asyncio.to_thread(soak.cluster.start)
        back = time.monotonic()
        event("PostgreSQL started again (crash recovery done)")
        await until(start + span_s)
        report.recovery_s.append(await _recovery_s(traffic, back))


async def _recovery_s(traffic: Traffic, back: float, patience_s: float = 15) -> float | None:
    """Seconds from the database's return to the first successful request; waits (load running) if none yet."""
    deadline = time.monotonic() + patience_s
    while True:
        firsts = [o.finished for o in traffic.outcomes if o.succeeded and o.finished >= back]
        if firsts or time.monotonic() > deadline:
            return min(firsts) - back if firsts else None
        await asyncio.sleep(0.1)


def _name(gw: GatewayProcess) -> str:
    return gw.log_path.stem.removeprefix("gateway-")


async def _upstream_attempts(session: aiohttp.ClientSession, mock_url: str) -> dict[str, int]:
    async with session.get(mock_url.removesuffix("/v1") + "/_mock/stats") as r:
        return dict((await r.json())["by_model"])


# --------------------------------------------------------------------------- reconciliation


async def _reconcile(soak: Soak, accounts: list[Account]) -> None:
    """Wait until every reservation is resolved (past the TTL: sweepers ran), then check the books."""
    conn = await asyncpg.connect(soak.dsn)
    try:
        await asyncio.sleep(soak.config.reservation_ttl_s)
        deadline = time.monotonic() + soak.config.reservation_ttl_s + 10
        while await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'") and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + soak.config.reservation_ttl_s + 10  # lost streams' traces: recorded
        while await conn.fetchval("SELECT count(*) FROM stream_traces") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        books = await Books.load(conn)
        report = soak.report
        report.checks["receipts shown are in the ledger (SPEC §5.7)"] = books.shown_receipts(report.outcomes)
        report.checks["no error answer (5xx, or any 4xx) has a charge"] = books.no_charge_on_errors(report.outcomes)
        report.checks["every answered request has one usage record"] = books.usage_records(report.outcomes)
        report.checks["balance = Σ ledger, reserved = 0, nothing open"] = books.balances()
        report.checks["one charge per request id, each with its usage record"] = books.charges()
        report.checks["every completed answer carried its receipt"] = _receipts_present(report.outcomes)
        report.checks["charges within policy (≤ reservation; failed on a free route: 0)"] = [
            f"{dict(r)}" for r in await conn.fetch("""
                SELECT request_id, status, route_id, reserved_nanos, charge_nanos FROM usage_records
                WHERE charge_nanos > reserved_nanos
                   OR (status = 'failed' AND charge_nanos > 0 AND receipt->>'on_failure' = 'free')""")]
        report.checks["drift = 0 (funded − charges − balance)"] = books.drift(report, accounts)
        try:
            await assert_ledger_invariants(conn)
            report.checks["SPEC §5 ledger invariants (tests/invariants.py)"] = []
        except AssertionError as exc:
            report.checks["SPEC §5 ledger invariants (tests/invariants.py)"] = [str(exc)[:2000]]
    finally:
        await conn.close()


async def _receipts_endpoint(session: aiohttp.ClientSession, url: str, soak: Soak,
                             accounts: list[Account]) -> list[str]:
    """A sample of finished requests (every delayed or cut stream, every 20th other answer) read back from
    GET /v1/receipts/{id}: the same charge and ledger entry as the usage record."""
    conn = await asyncpg.connect(soak.dsn)
    try:
        usage = {r["request_id"]: r for r in await conn.fetch(
            "SELECT request_id, charge_nanos, ledger_entry_id FROM usage_records")}
    finally:
        await conn.close()
    sample = [o for i, o in enumerate(soak.report.outcomes) if o.request_id in usage
              and (i % 20 == 0 or o.ending in ("cut", "timeout", "error:ledger_unavailable"))]
    bad = []
    for o in sample:
        async with session.get(f"{url}/v1/receipts/{o.request_id}",
                               headers={"authorization": f"Bearer {accounts[o.account].key}"}) as r:
            body = _json_or_none(await r.read())
        row = usage[o.request_id]
        if r.status != 200 or not isinstance(body, dict) or (body.get("charge_nanos"), body.get(
                "ledger_entry_id")) != (row["charge_nanos"], row["ledger_entry_id"]):
            bad.append(f"{o.label} {o.request_id}: GET /v1/receipts answered {r.status} {str(body)[:200]}, "
                       f"usage record {dict(row)}")
    return bad


def _receipts_present(outcomes: list[Outcome]) -> list[str]:
    """A unary 200 has `receipt` in its body; a stream that reached [DONE] with include_usage has it on
    the usage chunk."""
    return [f"{o.kind} {o.model} pin={o.pin} {o.request_id}: {o.label} without a receipt" for o in outcomes
            if o.receipt is None and ((o.kind == "unary" and o.status == 200) or o.ending == "done without receipt")]


@dataclass
class Books:
    """The database's side of the story, read once after the soak."""

    usage: dict[str, asyncpg.Record]
    charges_by_request: dict[str, list[asyncpg.Record]]
    entries: dict[str, asyncpg.Record]
    buckets: list[asyncpg.Record]
    open_reservations: int
    other_kinds: list[asyncpg.Record]
    reserved_requests: set[str] = field(default_factory=set)  # requests that held a reservation row of their own

    @classmethod
    async def load(cls, conn: asyncpg.Connection) -> Books:
        usage = {r["request_id"]: r for r in await conn.fetch(
            "SELECT request_id, status, charge_nanos, ledger_entry_id FROM usage_records")}
        charges: dict[str, list[asyncpg.Record]] = {}
        entries = {}
        for r in await conn.fetch("SELECT id, account_id, bucket, kind, amount_nanos, balance_after_nanos, "
                                  "request_id FROM ledger_entries"):
            entries[r["id"]] = r
            if r["kind"] == "charge":
                charges.setdefault(r["request_id"], []).append(r)
        buckets = await conn.fetch("""
            SELECT b.account_id, b.bucket, b.balance_nanos, b.reserved_nanos, coalesce(sum(l.amount_nanos), 0) AS total
            FROM buckets b LEFT JOIN ledger_entries l USING (account_id, bucket) GROUP BY 1, 2, 3, 4""")
        open_count = await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'")
        other = [r for r in entries.values() if r["kind"] not in ("topup", "charge")]
        reserved = {r["request_id"] for r in await conn.fetch(
            "SELECT request_id FROM reservations WHERE kind = 'request'")}
        return cls(usage, charges, entries, list(buckets), int(open_count), other, reserved)

    def shown_receipts(self, outcomes: list[Outcome]) -> list[str]:
        bad = []
        for o in outcomes:
            r = o.receipt
            if r is None:
                continue
            rid, charge, entry_id = r.get("request_id"), r.get("charge_nanos"), r.get("ledger_entry_id")
            where = f"{o.kind} {o.model} pin={o.pin} {rid}"
            if rid != o.request_id:
                bad.append(f"{where}: receipt request_id ≠ x-request-id {o.request_id}")
            if (charge == 0) != (entry_id is None):
                bad.append(f"{where}: charge {charge} with ledger_entry_id {entry_id}")
            if entry_id is not None:
                entry = self.entries.get(entry_id)
                if entry is None:
                    bad.append(f"{where}: shown ledger entry {entry_id} ({charge} nanos) is not in the ledger")
                elif (entry["kind"] != "charge" or -entry["amount_nanos"] != charge or entry["request_id"] != rid
                      or entry["balance_after_nanos"] != r.get("balance_after_nanos")):
                    bad.append(f"{where}: shown {entry_id} = {charge} nanos, ledger has {dict(entry)}")
            usage = self.usage.get(str(rid))
            if usage is None or usage["charge_nanos"] != charge:
                bad.append(f"{where}: shown charge {charge}, usage record {None if usage is None else dict(usage)}")
        return bad

    def no_charge_on_errors(self, outcomes: list[Outcome]) -> list[str]:
        """SPEC §2: a charged request never answers with a 5xx; §5.6: a 4xx changes no balance."""
        bad = []
        for o in outcomes:
            if o.status is None or o.status < 400:
                continue
            if o.request_id is None:
                bad.append(f"{o.kind} {o.model} pin={o.pin}: {o.status} {o.error_code} without x-request-id")
                continue
            usage, charges = self.usage.get(o.request_id), self.charges_by_request.get(o.request_id, [])
            if charges or (usage is not None and usage["charge_nanos"]):
                bad.append(f"{o.kind} {o.model} pin={o.pin} {o.request_id}: answered {o.status} {o.error_code} "
                           f"but charged {[-c['amount_nanos'] for c in charges]} "
                           f"(usage {None if usage is None else dict(usage)})")
        return bad

    def usage_records(self, outcomes: list[Outcome]) -> list[str]:
        """SPEC §1 and §5.9: one usage record per request, whatever its outcome — except answers the gateway
        gave because the database was down (it cannot record them then). A request cut by its gateway's
        death is recorded by the sweeper: from its reservation row, or, carved from a lease, from the trace
        its stream left as it started (`failed` / `gateway_lost`). No missing record is allowed."""
        return [f"{o.kind} {o.model} pin={o.pin} {o.request_id}: answered {o.status} {o.error_code} "
                f"{o.ending}{' (held a reservation)' if o.request_id in self.reserved_requests else ''},"
                " no usage record"
                for o in outcomes
                if o.request_id is not None and o.error_code != "ledger_unavailable"
                and o.request_id not in self.usage]

    def balances(self) -> list[str]:
        bad = [f"{r['account_id']}/{r['bucket']}: balance {r['balance_nanos']} vs Σ ledger {r['total']}, "
               f"reserved {r['reserved_nanos']}"
               for r in self.buckets if r["balance_nanos"] != r["total"] or r["reserved_nanos"] != 0]
        if self.open_reservations:
            bad.append(f"{self.open_reservations} reservation(s) still open after the TTL")
        return bad

    def charges(self) -> list[str]:
        bad = [f"{rid}: {len(c)} charge entries" for rid, c in self.charges_by_request.items() if len(c) > 1]
        bad += [f"{rid}: charge entry without its usage record" for rid in self.charges_by_request
                if rid not in self.usage]
        bad += [f"unexpected ledger entry {dict(r)}" for r in self.other_kinds]
        return bad

    def drift(self, report: Report, accounts: list[Account]) -> list[str]:
        """funded (what the admin API accepted) − Σ charges (ledger, plus any shown charge the ledger lacks)
        − balance, per account and bucket, in nano-USD."""
        charged: Counter[tuple[str, str]] = Counter()
        for entries in self.charges_by_request.values():
            for e in entries:
                charged[(e["account_id"], e["bucket"])] -= e["amount_nanos"]
        report.charged_nanos = sum(charged.values())
        for o in report.outcomes:
            r = o.receipt
            if r is not None and r.get("charge_nanos"):
                report.shown_charged_nanos += int(r["charge_nanos"])
                if r.get("request_id") not in self.charges_by_request:
                    charged[(r["account_id"], r["bucket"])] += int(r["charge_nanos"])
        balance = {(r["account_id"], r["bucket"]): r["balance_nanos"] for r in self.buckets}
        bad = []
        for account in accounts:
            drift = 0
            for bucket, funded in account.funded.items():
                d = funded - charged[(account.id, bucket)] - balance.get((account.id, bucket), 0)
                drift += d
                if d:
                    bad.append(f"{account.id}/{bucket}: drift {d} nano-USD")
            report.drift_nanos[account.id] = drift
        return bad


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/chaos-latest.txt"))
    args = parser.parse_args(argv)
    config = SoakConfig(duration_s=args.duration, clients=args.clients, seed=args.seed)
    report = asyncio.run(run_soak(config))
    text = report.text()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n", encoding="utf-8")
    if not report.ok:
        print("chaos soak FAILED:\n  " + "\n  ".join(report.failures()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
