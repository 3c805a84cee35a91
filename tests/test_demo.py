"""`tokensforge demo` as a newcomer runs it: a real process, embedded PostgreSQL, the SDK."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import openai
import pytest

from tokensforge.demo import _secret_file
from tokensforge.embedded_pg import _chown, _server_account

from .harness import free_port
from .invariants import assert_ledger_invariants


class Demo:
    """`tokensforge demo` in a subprocess, run from `cwd` (default: ours); always stop() it."""

    def __init__(self, data_dir: Path, *, cwd: Path | None = None) -> None:
        self.data_dir = data_dir
        self.cwd = cwd
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.output = ""

    def start(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSFORGE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokensforge", "demo", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=self.cwd)
        deadline = time.monotonic() + 90
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output += line
            if "Press Ctrl-C" in line:
                return self._parse()
        self.stop()
        raise AssertionError(f"demo did not start:\n{self.output}")

    def _parse(self) -> dict[str, str]:
        found = {}
        for name, pattern in (("key", r"API key\s+(tf-\S+)"), ("admin", r"Admin token\s+(\S+)"),
                              ("playground", r"Playground\s+(\S+)"),
                              ("balances", r"balances are kept in (.+)\)\.$")):
            match = re.search(pattern, self.output, re.MULTILINE)
            assert match, self.output
            found[name] = match.group(1)
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def demo_dir():
    path = Path(tempfile.mkdtemp(prefix="tokensforge-demo-"))
    _chown(path, _server_account())  # PostgreSQL runs as an unprivileged user when we are root
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_demo_serves_sdk_traffic_and_keeps_balances_and_key_across_restarts(demo_dir: Path) -> None:
    demo = Demo(demo_dir)
    try:
        first = demo.start()
        assert first["playground"] == f"http://127.0.0.1:{demo.port}/playground"
        assert first["balances"] == str(demo_dir.resolve() / "pg")  # reachable: the cluster stays where asked
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{demo.port}/v1", api_key=first["key"],
                                      max_retries=0) as client:
            models = await client.models.list()
            assert len(models.data) >= 3
            for model in models.data:
                kinds = {r["kind"] for r in model.model_extra["routes"]}
                assert {"official", "routed"} <= kinds
            assert any(r["channels"]["backups"] for m in models.data for r in m.model_extra["routes"])
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
            receipt = completion.model_extra["receipt"]
        charged = receipt["charge_nanos"]
        assert charged > 0 and receipt["ledger_entry_id"]
    finally:
        demo.stop()
    assert demo.proc is not None and demo.proc.returncode in (0, -signal.SIGINT)

    demo2 = Demo(demo_dir)
    try:
        second = demo2.start()
        assert second["key"] == first["key"] and second["admin"] == first["admin"]
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{demo2.port}/v1", api_key=second["key"],
                                      max_retries=0) as client:
            balance = await client.get("/balance", cast_to=object)
            ledger = await client.get("/ledger", cast_to=object)
        credit = next(b for b in balance["buckets"] if b["bucket"] == "credit")
        assert credit["balance_nanos"] == 5_000_000_000 - charged  # kept, and not funded twice
        entry = next(e for e in ledger["data"] if e["id"] == receipt["ledger_entry_id"])
        assert entry["amount_nanos"] == -charged and entry["balance_after_nanos"] == receipt["balance_after_nanos"]
        dsn = f"postgresql://tokensforge@127.0.0.1:{_pg_port(demo_dir)}/tokensforge"
        conn = await asyncpg.connect(dsn)
        try:
            await assert_ledger_invariants(conn)
        finally:
            await conn.close()
    finally:
        demo2.stop()


def _pg_port(data_dir: Path) -> int:
    pid_file = data_dir / "pg" / "postmaster.pid"
    return int(pid_file.read_text().splitlines()[3])


def test_secret_files_are_private_from_the_start_and_never_replaced(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # so the mode comes from the create call alone
    try:
        assert _secret_file(tmp_path / "demo-key", "first") == "first"
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "demo-key").stat().st_mode) == 0o600
    assert _secret_file(tmp_path / "demo-key", "second") == "first"
