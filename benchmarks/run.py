"""Benchmark harness: `python -m benchmarks.run [--quick] [--peer] [--duration S] [--scenarios ...] [--out DIR]`.

One run starts everything it measures on loopback and stops it again:

  throwaway PostgreSQL ─ ledger-only benchmark (LedgerStore.reserve + finish, many tasks)
  mock-upstream (direct target, core 0)        ◄─ wrk (core 1)
  passthrough → mock-upstream (backend, core 1) ◄─ wrk
  gateway     → mock-upstream (backend)         ◄─ wrk
  LiteLLM     → mock-upstream (backend)         ◄─ wrk            (--peer)
  gateway (fresh) → slow mock-upstream          ◄─ N concurrent streams (benchmarks.streams_bench)

Streamed scenarios also get a time-to-first-content-byte run (benchmarks.ttfb_bench), the gateway's
chat-c32 row a twin over 16 accounts, and gateway rows PostgreSQL's commits and CPU per request
(benchmarks.pgstats); the report ends with the issue #17 targets (on a durable PostgreSQL), met or missed.

and writes benchmarks/results/<timestamp>.json, <timestamp>.md and latest.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from tokensforge.embedded_pg import EmbeddedPostgres

from . import peer, pgstats, profile_summary
from .common import (
    BENCH_DIR,
    REPO,
    BenchError,
    Proc,
    cpu_count,
    cpu_model,
    cpu_seconds,
    durable_throwaway,
    ensure_py_spy,
    ensure_wrk,
    free_port,
    http_json,
    os_name,
    pin_plan,
    pkg_version,
    postgres_version,
    raise_nofile,
    run_capture,
    run_capture_probed,
    set_affinity_tree,
    status_kb,
    tcp_ext_counter,
    wrk_version,
)

ADMIN_TOKEN = "adm-bench-" + os.urandom(8).hex()
UPSTREAM_KEY = "sk-bench-upstream"
FUND_NANOS = 10**15
WRK_DIR = BENCH_DIR / "wrk"

STREAMS_TARGET = 9000
STREAMS_PER_S = 300  # the many-streams test's arrival rate
STREAMS_RAMP_MAX_S = 30.0
STREAM_FD_MARGIN = 500  # the gateway's own descriptors besides two per stream
SPREAD_SCENARIO = "chat-c32"  # the scenario the hot-account comparison repeats
PROFILED = {"chat-c32": "profile", "stream-c32": "profile_stream"}  # scenario -> results key
NON_DURABLE_SCENARIOS = ("chat-c4", "chat-c32")
ALL_SCENARIOS = ("chat-c4", "chat-c32", "chat-c128", "stream-c4", "stream-c32", "stream-c128")
QUICK_SCENARIOS = ("chat-c4", "chat-c32", "stream-c4", "stream-c32")
#: on request only: one request at a time, so what the gateway adds is not queued behind other requests
#: (at c=4 a request also waits for the CPU the other three use) — the latency a single caller sees
SOLO_SCENARIOS = ("chat-c1", "stream-c1")
BASE_TARGETS = ("direct", "passthrough", "gateway")
TRACING_SCENARIOS = ("chat-c32", "stream-c32")
#: an OTLP/HTTP traces endpoint that takes every export and drops it (the cost measured is the gateway's)
OTLP_SINK = """
import sys
from aiohttp import web
async def sink(request):
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")
app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/v1/traces", sink)
app.router.add_get("/healthz", lambda request: web.Response(text="ok"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

CHAT_BODY = {"model": "gpt-4o-mini", "max_tokens": 20,
             "messages": [{"role": "user", "content": "Say something short about benchmarks."}]}
STREAM_BODY = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}

CATALOG = """# written by benchmarks/run.py: one model, one route, one channel to the simulated upstream
[[buckets]]
id = "credit"
name = "Official Credit"

[[buckets]]
id = "routed"
name = "Routed balance"

[[channels]]
id = "mock"
base_url = "{upstream}/v1"
api_key_env = "TF_BENCH_UPSTREAM_KEY"
timeout_s = 300
connect_timeout_s = 10
max_concurrency = 100000

[[models]]
id = "gpt-4o-mini"
max_output_tokens = 1000

  [[models.routes]]
  id = "gpt-4o-mini/official"
  kind = "official"
  bucket = "credit"
  input_price_per_mtok = "0.15"
  output_price_per_mtok = "0.60"
  channels = [{{ channel = "mock", upstream_model = "gpt-4o-mini" }}]
  retry = {{ max_attempts = 2, retry_on = ["timeout", "connect", "5xx", "429"], backoff_ms = 50 }}
  on_failure = "free"
"""


@dataclass
class Target:
    name: str
    url: str
    proc: Proc
    cpu_tree: bool  # count descendants' CPU too (multi-process servers)
    token: str = ""  # bearer token (LiteLLM's master key)
    keys: tuple[str, ...] = ()  # gateway keys wrk rotates over; the harness's bench keys when empty
    pg_pid: int | None = None  # its PostgreSQL when not the harness's (the non-durable extra row)
    commits: pgstats.CommitCounter | None = None

    def tokens(self, default: list[str]) -> list[str]:
        return [self.token] if self.token else list(self.keys or default)

    @property
    def is_gateway(self) -> bool:
        return self.name.startswith("gateway")


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="~3 s per scenario, c=4 and c=32 only, no peer, 300 streams, short ledger run")
    p.add_argument("--peer", action="store_true", help="also measure LiteLLM's proxy (installed on demand)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured wrk run (10; quick 3)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded wrk run before each (2; quick 0.5)")
    p.add_argument("--scenarios", nargs="+", choices=(*SOLO_SCENARIOS, *ALL_SCENARIOS), default=None,
                   help="subset of scenarios (default: all; quick: c=4 and c=32)")
    p.add_argument("--targets", nargs="+", choices=(*BASE_TARGETS, "litellm"), default=None,
                   help="subset of targets (default: direct passthrough gateway [+ litellm with --peer])")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument("--accounts", type=int, default=1,
                   help="funded accounts (one key each) that wrk rotates through (default 1: one hot account)")
    p.add_argument("--spread-accounts", type=int, default=16,
                   help="after the gateway's chat-c32 row, the same load over this many funded accounts "
                        "(one key each) to compare with one hot account (default 16; 0 skips)")
    p.add_argument("--ttfb-duration", type=float, default=None,
                   help="seconds of the time-to-first-content-byte run after each streamed row "
                        "(min(5, duration); quick min(2, duration); 0 skips)")
    p.add_argument("--streams", type=int, default=None, help="many-streams N (9000; quick 300; 0 skips)")
    p.add_argument("--stream-chunk-delay-ms", type=int, default=None,
                   help="slow upstream's delay between chunks for the many-streams test (default: long "
                        "enough that the first stream outlives the ramp; 2,400 for 9,000 streams)")
    p.add_argument("--ledger-ops", type=int, default=None, help="ledger benchmark ops (10000; quick 1000; 0 skips)")
    p.add_argument("--tracing-scenarios", nargs="*", choices=ALL_SCENARIOS, default=list(TRACING_SCENARIOS),
                   help="scenarios measured again on a gateway exporting OpenTelemetry traces to a local OTLP "
                        "sink (default: chat-c32 stream-c32, those of --scenarios; none: skip)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results directory")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile the gateway with py-spy (installed from PyPI into benchmarks/.tools on first "
                        "use) during extra, unrecorded chat-c32 and stream-c32 runs (default on; off in --quick)")
    p.add_argument("--non-durable-rows", action=argparse.BooleanOptionalAction, default=None,
                   help="after the main rows, the gateway's chat-c4 and chat-c32 again on a second, non-durable "
                        "PostgreSQL (fsync, synchronous_commit, full_page_writes off), labelled "
                        "gateway-nondurable (default on; off in --quick)")
    p.add_argument("--non-durable", action="store_true",
                   help="run everything on a non-durable PostgreSQL (the test suite's settings); the report "
                        "says so in its header. Not what production runs: for comparisons only")
    p.add_argument("--keep-logs", action="store_true", help="keep the process logs even on success")
    p.add_argument("--baseline", type=Path, default=None,
                   help="a source tree of another commit (e.g. `git worktree add /tmp/base HEAD~1`): its gateway "
                        "runs as an extra target `gateway-base`, right after `gateway` in every scenario, on the "
                        "same PostgreSQL — a before/after comparison within one run")
    args = p.parse_args(argv)
    if args.quick and args.peer:
        p.error("--quick runs no peer; drop one of --quick/--peer")
    args.duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    args.scenarios = args.scenarios or list(QUICK_SCENARIOS if args.quick else ALL_SCENARIOS)
    args.targets = args.targets or [*BASE_TARGETS, *(["litellm"] if args.peer else [])]
    if "litellm" in args.targets and not args.peer:
        p.error("target litellm needs --peer")
    args.streams = args.streams if args.streams is not None else (300 if args.quick else 9000)
    args.ttfb_duration = (args.ttfb_duration if args.ttfb_duration is not None
                          else min(2.0 if args.quick else 5.0, args.duration))
    if args.stream_chunk_delay_ms is None:
        args.stream_chunk_delay_ms = default_chunk_delay_ms(args.streams)
    args.ledger_ops = args.ledger_ops if args.ledger_ops is not None else (1000 if args.quick else 10000)
    args.profile = (not args.quick) if args.profile is None else args.profile
    if args.non_durable_rows is None:
        args.non_durable_rows = not args.quick and not args.non_durable
    if (args.duration <= 0 or args.workers < 1 or args.streams < 0 or args.ledger_ops < 0 or args.accounts < 1
            or args.spread_accounts < 0 or args.ttfb_duration < 0):
        p.error("--duration must be > 0, --workers and --accounts >= 1, --streams, --ledger-ops, "
                "--spread-accounts and --ttfb-duration >= 0")
    return args


