"""Benchmark harness: `python -m benchmarks.run [--quick] [--peer] [--duration S] [--scenarios ...] [--out DIR]`.

One run starts everything it measures on loopback and stops it again:

  throwaway PostgreSQL ─ ledger-only benchmark (LedgerStore.reserve + finish, many tasks)
  mock-upstream (direct target, core 0)        ◄─ wrk (core 1)
  passthrough → mock-upstream (backend, core 1) ◄─ wrk
  gateway     → mock-upstream (backend)         ◄─ wrk
  LiteLLM     → mock-upstream (backend)         ◄─ wrk            (--peer)
  gateway (fresh) → slow mock-upstream          ◄─ N concurrent streams (benchmarks.streams_bench)

and writes benchmarks/results/<timestamp>.json, <timestamp>.md and latest.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokensforge.embedded_pg import EmbeddedPostgres

from . import peer, profile_summary
from .common import (
    BENCH_DIR,
    REPO,
    BenchError,
    Proc,
    cpu_count,
    cpu_model,
    cpu_seconds,
    ensure_wrk,
    free_port,
    http_json,
    os_name,
    pin_plan,
    pkg_version,
    postgres_version,
    raise_nofile,
    run_capture,
    set_affinity_tree,
    status_kb,
    wrk_version,
)

ADMIN_TOKEN = "adm-bench-" + os.urandom(8).hex()
UPSTREAM_KEY = "sk-bench-upstream"
FUND_NANOS = 10**15
WRK_DIR = BENCH_DIR / "wrk"

ALL_SCENARIOS = ("chat-c4", "chat-c32", "chat-c128", "stream-c4", "stream-c32", "stream-c128")
QUICK_SCENARIOS = ("chat-c4", "chat-c32", "stream-c4", "stream-c32")
BASE_TARGETS = ("direct", "passthrough", "gateway")

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
    token: str = ""  # bearer token; the bench keys when empty


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="~3 s per scenario, c=4 and c=32 only, no peer, 300 streams, short ledger run")
    p.add_argument("--peer", action="store_true", help="also measure LiteLLM's proxy (installed on demand)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured wrk run (10; quick 3)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded wrk run before each (2; quick 0.5)")
    p.add_argument("--scenarios", nargs="+", choices=ALL_SCENARIOS, default=None,
                   help="subset of scenarios (default: all; quick: c=4 and c=32)")
    p.add_argument("--targets", nargs="+", choices=(*BASE_TARGETS, "litellm"), default=None,
                   help="subset of targets (default: direct passthrough gateway [+ litellm with --peer])")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument("--accounts", type=int, default=1,
                   help="funded accounts (one key each) that wrk rotates through (default 1: one hot account)")
    p.add_argument("--streams", type=int, default=None, help="many-streams N (5000; quick 300; 0 skips)")
    p.add_argument("--stream-chunk-delay-ms", type=int, default=None,
                   help="slow upstream's delay between chunks for the many-streams test (1000; quick 250)")
    p.add_argument("--ledger-ops", type=int, default=None, help="ledger benchmark ops (10000; quick 1000; 0 skips)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results directory")
    p.add_argument("--profile", action="store_true",
                   help="also profile the gateway with py-spy (if installed) during an extra, unrecorded "
                        "chat-c32 run; the summary goes into the results")
    p.add_argument("--keep-logs", action="store_true", help="keep the process logs even on success")
    args = p.parse_args(argv)
    if args.quick and args.peer:
        p.error("--quick runs no peer; drop one of --quick/--peer")
    args.duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    args.scenarios = args.scenarios or list(QUICK_SCENARIOS if args.quick else ALL_SCENARIOS)
    args.targets = args.targets or [*BASE_TARGETS, *(["litellm"] if args.peer else [])]
    if "litellm" in args.targets and not args.peer:
        p.error("target litellm needs --peer")
    args.streams = args.streams if args.streams is not None else (300 if args.quick else 5000)
    args.stream_chunk_delay_ms = (args.stream_chunk_delay_ms if args.stream_chunk_delay_ms is not None
                                  else (250 if args.quick else 1000))
    args.ledger_ops = args.ledger_ops if args.ledger_ops is not None else (1000 if args.quick else 10000)
    if args.duration <= 0 or args.workers < 1 or args.streams < 0 or args.ledger_ops < 0 or args.accounts < 1:
        p.error("--duration must be > 0, --workers and --accounts >= 1, --streams and --ledger-ops >= 0")
    return args


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
        self.keys: list[str] = []
        self.wrk = ""
        self.notes: list[str] = []
        self.stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    # ---------------------------------------------------------------- processes

    def start(self, name: str, args: list[str], *, cpus: set[int] | None,
              env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, log_dir=self.log_dir, cpus=cpus, env=env, nofile=self.nofile, cwd=REPO)
        self.procs.append(proc)
        self.stack.callback(proc.stop)
        return proc

    def start_mock(self, name: str, cpus: set[int] | None, *extra: str) -> tuple[Proc, str]:
        port = free_port()
        proc = self.start(name, [self.python, "-m", "tokensforge", "mock-upstream", "--port", str(port),
                                 *extra], cpus=cpus)
        base = f"http://127.0.0.1:{port}"
        proc.wait_http(base + "/healthz", timeout_s=60)
        return proc, base

    def gateway_env(self) -> dict[str, str]:
        assert self.pg is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSFORGE_", "PROMETHEUS_"))}
        env.update({"TOKENSFORGE_DATABASE_URL": self.pg.dsn, "TOKENSFORGE_ADMIN_TOKEN": ADMIN_TOKEN,
                    "TF_BENCH_UPSTREAM_KEY": UPSTREAM_KEY})
        return env

    def start_gateway(self, name: str, upstream_base: str, workers: int) -> tuple[Proc, str]:
        catalog = self.log_dir / f"{name}-catalog.toml"
        catalog.write_text(CATALOG.format(upstream=upstream_base), encoding="utf-8")
        port = free_port()
        cpus = self.pins["sut"] if workers == 1 else None
        proc = self.start(name, [self.python, "-m", "tokensforge", "serve", "--config", str(catalog),
                                 "--port", str(port), "--workers", str(workers)],
                          cpus=cpus, env=self.gateway_env())
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(url + "/readyz", timeout_s=120)
        return proc, url

    # ---------------------------------------------------------------- PostgreSQL

    def start_postgres(self) -> None:
        pg = EmbeddedPostgres.throwaway()
        self.stack.callback(pg.close)
        pg.start()
        self.pg = pg
        pidfile = pg.cluster_dir / "postmaster.pid"
        self.pg_pid = int(pidfile.read_text().split()[0])
        self.pin_postgres(self.pins["load"])

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

    def wrk_run(self, url: str, mode: str, conc: int, seconds: float, tokens: list[str]) -> dict[str, Any]:
        threads = max(1, min(2, conc))
        script = WRK_DIR / ("stream.lua" if mode == "stream" else "chat.lua")
        cmd = [self.wrk, f"-t{threads}", f"-c{conc}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
               "-s", str(script), url, "--", *tokens]
        proc = run_capture(cmd, timeout_s=seconds + 90, cpus=self.pins["load"], nofile=self.nofile)
        for line in proc.stdout.splitlines():
            if line.startswith("WRK_JSON "):
                return dict(json.loads(line[len("WRK_JSON "):]))
        raise BenchError(f"wrk printed no result (exit {proc.returncode}):\n{proc.stdout[-1500:]}\n"
                         f"{proc.stderr[-1500:]}")

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
        tokens = [target.token] if target.token else self.keys
        row["preflight"] = self.preflight(target.url, mode, tokens[0])
        if self.args.warmup > 0:
            self.wait_idle(target)
            self.wrk_run(target.url, mode, conc, self.args.warmup, tokens)
        row["idle_wait_s"] = self.wait_idle(target)
        with_pg = target.name == "gateway" and self.pg_pid is not None
        pg0 = cpu_seconds(self.pg_pid, tree=True) if with_pg else 0.0  # type: ignore[arg-type]
        cpu0 = cpu_seconds(target.proc.pid, tree=target.cpu_tree)
        w = self.wrk_run(target.url, mode, conc, self.args.duration, tokens)
        cpu1 = cpu_seconds(target.proc.pid, tree=target.cpu_tree)
        pg1 = cpu_seconds(self.pg_pid, tree=True) if with_pg else 0.0  # type: ignore[arg-type]
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
        return row

    def profile(self, target: Target, scenario: str, out_dir: Path) -> dict[str, Any]:
        """py-spy (never required) samples the gateway during an extra, unrecorded wrk run."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            return {"skipped": "py-spy is not installed (pip install py-spy)"}
        mode, conc = scenario_parts(scenario)
        seconds = max(5.0, self.args.duration)
        raw = self.log_dir / "profile.txt"
        spy_proc = Proc("py-spy", [spy, "record", "-o", str(raw), "--format", "raw", "--pid",
                                   str(target.proc.pid), "--duration", str(int(seconds)), "--rate", "250",
                                   "--nonblocking"], log_dir=self.log_dir, cpus=self.pins["load"])
        try:
            time.sleep(0.5)
            self.wrk_run(target.url, mode, conc, seconds, [target.token] if target.token else self.keys)
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
                   "--concurrency", "64", "--accounts", "50", "--pool-size", "20",
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
        mock, base = self.start_mock("mock-slow", self.pins["load"], "--chunk-delay-ms", str(delay),
                                     "--completion-tokens", "20")
        gw, url = self.start_gateway("gateway-streams", base, workers=1)
        try:
            rss_before = status_kb(gw.pid, "VmRSS")
            per_stream_s = delay * 19 / 1000
            ramp_s = min(10.0, max(1.0, n / 500))
            timeout = ramp_s + per_stream_s + 180
            cmd = [self.python, "-m", "benchmarks.streams_bench", "--url", url, "--key", self.key, "--n", str(n),
                   "--ramp-s", str(ramp_s), "--stream-timeout-s", str(per_stream_s + 120)]
            cpu0 = cpu_seconds(gw.pid)
            proc = run_capture(cmd, timeout_s=timeout, cpus=self.pins["load"], nofile=self.nofile, cwd=REPO)
            cpu1 = cpu_seconds(gw.pid)
            result: dict[str, Any] = {"chunk_delay_ms": delay, "completion_tokens": 20, "ramp_s": ramp_s}
            for line in proc.stdout.splitlines():
                if line.startswith("STREAMS_JSON "):
                    result.update(json.loads(line[len("STREAMS_JSON "):]))
                    break
            else:
                result.update(n=n, errors=n, error=f"streams_bench exit {proc.returncode}: {proc.stderr[-1500:]}")
            result.update(gateway_rss_before_mb=round(rss_before / 1024, 1),
                          gateway_peak_rss_mb=round(status_kb(gw.pid, "VmHWM") / 1024, 1),
                          gateway_cpu_s=round(cpu1 - cpu0, 2), gateway_alive=gw.alive())
            return result
        finally:
            gw.stop()
            mock.stop()

    def ledger_check(self, gateway_requests: int) -> dict[str, Any]:
        """Did every gateway request reach the ledger? (wrk's cut-off in-flight requests add a few.)"""
        import asyncio

        import asyncpg

        assert self.pg is not None

        async def q() -> dict[str, Any]:
            conn = await asyncpg.connect(self.pg.dsn)  # type: ignore[union-attr]
            try:
                for _ in range(50):  # requests cut when wrk stopped are still being resolved
                    if not await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'"):
                        break
                    await asyncio.sleep(0.1)
                rows = await conn.fetch("SELECT status, count(*) AS n, sum(charge_nanos) AS charged"
                                        " FROM usage_records GROUP BY status ORDER BY status")
                open_left = await conn.fetchval("SELECT count(*) FROM reservations WHERE status = 'open'")
            finally:
                await conn.close()
            return {"usage_records_by_status": {r["status"]: r["n"] for r in rows},
                    "charged_nanos": int(sum((r["charged"] or 0) for r in rows)),
                    "open_reservations": int(open_left)}

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

        results["peer"] = {"requested": False}
        if args.peer:
            log("LiteLLM: install (first time only) and start")
            target, results["peer"] = h.peer_stage(backend_url)
            if target is not None:
                targets["litellm"] = target
            else:
                log(f"LiteLLM unavailable: {results['peer'].get('error', '')[:300]}")

        order = [t for t in args.targets if t in targets]
        for scenario in args.scenarios:
            for name in order:
                log(f"{scenario} → {name}")
                try:
                    row = h.measure(scenario, targets[name])
                except BenchError as exc:
                    row = {"scenario": scenario, "target": name, "error": str(exc)[-2000:]}
                results["rows"].append(row)
                if args.profile and name == "gateway" and scenario == "chat-c32":
                    log("   profiling the gateway with py-spy (extra, unrecorded run)")
                    results["profile"] = h.profile(targets[name], scenario, args.out)
                if "rps" in row:
                    log(f"   {row['rps']} rps  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
                        f"errors {row['errors']}  cpu/1k {row['cpu_s_per_1k']} s  ({row['preflight']})")
                else:
                    log(f"   error: {row.get('error', '')[:300]}")

        gateway_requests = sum(r.get("requests", 0) for r in results["rows"] if r["target"] == "gateway")
        results["ledger_check"] = h.ledger_check(gateway_requests)
        if "litellm" in targets:
            targets["litellm"].proc.stop()  # free the core for the streams test

        log(f"many-streams benchmark (N={args.streams})")
        results["streams"] = h.streams_stage()
        results["meta"]["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        results["meta"]["notes"] = h.notes
    results["targets"] = evaluate(results, args)
    return results


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _git_describe() -> str:
    """The commit measured, and whether the package had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tokensforge"], cwd=REPO,
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
        "duration_s": args.duration, "warmup_s": args.warmup, "quick": args.quick,
        "nofile_limit": h.nofile,
    }


# --------------------------------------------------------------------------- targets and report


def _row(results: dict[str, Any], scenario: str, target: str) -> dict[str, Any] | None:
    for row in results["rows"]:
        if row.get("scenario") == scenario and row.get("target") == target and "rps" in row:
            return dict(row)
    return None


def evaluate(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, met: bool | None, note: str = "") -> None:
        out.append({"name": name, "value": value, "target": target, "met": met, "note": note})

    gw, pt = _row(results, "chat-c32", "gateway"), _row(results, "chat-c32", "passthrough")
    if gw and pt and pt["rps"] > 0:
        ratio = round(gw["rps"] / pt["rps"], 3)
        add("gateway / passthrough throughput, non-streamed c=32", ratio, "≥ 0.60", ratio >= 0.60)
    else:
        add("gateway / passthrough throughput, non-streamed c=32", None, "≥ 0.60", None, "not measured")
    if gw and pt and gw.get("cpu_s_per_1k") and pt.get("cpu_s_per_1k"):
        ratio = round(pt["cpu_s_per_1k"] / gw["cpu_s_per_1k"], 3)
        add("(info) CPU-bound throughput ratio = passthrough CPU per request / gateway CPU per request, "
            "non-streamed c=32", ratio, "≥ 0.60", ratio >= 0.60,
            "what the throughput ratio becomes once both are CPU-bound on one core")
    gw4, d4 = _row(results, "chat-c4", "gateway"), _row(results, "chat-c4", "direct")
    if gw4 and d4:
        p50 = round(gw4["p50_ms"] - d4["p50_ms"], 3)
        p99 = round(gw4["p99_ms"] - d4["p99_ms"], 3)
        add("gateway p50 latency added over direct, non-streamed c=4 (ms)", p50, "≤ 1 ms", p50 <= 1.0)
        add("gateway p99 latency added over direct, non-streamed c=4 (ms)", p99, "≤ 3 ms", p99 <= 3.0)
    else:
        for which, t in (("p50", "≤ 1 ms"), ("p99", "≤ 3 ms")):
            add(f"gateway {which} latency added over direct, non-streamed c=4 (ms)", None, t, None,
                "not measured")
    if args.peer:
        lt = _row(results, "chat-c32", "litellm")
        if gw and lt and lt["rps"] > 0:
            ratio = round(gw["rps"] / lt["rps"], 2)
            add("gateway / LiteLLM throughput, non-streamed c=32", ratio, "≥ 10×", ratio >= 10)
        else:
            why = results.get("peer", {}).get("error") or "not measured"
            add("gateway / LiteLLM throughput, non-streamed c=32", None, "≥ 10×", None, why[:200])
    ledger = results.get("ledger", {})
    if "settles_per_s" in ledger:
        ok = ledger["settles_per_s"] >= 5000 and ledger["errors"] == 0
        add("ledger settles per second (reserve + finish)", ledger["settles_per_s"], "≥ 5,000", ok,
            f"{ledger['settled']} settles, {ledger['errors']} errors")
    else:
        add("ledger settles per second (reserve + finish)", None, "≥ 5,000", None,
            ledger.get("skipped") or ledger.get("error", "")[:200])
    s = results.get("streams", {})
    if "peak_open" in s:
        ok = (s["n"] >= 5000 and s["errors"] == 0 and s["completed"] == s["n"]
              and s["gateway_peak_rss_mb"] < 1024 and s["peak_inflight"] >= s["n"])
        note = (f"N={s['n']}, held at once {s['peak_inflight']} (of them streaming {s['peak_open']}), "
                f"{s['errors']} errors, peak RSS {s['gateway_peak_rss_mb']} MB")
        if s["n"] < 5000:
            note += " (N below 5,000: target not evaluated)"
        add("concurrent streams held by one worker", s["n"], "5,000, RSS < 1 GB, no errors",
            ok if s["n"] >= 5000 else None, note)
    else:
        add("concurrent streams held by one worker", None, "5,000, RSS < 1 GB, no errors", None,
            s.get("skipped") or s.get("error", "")[:200])
    return out


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
        f"- **Command**: `{m['command']}` at commit {m.get('git', 'unknown')}",
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
        "",
        "## Targets",
        "",
        "| metric | value | target | result |",
        "|---|---:|---|---|",
    ]
    for t in results["targets"]:
        verdict = {True: "**met**", False: "**missed**", None: "not evaluated"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        digits = 3 if isinstance(t["value"], float) and abs(t["value"]) < 10 else 1
        lines.append(f"| {t['name']} | {_fmt(t['value'], digits)}"
                     f" | {t['target']} | {verdict}{note} |")
    lines += [
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
    lines += ["", "## Latency added over direct (non-streamed and streamed, c=4)", "",
              "| scenario | target | p50 added ms | p99 added ms |", "|---|---|---:|---:|"]
    for scenario in ("chat-c4", "stream-c4"):
        d = _row(results, scenario, "direct")
        for name in ("passthrough", "gateway", "litellm"):
            r = _row(results, scenario, name)
            if d and r:
                lines.append(f"| {scenario} | {name} | {_fmt(round(r['p50_ms'] - d['p50_ms'], 3), 3)} | "
                             f"{_fmt(round(r['p99_ms'] - d['p99_ms'], 3), 3)} |")
    peer_rows = [(sc, _row(results, sc, "gateway"), _row(results, sc, "litellm")) for sc in ALL_SCENARIOS]
    peer_rows = [(sc, g, lt) for sc, g, lt in peer_rows if g and lt and lt["rps"] > 0]
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
            f"{_fmt(led['settles_per_s'])} settles/s: {led['settled']:,} × (`LedgerStore.reserve` + "
            f"`LedgerStore.finish` with a usage record) by {led['concurrency']} tasks over "
            f"{led['accounts']} accounts through a {led['pool_size']}-connection pool in {led['elapsed_s']} s; "
            f"per settle p50 {led['latency_ms']['p50']} ms, p99 {led['latency_ms']['p99']} ms; "
            f"errors {led['errors']}; books balance: {led['books_balance']}; client CPU "
            f"{led['client_cpu_s']} s, PostgreSQL CPU {led.get('postgres_cpu_ms_per_settle')} ms per settle. "
            "PostgreSQL and the client unpinned (both cores) for this part.")
        funcs = led.get("functions") or {}
        if funcs:
            lines.append("Server-side mean time per call: " + ", ".join(
                f"`{name}` {f['mean_ms']} ms" for name, f in funcs.items() if name != "tf_topup") + ".")
    else:
        lines.append(f"Not measured: {led.get('skipped') or led.get('error')}")
    s = results.get("streams", {})
    lines += ["", "## Many concurrent streams (one gateway worker)", ""]
    if "peak_open" in s:
        lines.append(
            f"{s['n']:,} streams opened over {s['ramp_s']} s against a mock that waits "
            f"{s['chunk_delay_ms']} ms between its 20 chunks: completed {s['completed']:,}; "
            f"held at once {s['peak_inflight']:,} (requests sent, answer not finished), of them streaming "
            f"at once {s['peak_open']:,}; errors {s['errors']} {s.get('error_kinds') or ''}; "
            f"gateway RSS {s['gateway_rss_before_mb']} MB before, peak (VmHWM) {s['gateway_peak_rss_mb']} MB; "
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
                  "requests in flight when wrk stopped).")]
        if lc["open_reservations"]:
            lines.append(f"\n**{lc['open_reservations']} reservations were still open** at least 5 s after the "
                         "last gateway request: requests that wrk cut off when it stopped, whose reservation "
                         "was not voided; they hold money until the sweeper's TTL "
                         "(`TOKENSFORGE_RESERVATION_TTL_S`, 600 s).")
    prof = results.get("profile")
    if prof:
        lines += ["", "## Where the time goes (py-spy, gateway, chat-c32)", ""]
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
    p = results.get("peer", {})
    if p.get("requested"):
        lines += ["", "## Peer", "",
                  f"LiteLLM {p.get('version', '?')}: {p.get('status')}"
                  + (f" — {p['error'][:500]}" if p.get("error") else "")
                  + (f"; `{p['command']}`" if p.get("command") else "")]
    return "\n".join(lines) + "\n"


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
