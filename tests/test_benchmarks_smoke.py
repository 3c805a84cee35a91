"""The benchmark harness runs end to end in a very short mode (benchmarks/README.md).

It starts its own PostgreSQL, upstreams, passthrough and gateway on loopback, drives them with
wrk (and the streamed rows with the first-byte client), and must stop everything again; here it
only has to work and report every part, not to be fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ensure_wrk

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120


def test_quick_benchmark_runs_and_reports_every_target(tmp_path: Path) -> None:
    ensure_wrk()  # the harness installs wrk itself when missing (apt-get); outside the timed run
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--duration", "1", "--warmup", "0.2",
           "--scenarios", "chat-c32", "stream-c4", "--spread-accounts", "2", "--ttfb-duration", "1",
           "--streams", "50", "--stream-chunk-delay-ms", "100", "--ledger-ops", "200", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSFORGE_", "PROMETHEUS_"))}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the harness unwinds: stops its processes and PostgreSQL
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise AssertionError(f"benchmark did not finish in {TIMEOUT_S} s:\n{output[-4000:]}") from None
    try:
        assert proc.returncode == 0, output[-4000:]
        results = sorted(out.glob("*.json"))
        assert len(results) == 1, list(out.iterdir())
        data = json.loads(results[0].read_text())
        rows = {(r["scenario"], r["target"]): r for r in data["rows"]}
        for scenario, target in [(s, t) for s in ("chat-c32", "stream-c4") for t in ("direct", "passthrough",
                                                                                     "gateway")]:
            row = rows[(scenario, target)]
            assert "error" not in row, row
            assert row["rps"] > 0, row
            assert row["preflight"] == "ok", row
            assert row["cpu_s_per_1k"] is not None and row["cpu_s_per_1k"] >= 0, row
            if target != "gateway":
                assert row["errors"] == 0, row
            if scenario == "stream-c4":  # first content byte, by the asyncio client
                assert row["ttfb"]["requests"] > 0 and row["ttfb"]["ttfb_ms"]["p50"] > 0, row["ttfb"]
                assert target == "gateway" or row["ttfb"]["errors"] == 0, row["ttfb"]
        for scenario in ("chat-c32", "stream-c4"):  # PostgreSQL per request, read while wrk ran
            pg = rows[(scenario, "gateway")]
            assert pg["pg_commits"]["window_requests"] > 0 and pg["pg_commits"]["commits_per_request"] >= 0, pg
            assert pg["pg_cpu_s_per_1k"] > 0, pg
        spread = rows[("chat-c32", "gateway-2acct")]  # the hot-account twin over two accounts
        assert spread["rps"] > 0 and spread["accounts"] == 2 and spread["preflight"] == "ok", spread
        assert data["ledger"]["settled"] == 200 and data["ledger"]["errors"] == 0, data["ledger"]
        profile = data["ledger"]["settle_profile"]  # the settlement statement by statement, batches of 1 and 16
        for size in ("1", "16"):
            assert profile["sizes"][size]["errors"] == 0 and profile["sizes"][size]["settles_per_s"] > 0, profile
            statements = profile["sizes"][size]["tracked"]["statements"]
            assert any("tf_lease_finish" in s["query"] and s["toplevel"] for s in statements), statements
            assert any(not s["toplevel"] for s in statements), "nested statements are counted (track = all)"
            assert "WAL:" in profile["sizes"][size]["tracked"]["explain"]["plan"]
        assert data["streams"]["completed"] == 50 and data["streams"]["errors"] == 0, data["streams"]
        assert data["streams"]["gateway_peak_rss_mb"] > 0 and data["streams"]["kb_per_open_stream"] > 0
        assert data["streams"]["listen_overflows"] >= 0, data["streams"]
        targets = {t["name"]: t for t in data["targets"]}
        assert len(targets) == 15, list(targets)
        measured = [n for n, t in targets.items() if t["value"] is not None]
        for needle in ("throughput, non-streamed c=32", "first content byte", "hot account", "commits", "CPU per",
                       "PostgreSQL CPU", "ledger settles"):
            assert any(needle in n for n in measured), (needle, measured)
        assert targets["gateway / LiteLLM throughput, non-streamed c=32"]["verdict"] == "not run"
        assert data["durability"]["settings"]["fsync"] == "on" and data["durability"]["commit_ms"]["p50"] > 0
        md = (out / "latest.md").read_text()
        assert "**durable**" in md, md[:1500]
        assert "| chat-c32 | gateway |" in md and "CPUs" in md and "wrk" in md
        assert "statement by statement" in md and "EXPLAIN (ANALYZE, BUFFERS, WAL)" in md
        assert md.rindex("## Targets") > md.rindex("## PostgreSQL per proxied request"), "targets table last"
    finally:
        for path in out.glob("*"):
            path.unlink()


def test_a_process_trees_cpu_keeps_what_exited_children_spent() -> None:
    """PostgreSQL's CPU per request is read from the postmaster's tree: a backend that exits mid-row (a
    pool replacing a connection) must not take its CPU out of the total."""
    from benchmarks.common import cpu_seconds

    before = cpu_seconds(os.getpid(), tree=True)
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    subprocess.run([sys.executable, "-c", burn], check=True)  # exits and is reaped before the reading below
    assert cpu_seconds(os.getpid(), tree=True) - before >= 0.25