def streams_ramp_s(n: int) -> float:
    """Open the N streams at STREAMS_PER_S: the target is holding them, not admitting a burst."""
    return min(STREAMS_RAMP_MAX_S, max(1.0, n / STREAMS_PER_S))


def default_chunk_delay_ms(n: int) -> int:
    """Long enough that the first stream is still open when the last one starts, with slack for
    admission (half the ramp, 3-15 s): 19 gaps between the 20 chunks."""
    ramp_s = streams_ramp_s(n)
    slack_s = min(15.0, max(3.0, ramp_s / 2))
    return max(250, 100 * math.ceil((ramp_s + slack_s) / 19 * 10))


def scenario_parts(name: str) -> tuple[str, int]:
    mode, conc = name.split("-c")
    return mode, int(conc)


# --------------------------------------------------------------------------- the harness


class Harness:
    def __init__(self, args: argparse.Namespace, stack: ExitStack, log_dir: Path) -> None:
        self.args = args
        self.stack = stack
        self.log_dir = log_dir
        self.pins = pin_plan()
        self.nofile = raise_nofile()
        self.python = sys.executable
        self.procs: list[Proc] = []
        self.pg: EmbeddedPostgres | None = None
        self.pg_pid: int | None = None
        self.commits: pgstats.CommitCounter | None = None
        self.keys: list[str] = []
        self.wrk = ""
        self.notes: list[str] = []
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    # ---------------------------------------------------------------- processes

    def start(self, name: str, args: list[str], *, cpus: set[int] | None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        proc = Proc(name, args, log_dir=self.log_dir, cpus=cpus, env=env, nofile=self.nofile, cwd=cwd or REPO)
        self.procs.append(proc)
        self.stack.callback(proc.stop)
        return proc

    @staticmethod
    def _tree_env(env: dict[str, str], tree: Path | None) -> dict[str, str]:
        """Another source tree's package first on the path (the --baseline gateway)."""
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(tree.resolve()), *filter(None, [env.get("PYTHONPATH")])])
        return env

    def start_mock(self, name: str, cpus: set[int] | None, *extra: str) -> tuple[Proc, str]:
        port = free_port()
        proc = self.start(name, [self.python, "-m", "tokensforge", "mock-upstream", "--port", str(port),
                                 *extra], cpus=cpus)
        base = f"http://127.0.0.1:{port}"
        proc.wait_http(base + "/healthz", timeout_s=60)
        return proc, base

    def gateway_env(self, dsn: str | None = None) -> dict[str, str]:
        assert self.pg is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSFORGE_", "PROMETHEUS_"))}
        env.update({"TOKENSFORGE_DATABASE_URL": dsn or self.pg.dsn, "TOKENSFORGE_ADMIN_TOKEN": ADMIN_TOKEN,
                    "TF_BENCH_UPSTREAM_KEY": UPSTREAM_KEY})
        return env

    def start_gateway(self, name: str, upstream_base: str, workers: int,
                      dsn: str | None = None, tree: Path | None = None,
                      extra_env: dict[str, str] | None = None) -> tuple[Proc, str]:
        catalog = self.log_dir / f"{name}-catalog.toml"
        catalog.write_text(CATALOG.format(upstream=upstream_base), encoding="utf-8")
        port = free_port()
        cpus = self.pins["sut"] if workers == 1 else None
        proc = self.start(name, [self.python, "-m", "tokensforge", "serve", "--config", str(catalog),
                                 "--port", str(port), "--workers", str(workers)],
                          cpus=cpus, env={**self._tree_env(self.gateway_env(dsn), tree), **(extra_env or {})},
                          cwd=tree)
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(url + "/readyz", timeout_s=120)
        return proc, url

    # ---------------------------------------------------------------- PostgreSQL

    def start_postgres(self) -> None:
        self.pg, self.pg_pid, self.commits = self.start_cluster(durable=not self.args.non_durable)

    def start_cluster(self, *, durable: bool) -> tuple[EmbeddedPostgres, int, pgstats.CommitCounter]:
        """A throwaway cluster pinned with the load, PostgreSQL's durability defaults unless told
        otherwise; stopped and removed with the harness."""
        pg = durable_throwaway(durable=durable)
        self.stack.callback(pg.close)
        pg.start()
        pid = int((pg.cluster_dir / "postmaster.pid").read_text().split()[0])
        set_affinity_tree(pid, self.pins["load"])
        commits = pgstats.CommitCounter(pg.admin_dsn("postgres"), pg.dsn.rsplit("/", 1)[1])
        self.stack.callback(commits.close)
        return pg, pid, commits

    def pin_postgres(self, cpus: set[int] | None) -> None:
        if self.pg_pid is not None:
            set_affinity_tree(self.pg_pid, cpus)

    # ---------------------------------------------------------------- the account

    @property
    def key(self) -> str:
        return self.keys[0]

    def create_key(self, gateway_url: str, index: int = 0) -> str:
        """A new account funded with FUND_NANOS in both buckets, and one key for it."""
        auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        status, account = http_json("POST", gateway_url + "/admin/accounts", {"name": f"bench-{index}"},
                                    headers=auth)
        if status != 201:
            raise BenchError(f"creating the bench account failed: {status} {account}")
        for bucket in ("credit", "routed"):
            status, body = http_json("POST", f"{gateway_url}/admin/accounts/{account['id']}/topups",
                                     {"bucket": bucket, "amount_nanos": FUND_NANOS,
                                      "idempotency_key": f"bench-{bucket}", "note": "benchmark"},
                                     headers=auth)
            if status not in (200, 201):
                raise BenchError(f"funding the bench account failed: {status} {body}")
        status, key = http_json("POST", f"{gateway_url}/admin/accounts/{account['id']}/keys",
                                {"name": "bench"}, headers=auth)
        if status != 201:
            raise BenchError(f"creating the bench key failed: {status} {key}")
        return str(key["key"])

    # ---------------------------------------------------------------- measurements

    def preflight(self, url: str, mode: str, token: str) -> str:
        """One request checked by hand: 200, a completion, and for streams [DONE] without an error event."""
        body = json.dumps(STREAM_BODY if mode == "stream" else CHAT_BODY).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST", headers={
            "content-type": "application/json", "authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as exc:
            return f"status {exc.code}: {exc.read()[:300]!r}"
        except OSError as exc:
            return f"request failed: {exc}"
        if status != 200:
            return f"status {status}"
        if mode == "stream":
            if b"data: [DONE]" not in raw:
                return "stream without [DONE]"
            if b'data: {"error"' in raw:
                return "stream carried an error event"
            chunks = raw.count(b'"content":"') - 1  # minus the role chunk's empty content
            return "ok" if chunks >= 20 else f"stream had {chunks} content chunks, expected 20"
        try:
            payload = json.loads(raw)
            payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return f"unexpected body {raw[:200]!r}"
        return "ok"

    def wrk_run(self, url: str, mode: str, conc: int, seconds: float, tokens: list[str], *,
                probe_gateway: bool = False, commits: pgstats.CommitCounter | None = None,
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One wrk run; with probe_gateway, PostgreSQL's commit counter and the gateway's request
        counter are read twice while it runs (see benchmarks/pgstats.py for why not before/after)."""
        threads = max(1, min(2, conc))
        script = WRK_DIR / ("stream.lua" if mode == "stream" else "chat.lua")
        whole_s = max(1, round(seconds))
        cmd = [self.wrk, f"-t{threads}", f"-c{conc}", f"-d{whole_s}s", "--timeout", "30s",
               "-s", str(script), url, "--", *tokens]

        counter = commits or self.commits

        def probe() -> dict[str, Any]:
            assert counter is not None
            t = time.monotonic()
            try:
                return {"t": t, "commits": counter.read(), "requests": pgstats.gateway_requests(url)}
            except (OSError, ValueError, asyncpg.PostgresError) as exc:  # reported in the row, never fatal
                return {"t": t, "error": f"{type(exc).__name__}: {exc}"[:300]}

        probing = probe_gateway and counter is not None
        proc, samples = run_capture_probed(
            cmd, timeout_s=seconds + 90, cpus=self.pins["load"], nofile=self.nofile,
            probe_at_s=pgstats.probe_times(whole_s) if probing else (), probe=probe if probing else None)
        for line in proc.stdout.splitlines():
            if line.startswith("WRK_JSON "):
                return dict(json.loads(line[len("WRK_JSON "):])), samples
        raise BenchError(f"wrk printed no result (exit {proc.returncode}):\n{proc.stdout[-1500:]}\n"
                         f"{proc.stderr[-1500:]}")

    def ttfb_run(self, url: str, conc: int, tokens: Sequence[str]) -> dict[str, Any]:
        """Time to first content byte at concurrency `conc` (benchmarks.ttfb_bench, on the load core)."""
        seconds = self.args.ttfb_duration
        cmd = [self.python, "-m", "benchmarks.ttfb_bench", "--url", url, "--concurrency", str(conc),
               "--duration", str(seconds), "--warmup", str(min(0.5, self.args.warmup)), *tokens]
        proc = run_capture(cmd, timeout_s=seconds + 120, cpus=self.pins["load"], nofile=self.nofile, cwd=REPO)
        for line in proc.stdout.splitlines():
            if line.startswith("TTFB_JSON "):
                return dict(json.loads(line[len("TTFB_JSON "):]))
        return {"error": f"ttfb_bench exit {proc.returncode}: {proc.stderr[-1500:]}"}

    def wait_idle(self, target: Target, *, limit_s: float = 60.0) -> float:
        """Wait until the target has worked off what earlier runs left queued (< 5 % of a core
        over 0.5 s), so a slow target does not start a run with a backlog; returns the wait."""
        started = time.monotonic()
        while time.monotonic() - started < limit_s and target.proc.alive():
            c0 = cpu_seconds(target.proc.pid, tree=target.cpu_tree)
            time.sleep(0.5)
            if cpu_seconds(target.proc.pid, tree=target.cpu_tree) - c0 < 0.025:
                break
        return round(time.monotonic() - started, 1)

    def measure(self, scenario: str, target: Target) -> dict[str, Any]:
        mode, conc = scenario_parts(scenario)
        row: dict[str, Any] = {"scenario": scenario, "mode": mode, "concurrency": conc, "target": target.name}
        if not target.proc.alive():
            row.update(error=f"{target.name} is not running (exit {target.proc.proc.returncode})")
            return row
        tokens = target.tokens(self.keys)
        if target.keys:
            row["accounts"] = len(target.keys)
        row["preflight"] = self.preflight(target.url, mode, tokens[0])
        if self.args.warmup > 0:
            self.wait_idle(target)
            self.wrk_run(target.url, mode, conc, self.args.warmup, tokens)
        row["idle_wait_s"] = self.wait_idle(target)
        pg_pid = target.pg_pid or self.pg_pid
        with_pg = target.is_gateway and pg_pid is not None
        pg0 = cpu_seconds(pg_pid, tree=True) if with_pg else 0.0  # type: ignore[arg-type]
        cpu0 = cpu_seconds(target.proc.pid, tree=target.cpu_tree)
        w, samples = self.wrk_run(target.url, mode, conc, self.args.duration, tokens, probe_gateway=with_pg,
                                  commits=target.commits)
        cpu1 = cpu_seconds(target.proc.pid, tree=target.cpu_tree)
        pg1 = cpu_seconds(pg_pid, tree=True) if with_pg else 0.0  # type: ignore[arg-type]
        seconds = w["duration_us"] / 1e6
        errors = {k[len("errors_"):]: w[k] for k in w if k.startswith("errors_") and w[k]}
        requests = int(w["requests"])
        row.update({
            "requests": requests,
            "seconds": round(seconds, 3),
            "rps": round(requests / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": round(w["p50_us"] / 1000, 3),
            "p90_ms": round(w["p90_us"] / 1000, 3),
            "p99_ms": round(w["p99_us"] / 1000, 3),
            "mean_ms": round(w["mean_us"] / 1000, 3),
            "max_ms": round(w["max_us"] / 1000, 3),
            "errors": int(sum(errors.values())) + (0 if row["preflight"] == "ok" else 1),
            "errors_detail": errors,
            "cpu_s": round(cpu1 - cpu0, 3),
            "cpu_s_per_1k": round((cpu1 - cpu0) / requests * 1000, 4) if requests else None,
            "cpu_util": round((cpu1 - cpu0) / seconds, 3) if seconds > 0 else None,
        })
        if with_pg and requests:
            row["pg_cpu_s_per_1k"] = round((pg1 - pg0) / requests * 1000, 4)
        if with_pg:
            row["pg_commits"] = pgstats.commits_per_request(samples)
        if mode == "stream" and self.args.ttfb_duration > 0:
            self.wait_idle(target)
            row["ttfb"] = self.ttfb_run(target.url, conc, tokens)
        return row

    def profile(self, target: Target, scenario: str, out_dir: Path) -> dict[str, Any]:
        """py-spy (never required) samples the gateway during an extra, unrecorded wrk run."""
        spy = ensure_py_spy(self.log_dir / "py-spy-install.log")
        if spy is None:
            return {"skipped": "py-spy could not be installed (pip install --target benchmarks/.tools py-spy): "
                               + _tail(self.log_dir / "py-spy-install.log", 5)}
        mode, conc = scenario_parts(scenario)
        seconds = max(5.0, self.args.duration)
        raw = self.log_dir / f"profile-{scenario}.txt"
        spy_proc = Proc(f"py-spy-{scenario}", [spy, "record", "-o", str(raw), "--format", "raw", "--pid",
                                   str(target.proc.pid), "--duration", str(int(seconds)), "--rate", "250",
                                   "--nonblocking"], log_dir=self.log_dir, cpus=self.pins["load"])
        try:
            time.sleep(0.5)
            self.wait_idle(target)
            self.wrk_run(target.url, mode, conc, seconds, target.tokens(self.keys))
            spy_proc.proc.wait(timeout=60)
        finally:
            spy_proc.stop()
        if not raw.exists():
            return {"error": f"py-spy wrote no profile: {spy_proc.log_tail()}"}
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = out_dir / f"{self.stamp}-profile-{scenario}-{target.name}.txt"
        shutil.copyfile(raw, kept)
        summary = profile_summary.summarise(raw.read_text(errors="replace"), top=20)
        return {"scenario": scenario, "target": target.name, "raw_stacks": str(kept), **summary}

    # ---------------------------------------------------------------- stages

    def ledger_stage(self) -> dict[str, Any]:
        if self.args.ledger_ops == 0:
            return {"skipped": "--ledger-ops 0"}
        assert self.pg is not None
        self.pin_postgres(None)  # the ledger alone may use the whole machine
        try:
            cmd = [self.python, "-m", "benchmarks.ledger_bench", "--admin-dsn", self.pg.admin_dsn("postgres"),
                   "--ops", str(self.args.ledger_ops), "--warmup", str(max(50, self.args.ledger_ops // 20)),
                   "--concurrency", "64", "--accounts", "50", "--pool-size", "20", "--settle-profile",
                   "--profile-settles", str(max(100, min(4000, self.args.ledger_ops // 2))),
                   *(["--pg-pid", str(self.pg_pid)] if self.pg_pid else [])]
            proc = run_capture(cmd, timeout_s=900, nofile=self.nofile, cwd=REPO)
        finally:
            self.pin_postgres(self.pins["load"])
        for line in proc.stdout.splitlines():
            if line.startswith("LEDGER_JSON "):
                return dict(json.loads(line[len("LEDGER_JSON "):]))
        return {"error": f"ledger_bench exit {proc.returncode}: {proc.stderr[-1500:]}"}

    def peer_stage(self, backend: str) -> tuple[Target | None, dict[str, Any]]:
        info: dict[str, Any] = {"requested": True}
        try:
            info["version"] = peer.ensure_litellm(self.log_dir / "peer-install.log")
        except BenchError as exc:
            info.update(status="install failed", error=str(exc),
                        log_tail=_tail(self.log_dir / "peer-install.log"))
            return None, info
        master_key = "sk-bench-" + os.urandom(16).hex()
        config = peer.write_config(self.log_dir / "litellm.yaml", backend + "/v1", master_key)
        port = free_port()
        proc = self.start("litellm", peer.command(config, port), cpus=self.pins["sut"],
                          env=peer.peer_env(os.environ))
        url = f"http://127.0.0.1:{port}"
        try:
            proc.wait_http(url + "/health/liveliness", timeout_s=240)
        except BenchError as exc:
            info.update(status="start failed", error=str(exc)[-3000:])
            proc.stop()
            return None, info
        info.update(status="ok", command=" ".join(peer.command(config, port)))
        return Target("litellm", url, proc, cpu_tree=True, token=master_key), info

    def streams_stage(self) -> dict[str, Any]:
        n = self.args.streams
        if n == 0:
            return {"skipped": "--streams 0"}
        delay = self.args.stream_chunk_delay_ms
        # the gateway holds two sockets per stream (client and upstream) plus its pool and listeners
        fd_needed = 2 * n + STREAM_FD_MARGIN
        if self.nofile < fd_needed:
            return {"n": n, "errors": n, "error": f"the open-file limit is {self.nofile} (soft raised to hard), "
                    f"{n} streams need ~{fd_needed} in the gateway: at most {(self.nofile - STREAM_FD_MARGIN) // 2}"
                    " streams fit; raise `ulimit -Hn` or lower --streams"}
        mock, base = self.start_mock("mock-slow", self.pins["load"], "--chunk-delay-ms", str(delay),
                                     "--completion-tokens", "20")
        gw, url = self.start_gateway("gateway-streams", base, workers=1)
        try:
            rss_before = status_kb(gw.pid, "VmRSS")
            per_stream_s = delay * 19 / 1000
            ramp_s = streams_ramp_s(n)
            timeout = ramp_s + per_stream_s + 180
            cmd = [self.python, "-m", "benchmarks.streams_bench", "--url", url, "--key", self.key, "--n", str(n),
                   "--ramp-s", str(ramp_s), "--stream-timeout-s", str(per_stream_s + 120)]
            cpu0, overflows0 = cpu_seconds(gw.pid), tcp_ext_counter("ListenOverflows")
            proc = run_capture(cmd, timeout_s=timeout, cpus=self.pins["load"], nofile=self.nofile, cwd=REPO)
            cpu1, overflows1 = cpu_seconds(gw.pid), tcp_ext_counter("ListenOverflows")
            result: dict[str, Any] = {"chunk_delay_ms": delay, "completion_tokens": 20, "ramp_s": ramp_s,
                                      "nofile_limit": self.nofile}
            for line in proc.stdout.splitlines():
                if line.startswith("STREAMS_JSON "):
                    result.update(json.loads(line[len("STREAMS_JSON "):]))
                    break
            else:
                result.update(n=n, errors=n, error=f"streams_bench exit {proc.returncode}: {proc.stderr[-1500:]}")
            peak_kb = status_kb(gw.pid, "VmHWM")
            held = max(1, int(result.get("peak_inflight") or n))
            result.update(gateway_rss_before_mb=round(rss_before / 1024, 1),
                          gateway_peak_rss_mb=round(peak_kb / 1024, 1),
                          kb_per_open_stream=round((peak_kb - rss_before) / held, 1),
                          gateway_cpu_s=round(cpu1 - cpu0, 2), gateway_alive=gw.alive(),
                          # system-wide: connections dropped because a listen backlog was full
                          listen_overflows=(overflows1 - overflows0
                                            if overflows0 is not None and overflows1 is not None else None))
            return result
        finally:
            gw.stop()
            mock.stop()

    def ledger_check(self, gateway_requests: int) -> dict[str, Any]:
        """Did every gateway request reach the ledger? (wrk's cut-off in-flight requests add a few.)"""
        assert self.pg is not None

        async def q() -> dict[str, Any]:
            conn = await asyncpg.connect(self.pg.dsn)  # type: ignore[union-attr]
            try:
                for _ in range(50):  # requests cut when wrk stopped are still being resolved
                    if not await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'"
                                               " AND kind = 'request'"):
                        break
                    await asyncio.sleep(0.1)
                rows = await conn.fetch("SELECT status, count(*) AS n, sum(charge_nanos) AS charged"
                                        " FROM usage_records GROUP BY status ORDER BY status")
                open_left = await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'"
                                                " AND kind = 'request'")
                leased = await conn.fetchrow("SELECT count(*) AS n, coalesce(sum(amount_nanos), 0) AS held"
                                             " FROM reservations WHERE status = 'open' AND kind = 'lease'")
            finally:
                await conn.close()
            return {"usage_records_by_status": {r["status"]: r["n"] for r in rows},
                    "charged_nanos": int(sum((r["charged"] or 0) for r in rows)),
                    "open_reservations": int(open_left), "open_leases": int(leased["n"]),
                    "leased_nanos": int(leased["held"])}

        out = asyncio.run(q())
        out["gateway_requests_counted_by_wrk"] = gateway_requests
        return out


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {"rows": []}
    with ExitStack() as stack:
        h = Harness(args, stack, log_dir)
        h.wrk = ensure_wrk()
        sut, load = h.pins["sut"], h.pins["load"]
        log("starting PostgreSQL")
        h.start_postgres()
        assert h.pg is not None
        results["meta"] = machine_meta(args, h, started)
        log("one-row commit probe (the disk's flush latency as PostgreSQL sees it)")
        results["durability"] = pgstats.durability_probe(h.pg.dsn)

        log(f"ledger benchmark ({args.ledger_ops} ops)")
        results["ledger"] = h.ledger_stage()

        log("starting upstreams, passthrough, gateway")
        targets: dict[str, Target] = {}
        direct, direct_url = h.start_mock("mock-direct", sut)
        _backend, backend_url = h.start_mock("mock-backend", load)
        targets["direct"] = Target("direct", direct_url, direct, cpu_tree=False)
        pt_port = free_port()
        pt = h.start("passthrough", [h.python, "-m", "benchmarks.passthrough", "--port", str(pt_port),
                                     "--upstream", backend_url], cpus=sut)
        pt_url = f"http://127.0.0.1:{pt_port}"
        pt.wait_http(pt_url + "/healthz")
        targets["passthrough"] = Target("passthrough", pt_url, pt, cpu_tree=False)
        gw, gw_url = h.start_gateway("gateway", backend_url, args.workers)
        targets["gateway"] = Target("gateway", gw_url, gw, cpu_tree=args.workers > 1)
        h.keys = [h.create_key(gw_url, i) for i in range(args.accounts)]
        order_extra: list[str] = []
        if args.baseline is not None:
            base, base_url = h.start_gateway("gateway-base", backend_url, args.workers, tree=args.baseline)
            targets["gateway-base"] = Target("gateway-base", base_url, base, cpu_tree=args.workers > 1,
                                             keys=(h.create_key(base_url, 500),))
            order_extra.append("gateway-base")

        results["peer"] = {"requested": False}
        if args.peer:
            log("LiteLLM: install (first time only) and start")
            target, results["peer"] = h.peer_stage(backend_url)
            if target is not None:
                targets["litellm"] = target
            else:
                log(f"LiteLLM unavailable: {results['peer'].get('error', '')[:300]}")

        order = [t for t in args.targets if t in targets]
        if order_extra:
            at = order.index("gateway") + 1 if "gateway" in order else len(order)
            order[at:at] = order_extra
        for scenario in args.scenarios:
            for name in order:
                results["rows"].append(measure_logged(h, scenario, targets[name]))
                if name == "gateway" and scenario == SPREAD_SCENARIO and args.spread_accounts:
                    results["rows"] += accounts_rows(h, targets[name])
                if args.profile and name == "gateway" and scenario in PROFILED:
                    log("   profiling the gateway with py-spy (extra, unrecorded run)")
                    results[PROFILED[scenario]] = h.profile(targets[name], scenario, args.out)
        if args.non_durable_rows and "gateway" in targets:
            results["rows"] += non_durable_rows(h, backend_url, args)

        tracing_rows(h, results, backend_url, targets["gateway"])
        gateway_requests = sum(r.get("requests", 0) for r in results["rows"] if r["target"].startswith("gateway"))
        results["ledger_check"] = h.ledger_check(gateway_requests)
        if "litellm" in targets:
            targets["litellm"].proc.stop()  # free the core for the streams test

        log(f"many-streams benchmark (N={args.streams})")
        results["streams"] = h.streams_stage()
        results["meta"]["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        results["meta"]["notes"] = h.notes
    results["targets"] = evaluate(results, args)
    return results


def measure_logged(h: Harness, scenario: str, target: Target) -> dict[str, Any]:
    log(f"{scenario} → {target.name}")
    try:
        row = h.measure(scenario, target)
    except BenchError as exc:
        row = {"scenario": scenario, "target": target.name, "error": str(exc)[-2000:]}
    if "rps" in row:
        extra = ""
        if "commits_per_request" in row.get("pg_commits", {}):
            extra += f"  PostgreSQL commits/request {row['pg_commits']['commits_per_request']}"
        if "ttfb_ms" in row.get("ttfb", {}):
            extra += f"  first content byte p50 {row['ttfb']['ttfb_ms']['p50']} ms"
        log(f"   {row['rps']} rps  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
            f"errors {row['errors']}  cpu/1k {row['cpu_s_per_1k']} s  ({row['preflight']}){extra}")
    else:
        log(f"   error: {row.get('error', '')[:300]}")
    return row


def tracing_rows(h: Harness, results: dict[str, Any], backend_url: str, gateway: Target) -> None:
    """The --tracing-scenarios again on a second gateway (same database, same pinning) with the standard
    OTEL_* variables pointing at a local OTLP sink; the off gateway stops meanwhile."""
    scenarios = [s for s in h.args.tracing_scenarios if s in h.args.scenarios]
    if not scenarios:
        return
    log("tracing on: a gateway exporting every request's spans over OTLP/HTTP to a local sink")
    port = free_port()
    sink = h.start("otlp-sink", [h.python, "-c", OTLP_SINK, str(port)], cpus=h.pins["load"])
    sink.wait_http(f"http://127.0.0.1:{port}/healthz")
    gateway.proc.stop()
    try:
        proc, url = h.start_gateway("gateway-traced", backend_url, h.args.workers, extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "tokensforge-bench"})
        keys = tuple(h.create_key(url, 2000 + i) for i in range(h.args.accounts))
    except BenchError as exc:
        results["rows"].append({"scenario": scenarios[0], "target": "gateway-traced", "error": str(exc)[-2000:]})
        return
    traced = Target("gateway-traced", url, proc, cpu_tree=h.args.workers > 1, keys=keys)
    for scenario in scenarios:
        results["rows"].append(measure_logged(h, scenario, traced))

def non_durable_rows(h: Harness, backend_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The gateway's chat-c4 and chat-c32 once more, on a second cluster with fsync,
    synchronous_commit and full_page_writes off (a fresh gateway, pinned like the first), labelled
    `gateway-nondurable`: what the disk costs, beside the durable rows. Never a headline figure."""
    scenarios = [s for s in NON_DURABLE_SCENARIOS if s in args.scenarios]
    if not scenarios:
        return []
    log("non-durable PostgreSQL: the gateway's chat rows again (labelled extra rows)")
    try:
        _pg, pid, commits = h.start_cluster(durable=False)
        gw, url = h.start_gateway("gateway-nondurable", backend_url, args.workers, dsn=_pg.dsn)
        key = h.create_key(url, 0)
    except (BenchError, OSError) as exc:
        return [{"scenario": s, "target": "gateway-nondurable", "error": str(exc)[-2000:]} for s in scenarios]
    target = Target("gateway-nondurable", url, gw, cpu_tree=args.workers > 1, keys=(key,), pg_pid=pid,
                    commits=commits)
    try:
        return [measure_logged(h, s, target) for s in scenarios]
    finally:
        gw.stop()


def accounts_rows(h: Harness, gateway: Target) -> list[dict[str, Any]]:
    """The gateway's chat-c32 load again, over `--spread-accounts` fresh funded accounts (one key
    each), right after its row on one hot account so the two are measured close together. With
    `--accounts` > 1 the main rows are not on one account, so a one-account twin is measured too."""
    n = h.args.spread_accounts
    try:
        keys = tuple(h.create_key(gateway.url, 1000 + i) for i in range(n))
    except BenchError as exc:
        return [{"scenario": SPREAD_SCENARIO, "target": f"gateway-{n}acct", "error": str(exc)[-2000:]}]
    rows = []
    if h.args.accounts != 1:
        hot = Target("gateway-1acct", gateway.url, gateway.proc, gateway.cpu_tree, keys=(h.keys[0],))
        rows.append(measure_logged(h, SPREAD_SCENARIO, hot))
    spread = Target(f"gateway-{n}acct", gateway.url, gateway.proc, gateway.cpu_tree, keys=keys)
    rows.append(measure_logged(h, SPREAD_SCENARIO, spread))
    return rows


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _git_describe(tree: Path = REPO) -> str:
    """The commit measured, and whether the package had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tokensforge"], cwd=tree,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in tokensforge/' if dirty else ''}"


def machine_meta(args: argparse.Namespace, h: Harness, started: dt.datetime) -> dict[str, Any]:
    assert h.pg is not None
    pins = h.pins
    return {
        "date": started.isoformat(timespec="seconds"),
        "stamp": h.stamp,
        "git": _git_describe(),
        "baseline": _git_describe(args.baseline) if args.baseline is not None else None,
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "cpu_count": cpu_count(),
        "cpu_model": cpu_model(),
        "os": os_name(),
        "python": sys.version.split()[0],
        "versions": {"aiohttp": pkg_version("aiohttp"), "asyncpg": pkg_version("asyncpg"),
                     "uvloop": pkg_version("uvloop"), "orjson": pkg_version("orjson"),
                     "tokensforge": pkg_version("tokensforge"),
                     "postgresql": postgres_version(h.pg.bindir), "wrk": wrk_version(h.wrk)},
        "pinning": {
            "system_under_test": sorted(pins["sut"]) if pins["sut"] else "unpinned",
            "wrk_backend_upstream_postgres": sorted(pins["load"]) if pins["load"] else "unpinned",
            "gateway_workers": args.workers,
        },
        "accounts": args.accounts,
        "spread_accounts": args.spread_accounts,
        "ttfb_duration_s": args.ttfb_duration,
        "duration_s": args.duration, "warmup_s": args.warmup, "quick": args.quick,
        "nofile_limit": h.nofile,
    }


# --------------------------------------------------------------------------- targets and report


def _row(results: dict[str, Any], scenario: str, target: str) -> dict[str, Any] | None:
    for row in results["rows"]:
        if row.get("scenario") == scenario and row.get("target") == target and "rps" in row:
            return dict(row)
    return None


TargetResult = dict[str, Any]


def _target(name: str, value: float | None, target: str, met: bool | None, note: str = "") -> TargetResult:
    return {"name": name, "value": value, "target": target, "met": met, "note": note}


def _added(row: dict[str, Any] | None, base: dict[str, Any] | None, key: str) -> float | None:
    if not row or not base or row.get(key) is None or base.get(key) is None:
        return None
    return round(float(row[key]) - float(base[key]), 3)


def _ttfb(results: dict[str, Any], scenario: str, target: str) -> dict[str, Any] | None:
    row = _row(results, scenario, target)
    ttfb = (row or {}).get("ttfb") or {}
    return dict(ttfb["ttfb_ms"]) if "ttfb_ms" in ttfb and ttfb["ttfb_ms"]["p50"] is not None else None


def hot_and_spread(results: dict[str, Any], args: argparse.Namespace) -> tuple[Any, Any]:
    """The gateway's chat-c32 rows on one account and on --spread-accounts accounts."""
    hot = _row(results, SPREAD_SCENARIO, "gateway" if args.accounts == 1 else "gateway-1acct")
    return hot, _row(results, SPREAD_SCENARIO, f"gateway-{args.spread_accounts}acct")


def evaluate(results: dict[str, Any], args: argparse.Namespace) -> list[TargetResult]:
    """Issue #17's targets (and #10's many-streams one), one entry each: value, target, met (True/False)
    or None (not measured)."""
    return [*_http_targets(results, args), *_ledger_targets(results, args), *_stream_targets(results)]


def _http_targets(results: dict[str, Any], args: argparse.Namespace) -> list[TargetResult]:
    out: list[TargetResult] = []
    gw, pt = _row(results, "chat-c32", "gateway"), _row(results, "chat-c32", "passthrough")
    name = "gateway / passthrough throughput, non-streamed c=32"
    if gw and pt and pt["rps"] > 0:
        ratio = round(gw["rps"] / pt["rps"], 3)
        out.append(_target(name, ratio, "≥ 0.60", ratio >= 0.60, f"{gw['rps']:,.0f} / {pt['rps']:,.0f} rps"))
    else:
        out.append(_target(name, None, "≥ 0.60", None, "not measured"))
    if gw and pt and gw.get("cpu_s_per_1k") and pt.get("cpu_s_per_1k"):
        ratio = round(pt["cpu_s_per_1k"] / gw["cpu_s_per_1k"], 3)
        out.append(_target("(info) the same once both are CPU-bound: passthrough CPU per request / gateway's",
                           ratio, "≥ 0.60", ratio >= 0.60))
    sg, sp = _row(results, "stream-c32", "gateway"), _row(results, "stream-c32", "passthrough")
    name = "gateway / passthrough throughput, streamed c=32 (20 chunks + usage)"
    if sg and sp and sp["rps"] > 0:
        ratio = round(sg["rps"] / sp["rps"], 3)
        out.append(_target(name, ratio, "≥ 0.60", ratio >= 0.60, f"{sg['rps']:,.0f} / {sp['rps']:,.0f} rps"))
    else:
        out.append(_target(name, None, "≥ 0.60", None, "not measured"))
    for label, row, base, limit in (("stream", sg, sp, 1.0), ("request, non-streamed", gw, pt, 0.45)):
        name = f"gateway CPU per {label}, c=32 (ms)"
        if row and row.get("cpu_s_per_1k") is not None:
            value = round(row["cpu_s_per_1k"], 3)
            note = f"passthrough {base['cpu_s_per_1k']:.3f} ms" if base and base.get("cpu_s_per_1k") else ""
            out.append(_target(name, value, f"≤ {limit:g} ms", value <= limit, note))
        else:
            out.append(_target(name, None, f"≤ {limit:g} ms", None, "not measured"))
    gw4, d4 = _row(results, "chat-c4", "gateway"), _row(results, "chat-c4", "direct")
    for which, key, limit in (("p50", "p50_ms", 2.0), ("p99", "p99_ms", 5.0)):
        added = _added(gw4, d4, key)
        out.append(_target(f"gateway {which} latency added over direct, non-streamed c=4 (ms)", added,
                           f"≤ {limit:g} ms", None if added is None else added <= limit,
                           "" if added is not None else "not measured"))
    g_t, d_t = _ttfb(results, "stream-c4", "gateway"), _ttfb(results, "stream-c4", "direct")
    added = round(g_t["p50"] - d_t["p50"], 3) if g_t and d_t else None
    out.append(_target("gateway time to first content byte added over direct, streamed c=4, p50 (ms)", added,
                       "≤ 1 ms", None if added is None else added <= 1.0,
                       f"p99 added {round(g_t['p99'] - d_t['p99'], 3)} ms" if g_t and d_t else "not measured"))
    hot, spread = hot_and_spread(results, args)
    name = f"one hot account / {args.spread_accounts} accounts, gateway throughput, non-streamed c=32"
    if hot and spread and spread["rps"] > 0:
        ratio = round(hot["rps"] / spread["rps"], 3)
        out.append(_target(name, ratio, "≥ 0.95 (within 5 %)", ratio >= 0.95,
                           f"{hot['rps']:,.0f} vs {spread['rps']:,.0f} rps"))
    else:
        out.append(_target(name, None, "≥ 0.95 (within 5 %)", None,
                           "not measured" + ("" if args.spread_accounts else " (--spread-accounts 0)")))
    out.append(_peer_target(results, args, gw))
    return out


def _peer_target(results: dict[str, Any], args: argparse.Namespace, gw: dict[str, Any] | None) -> TargetResult:
    name = "gateway / LiteLLM throughput, non-streamed c=32"
    if not args.peer:
        return {**_target(name, None, "≥ 30×", None, "needs --peer: `make bench-peer`"), "verdict": "not run"}
    lt = _row(results, "chat-c32", "litellm")
    if gw and lt and lt["rps"] > 0:
        ratio = round(gw["rps"] / lt["rps"], 2)
        return _target(name, ratio, "≥ 30×", ratio >= 30)
    why = results.get("peer", {}).get("error") or "not measured"
    return _target(name, None, "≥ 30×", None, why[:200])


def settle_profile_lines(profile: dict[str, Any] | None) -> list[str]:
    """The settlement statement by statement (benchmarks.ledger_bench.settle_profile) as report lines."""
    if not profile:
        return []
    lines = ["", "### The settlement, statement by statement", ""]
    if "error" in profile:
        return [*lines, f"Not measured: {profile['error']}"]
    lines.append(
        f"`LedgerStore._lease_finish_many` (the statement the gateway sends per batch) at fixed batch sizes, "
        f"{profile['inflight']} batch(es) in flight (the store's batcher sends one per lease shard), "
        f"{profile['accounts']} account(s) settling "
        "against their lease, ~1 KB receipts, on a durable cluster of its own with pg_stat_statements preloaded "
        "(off for the rate and CPU, `track = all` for the statements: nested ones — inside plpgsql functions "
        "and triggers — are counted, and a top-level statement's time includes theirs).")
    for size, row in (profile.get("sizes") or {}).items():
        tracked = row.get("tracked") or {}
        lines += ["", f"**Batch of {size}** (c={'4' if size == '1' else '32'}-like): {_fmt(row['settles_per_s'])} "
                      f"settles/s, PostgreSQL CPU {row['postgres_cpu_ms_per_settle']} ms per settle (its "
                      f"backends alone {row.get('backend_cpu_ms_per_settle')} ms) "
                      f"({row['settles']:,} settles, {row['errors']} errors); with statement tracking "
                      f"{_fmt(tracked.get('settles_per_s'))} settles/s.", ""]
        before = row.get("before")
        if before:
            lines[-1:-1] = [f"Same run, alternating slices, on a database migrated only up to "
                            f"{profile.get('compare_upto'):04d}: {_fmt(before['settles_per_s'])} settles/s, "
                            f"PostgreSQL CPU {before['postgres_cpu_ms_per_settle']} ms per settle (its backends "
                            f"alone {before.get('backend_cpu_ms_per_settle')} ms).", ""]
        lines += pgstats.statements_table(tracked.get("statements") or [])
        explain = tracked.get("explain")
        if explain:
            lines += ["", f"<details><summary>EXPLAIN (ANALYZE, BUFFERS, WAL) of one batch of {size}, and the "
                          f"plans of the {len(explain['nested'])} statements it ran</summary>", "", "```",
                      explain["plan"], *[n.strip() + "\n" for n in explain["nested"]], "```", "", "</details>"]
    return lines


def _ledger_targets(results: dict[str, Any], args: argparse.Namespace) -> list[TargetResult]:
    out: list[TargetResult] = []
    gw = _row(results, "chat-c32", "gateway")
    commits = (gw or {}).get("pg_commits") or {}
    name = "PostgreSQL commits per proxied request, gateway non-streamed c=32"
    if "commits_per_request" in commits:
        value = commits["commits_per_request"]
        out.append(_target(name, value, "≤ 0.3", value <= 0.3,
                           f"{commits['window_commits']:,} commits / {commits['window_requests']:,} requests "
                           f"in a {commits['window_s']} s window"))
    else:
        out.append(_target(name, None, "≤ 0.3", None, commits.get("error", "not measured")))
    for scenario, limit in (("chat-c4", 0.5), ("chat-c32", 0.15)):
        row = _row(results, scenario, "gateway")
        name = f"PostgreSQL CPU per proxied request, gateway non-streamed c={scenario[6:]} (ms)"
        if row and row.get("pg_cpu_s_per_1k") is not None:
            value = round(row["pg_cpu_s_per_1k"], 3)
            out.append(_target(name, value, f"≤ {limit:g} ms", value <= limit))
        else:
            out.append(_target(name, None, f"≤ {limit:g} ms", None, "not measured"))
    ledger = results.get("ledger", {})
    name = "ledger settles per second (reserve + finish, ledger only, durable)"
    if "settles_per_s" in ledger:
        ok = ledger["settles_per_s"] >= 8000 and ledger["errors"] == 0
        out.append(_target(name, ledger["settles_per_s"], "≥ 8,000", ok,
                           f"{ledger['settled']} settles, {ledger['errors']} errors"))
    else:
        out.append(_target(name, None, "≥ 8,000", None, ledger.get("skipped") or ledger.get("error", "")[:200]))
    return out


def _stream_targets(results: dict[str, Any]) -> list[TargetResult]:
    s = results.get("streams", {})
    name, target = "concurrent open streams held by one worker", f"{STREAMS_TARGET:,}, RSS < 400 MB, no errors"
    if "peak_open" not in s:
        return [_target(name, None, target, None, s.get("skipped") or s.get("error", "")[:300])]
    ok = (s["errors"] == 0 and s["completed"] == s["n"] and s["gateway_peak_rss_mb"] < 400
          and s["peak_open"] >= s["n"])  # all N streaming at the same moment, not only sent
    note = (f"N={s['n']:,}, held at once {s['peak_inflight']:,} (streaming {s['peak_open']:,}), "
            f"{s['errors']} errors, peak RSS {s['gateway_peak_rss_mb']} MB, "
            f"{s.get('kb_per_open_stream')} kB per open stream")
    if s["n"] < STREAMS_TARGET:
        note += f" (N below {STREAMS_TARGET:,}: target not evaluated)"
    return [_target(name, s["n"], target, ok if s["n"] >= STREAMS_TARGET else None, note)]


_ENTRY_FRAMES = ("Runner.run (", "_run_code (", "_run_module_as_main (", "main (tokensforge", "<module> (",
                 "_dispatch (tokensforge", "run (uvloop")


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    v = m["versions"]
    pin = m["pinning"]
    lines = [
        f"# Tokens Forge benchmark — {m['date']}",
        "",
        f"- **Command**: `{m['command']}` at commit {m.get('git', 'unknown')}"
        + (f"; `gateway-base` rows: commit {m['baseline']}" if m.get("baseline") else ""),
        f"- **Machine**: {m['cpu_count']} CPUs, {m['cpu_model']}; {m['os']}",
        (f"- **Software**: Python {m['python']}, aiohttp {v['aiohttp']}, asyncpg {v['asyncpg']}, "
        f"uvloop {v['uvloop']}, orjson {v['orjson']}, {v['postgresql']}, {v['wrk']}"),
        (f"- **Pinning**: system under test on CPU {pin['system_under_test']}; wrk, the backend "
        f"mock-upstream and PostgreSQL on CPU {pin['wrk_backend_upstream_postgres']}; "
        f"gateway workers: {pin['gateway_workers']}"),
        f"- **Load**: wrk rotates over {m['accounts']} funded account(s), one key each"
        + (" (every gateway request hits the same account's bucket row)" if m["accounts"] == 1 else ""),
        (f"- **Per scenario**: {m['warmup_s']} s warm-up (not recorded) + {m['duration_s']} s measured, "
        "all targets in the same run, one after another"),
        _durability_line(results),
        "- **Targets**: the table at the end (issue #17's targets, met or missed)",
        "",
        "## HTTP scenarios (wrk)",
        "",
        ("`chat` = non-streamed completion (max_tokens 20); `stream` = streamed, 20 content chunks + usage "
        "chunk. Latency is wrk's, per complete response. Errors = non-2xx + socket errors + failed "
        "preflight. CPU = utime+stime of the system-under-test process per 1,000 requests; "
        "SUT core busy = that CPU time / wall time (100% = one core saturated); PostgreSQL CPU = the "
        "whole cluster's, per 1,000 gateway requests."),
        "",
        ("| scenario | target | rps | rps / passthrough | p50 ms | p90 ms | p99 ms | errors | CPU s / 1k req "
        "| SUT core busy | PostgreSQL CPU s / 1k req |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        if "rps" not in row:
            lines.append(f"| {row['scenario']} | {row['target']} | error: {row.get('error', '')[:120]} "
                         "| | | | | | | | |")
            continue
        pt = _row(results, row["scenario"], "passthrough")
        rel = round(row["rps"] / pt["rps"], 2) if pt and pt["rps"] else None
        flag = "" if row.get("preflight") == "ok" else f" (preflight: {row.get('preflight')})"
        lines.append(
            f"| {row['scenario']} | {row['target']} | {_fmt(row['rps'])} | {_fmt(rel, 2)} | "
            f"{_fmt(row['p50_ms'], 2)} | {_fmt(row['p90_ms'], 2)} | {_fmt(row['p99_ms'], 2)} | "
            f"{row['errors']}{flag} | {_fmt(row['cpu_s_per_1k'], 3)} | "
            f"{_fmt(round(100 * row['cpu_util']) if row.get('cpu_util') is not None else None)}% | "
            f"{_fmt(row.get('pg_cpu_s_per_1k'), 3)} |")
    lines += ["", "## Latency added over direct (non-streamed and streamed, c=4; c=1 when measured)", "",
              "| scenario | target | p50 added ms | p99 added ms |", "|---|---|---:|---:|"]
    probe = (results.get("durability") or {}).get("commit_ms")
    if probe:
        lines.insert(-2, (f"The disk beside it: a one-row commit (INSERT, its own transaction, waiting for the WAL "
                          f"flush) takes p50 {probe['p50']} ms, p99 {probe['p99']} ms on this machine's durable "
                          "PostgreSQL — at c=4 a settlement commits alone, so that much of the gateway's added "
                          "latency is the disk's.\n"))
    for scenario in ("chat-c1", "stream-c1", "chat-c4", "stream-c4"):
        d = _row(results, scenario, "direct")
        for name in ("passthrough", "gateway", "gateway-base", "gateway-nondurable", "litellm"):
            r = _row(results, scenario, name)
            if d and r:
                lines.append(f"| {scenario} | {name} | {_fmt(round(r['p50_ms'] - d['p50_ms'], 3), 3)} | "
                             f"{_fmt(round(r['p99_ms'] - d['p99_ms'], 3), 3)} |")
    lines += _render_tracing(results)
    peer_rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for sc in ALL_SCENARIOS:
        g, lt = _row(results, sc, "gateway"), _row(results, sc, "litellm")
        if g and lt and lt["rps"] > 0:
            peer_rows.append((sc, g, lt))
    if peer_rows:
        lines += ["", "## Gateway vs LiteLLM, per scenario", "",
                  "| scenario | throughput ratio (gateway / LiteLLM) | CPU per request ratio (LiteLLM / gateway) |",
                  "|---|---:|---:|"]
        for sc, g, lt in peer_rows:
            cpu = (round(lt["cpu_s_per_1k"] / g["cpu_s_per_1k"], 1)
                   if lt.get("cpu_s_per_1k") and g.get("cpu_s_per_1k") else None)
            lines.append(f"| {sc} | {_fmt(round(g['rps'] / lt['rps'], 1))}× | {_fmt(cpu)}× |")
    led = results.get("ledger", {})
    lines += ["", "## Ledger only", ""]
    if "settles_per_s" in led:
        lines.append(
            f"{_fmt(led['settles_per_s'])} settles/s: {led['settled']:,} × (`Wallet.reserve` — carved from a "
            f"lease — + `Wallet.finish` with a usage record, as the gateway does) by {led['concurrency']} tasks over "
            f"{led['accounts']} accounts through a {led['pool_size']}-connection pool in {led['elapsed_s']} s; "
            f"per settle p50 {led['latency_ms']['p50']} ms, p99 {led['latency_ms']['p99']} ms; "
            f"errors {led['errors']}; books balance: {led['books_balance']}; client CPU "
            f"{led['client_cpu_s']} s, PostgreSQL CPU {led.get('postgres_cpu_ms_per_settle')} ms per settle. "
            "PostgreSQL and the client unpinned (both cores) for this part.")
        per = led.get("per_request_reservations") or {}
        if "settles_per_s" in per:
            lines.append(f"With leases off (a reservation round trip before each settlement): "
                         f"{_fmt(per['settles_per_s'])} settles/s, p50 {per['latency_ms']['p50']} ms, "
                         f"errors {per['errors']}.")
        grants = led.get("lease_grants") or {}
        if "grants_per_s" in grants:
            lines.append(f"Leases taken (`tf_lease_grow`, each a new lease): {_fmt(grants['grants_per_s'])} per second "
                         f"({grants['grants']:,} in {grants['elapsed_s']} s, {grants['refused']} refused).")
        funcs = led.get("functions") or {}
        if funcs:
            lines.append("Server-side mean time per call: " + ", ".join(
                f"`{name}` {f['mean_ms']} ms" for name, f in funcs.items() if name != "tf_topup") + ".")
    else:
        lines.append(f"Not measured: {led.get('skipped') or led.get('error')}")
    lines += settle_profile_lines(led.get("settle_profile"))
    s = results.get("streams", {})
    lines += ["", "## Many concurrent streams (one gateway worker)", ""]
    if "peak_open" in s:
        lines.append(
            f"{s['n']:,} streams opened over {s['ramp_s']} s against a mock that waits "
            f"{s['chunk_delay_ms']} ms between its 20 chunks: completed {s['completed']:,}; "
            f"held at once {s['peak_inflight']:,} (requests sent, answer not finished), of them streaming "
            f"at once {s['peak_open']:,}; errors {s['errors']} {s.get('error_kinds') or ''}; "
            f"gateway RSS {s['gateway_rss_before_mb']} MB before, peak (VmHWM) {s['gateway_peak_rss_mb']} MB "
            f"({s.get('kb_per_open_stream')} kB per stream held); open-file limit {s.get('nofile_limit')}; "
            f"listen-backlog overflows meanwhile (system-wide `ListenOverflows`) {s.get('listen_overflows')}; "
            f"gateway CPU {s['gateway_cpu_s']} s; first byte p50 {s['first_byte_ms']['p50']} ms / "
            f"p99 {s['first_byte_ms']['p99']} ms; whole stream p50 {s['stream_ms']['p50']} ms / "
            f"p99 {s['stream_ms']['p99']} ms; took {s['elapsed_s']} s.")
    else:
        lines.append(f"Not measured: {s.get('skipped') or s.get('error')}")
    lc = results.get("ledger_check")
    if lc:
        lines += ["", "## Ledger check after the HTTP scenarios", "",
                  (f"usage records by status {lc['usage_records_by_status']}, open reservations "
                  f"{lc['open_reservations']}, gateway requests counted by wrk "
                  f"{lc['gateway_requests_counted_by_wrk']:,} (records also include warm-up, preflight and "
                  "requests in flight when wrk stopped). "
                  f"Leases still held by the running gateway: {lc.get('open_leases', 0)} "
                  f"({lc.get('leased_nanos', 0):,} nano-USD; given back after 5 s idle).")]
        if lc["open_reservations"]:
            lines.append(f"\n**{lc['open_reservations']} reservations were still open** at least 5 s after the "
                         "last gateway request: requests that wrk cut off when it stopped, whose reservation "
                         "was not voided; they hold money until the sweeper's TTL "
                         "(`TOKENSFORGE_RESERVATION_TTL_S`, 600 s).")
    lines += _render_new_scenarios(results)
    for key, scenario in (("profile", "chat-c32"), ("profile_stream", "stream-c32")):
        lines += _render_profile(results.get(key), scenario)
    p = results.get("peer", {})
    if p.get("requested"):
        lines += ["", "## Peer", "",
                  f"LiteLLM {p.get('version', '?')}: {p.get('status')}"
                  + (f" — {p['error'][:500]}" if p.get("error") else "")
                  + (f"; `{p['command']}`" if p.get("command") else "")]
    lines += render_targets(results["targets"])
    return "\n".join(lines) + "\n"


def _render_tracing(results: dict[str, Any]) -> list[str]:
    pairs = [(r["scenario"], _row(results, r["scenario"], "gateway"), r) for r in results["rows"]
             if r["target"] == "gateway-traced" and "rps" in r]
    pairs = [(sc, off, on) for sc, off, on in pairs if off is not None]
    if not pairs:
        return []
    lines = ["", "## Tracing (OpenTelemetry, OTLP/HTTP to a local sink)", "",
             ("Off (the `gateway` rows) nothing is created per request: one flag is read. On, every request "
              "exports a server span and its children (admission, hold, each upstream attempt, settlement)."),
             "", "| scenario | rps off | rps on | on / off | CPU s / 1k off | CPU s / 1k on | CPU µs added / request |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for sc, off, on in pairs:
        added = (round((on["cpu_s_per_1k"] - off["cpu_s_per_1k"]) * 1000)
                 if on.get("cpu_s_per_1k") is not None and off.get("cpu_s_per_1k") is not None else None)
        lines.append(f"| {sc} | {_fmt(off['rps'])} | {_fmt(on['rps'])} | {_fmt(round(on['rps'] / off['rps'], 2), 2)} "
                     f"| {_fmt(off['cpu_s_per_1k'], 3)} | {_fmt(on['cpu_s_per_1k'], 3)} | {_fmt(added, 0)} |")
    return lines


def _render_profile(prof: dict[str, Any] | None, scenario: str) -> list[str]:
    if not prof:
        return []
    lines = ["", f"## Where the time goes (py-spy, gateway, {scenario})", ""]
    if "self" in prof:
        lines += [(f"{prof['samples']:,} samples of the busy gateway process (idle event-loop waits "
                  "excluded; time in uvloop's C code shows as `Runner.run`); raw stacks in "
                  f"`{Path(prof['raw_stacks']).name}` next to this report."), "",
                  "| self % | function |", "|---:|---|"]
        lines += [f"| {pc} | `{name}` |" for name, pc in prof["self"][:15]]
        lines += ["", "| share % | component (first match on the stack) |", "|---:|---|"]
        lines += [f"| {pc} | {name} |" for name, pc in prof.get("groups", [])]
        lines += ["", "| inclusive % | function |", "|---:|---|"]
        below = [(name, pc) for name, pc in prof["inclusive"] if not name.startswith(_ENTRY_FRAMES)]
        lines += [f"| {pc} | `{name}` |" for name, pc in below[:20]]
    else:
        lines.append(f"Not profiled: {prof.get('skipped') or prof.get('error')}")
    return lines


def _durability_line(results: dict[str, Any]) -> str:
    d = results.get("durability") or {}
    settings = d.get("settings") or {}
    if not settings:
        return f"- **PostgreSQL**: durability not checked ({d.get('error', 'no probe')})"
    durable = all(settings.get(k) == "on" for k in ("fsync", "synchronous_commit", "full_page_writes"))
    said = ", ".join(f"{k}={v}" for k, v in settings.items())
    extra = ("; the `gateway-nondurable` rows use a second cluster with fsync, synchronous_commit and "
             "full_page_writes off (labelled, never a headline figure)"
             if any(r.get("target") == "gateway-nondurable" for r in results["rows"]) else "")
    probe = d.get("commit_ms") or {}
    return (f"- **PostgreSQL**: **{'durable' if durable else 'NOT durable'}** ({said}, read with SHOW); "
            f"one-row commit p50 {probe.get('p50')} ms, p99 {probe.get('p99')} ms{extra}")


def render_targets(targets: list[TargetResult]) -> list[str]:
    lines = ["", "## Targets (issue #17; durable PostgreSQL)", "", "| metric | value | target | result |",
             "|---|---:|---|---|"]
    for t in targets:
        verdict = t.get("verdict") or {True: "**met**", False: "**missed**", None: "not evaluated"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        digits = 3 if isinstance(t["value"], float) and abs(t["value"]) < 10 else 1
        lines.append(f"| {t['name']} | {_fmt(t['value'], digits)} | {t['target']} | {verdict}{note} |")
    return lines


def _render_new_scenarios(results: dict[str, Any]) -> list[str]:
    """Time to first content byte, PostgreSQL per request, and one hot account vs many."""
    lines = ["", "## Time to first content byte (streamed, benchmarks/ttfb_bench.py)", "",
             ("From just before the request is written to the first SSE event with non-empty `delta.content`, "
              "by an asyncio client at the scenario's concurrency on the load core; added = target − direct. "
              "Client core busy near 100 % means the client, not the target, set the pace."), "",
             "| scenario | target | requests | errors | p50 ms | p99 ms | p50 added ms | p99 added ms "
             "| client core busy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        t = row.get("ttfb")
        if not t:
            continue
        if "ttfb_ms" not in t:
            lines.append(f"| {row['scenario']} | {row['target']} | error: {t.get('error', '')[:150]} "
                         "| | | | | | |")
            continue
        d = _ttfb(results, row["scenario"], "direct") if row["target"] != "direct" else None
        ms = t["ttfb_ms"]
        p50_added = round(ms["p50"] - d["p50"], 3) if d and ms["p50"] is not None else None
        p99_added = round(ms["p99"] - d["p99"], 3) if d and ms["p99"] is not None else None
        busy = round(100 * t["client_cpu_util"]) if t.get("client_cpu_util") is not None else None
        lines.append(f"| {row['scenario']} | {row['target']} | {_fmt(t['requests'])} | {t['errors']} "
                     f"| {_fmt(ms['p50'], 2)} | {_fmt(ms['p99'], 2)} | {_fmt(p50_added, 2)} "
                     f"| {_fmt(p99_added, 2)} | {_fmt(busy)}% |")
    lines += ["", "## PostgreSQL per proxied request (gateway rows)", "",
              ("Commits: `pg_stat_database.xact_commit` of the gateway's database over a window inside the "
               "measured run, divided by the gateway's `tokensforge_requests_total` over the same window "
               "(benchmarks/pgstats.py explains why not before/after). CPU: utime + stime of the postmaster "
               "and all its children over the whole run, per request wrk counted."), "",
              "| scenario | target | commits / request | window s | commits | requests | PostgreSQL CPU ms / request |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        c = row.get("pg_commits")
        if c is None:
            continue
        if "error" in c:
            lines.append(f"| {row['scenario']} | {row['target']} | error: {c['error'][:150]} | | | | |")
            continue
        lines.append(f"| {row['scenario']} | {row['target']} | {_fmt(c.get('commits_per_request'), 3)} "
                     f"| {c['window_s']} | {_fmt(c['window_commits'])} | {_fmt(c['window_requests'])} "
                     f"| {_fmt(row.get('pg_cpu_s_per_1k'), 3)} |")
    return lines + _render_accounts(results)


def _render_accounts(results: dict[str, Any]) -> list[str]:
    args = argparse.Namespace(accounts=results["meta"]["accounts"],
                              spread_accounts=results["meta"].get("spread_accounts", 16))
    hot, spread = hot_and_spread(results, args)
    if not hot or not spread:
        return []
    ratio = round(hot["rps"] / spread["rps"], 3) if spread["rps"] else None
    return ["", f"## One hot account vs {args.spread_accounts} accounts (gateway, chat-c32)", "",
            (f"The same wrk load right after the one-account row, over {args.spread_accounts} funded accounts "
             "(one key each, wrk rotating): "
             f"{_fmt(hot['rps'])} rps on one account vs {_fmt(spread['rps'])} rps over {args.spread_accounts}, "
             f"ratio {_fmt(ratio, 3)} (target ≥ 0.95); p50 {_fmt(hot['p50_ms'], 2)} vs "
             f"{_fmt(spread['p50_ms'], 2)} ms, p99 {_fmt(hot['p99_ms'], 2)} vs {_fmt(spread['p99_ms'], 2)} ms.")]


def write_results(results: dict[str, Any], out: Path, stamp: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stamp}.json", out / f"{stamp}.md"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    md = render_markdown(results)
    md_path.write_text(md, encoding="utf-8")
    (out / "latest.md").write_text(md, encoding="utf-8")
    return json_path, md_path


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind through every finally (processes stopped, PostgreSQL removed)."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="tokensforge-bench-"))
    ok = False
    try:
        with _sigterm_as_exit():
            results = run(args, log_dir)
            json_path, md_path = write_results(results, args.out, results["meta"]["stamp"])
            ok = True
    except BenchError as exc:
        print(f"benchmarks: {exc}\n(logs kept in {log_dir})", file=sys.stderr)
        return 2
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif not ok:
            print(f"benchmarks: logs kept in {log_dir}", file=sys.stderr)
    print(md_path.read_text(encoding="utf-8"))
    print(f"results: {json_path} and {md_path} (copied to {args.out / 'latest.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
