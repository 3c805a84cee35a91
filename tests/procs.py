"""Real gateway processes for tests that need process boundaries (signals, workers, several instances)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tokensforge.embedded_pg import EmbeddedPostgres

from .harness import ADMIN_TOKEN, UPSTREAM_SECRET, free_port


class GatewayProcess:
    """`tokensforge serve` in a subprocess; always stopped by `stop()` (use it as a context manager)."""

    def __init__(self, catalog: Path, *, dsn: str | None, workers: int = 1, data_dir: Path | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "tokensforge", "serve", "--config", str(catalog), "--port", str(self.port),
                "--workers", str(workers)]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSFORGE_", "PROMETHEUS_"))}
        full_env.update({"TOKENSFORGE_ADMIN_TOKEN": ADMIN_TOKEN, "TF_TEST_UPSTREAM_KEY": UPSTREAM_SECRET,
                         "TOKENSFORGE_SWEEP_INTERVAL_S": "0.2"})
        if dsn is not None:
            full_env["TOKENSFORGE_DATABASE_URL"] = dsn
        full_env.update(env or {})
        self.log_path = log_path or Path(f"/tmp/tokensforge-gw-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGKILL if exc[0] is not None else signal.SIGTERM)


def crash_postgres(cluster: EmbeddedPostgres, timeout_s: int = 60) -> None:
    """`pg_ctl stop -m immediate`: the server dies the way a crash kills it (no checkpoint, sessions cut),
    and the next `cluster.start()` runs crash recovery on the same port.

    EmbeddedPostgres only offers a fast stop, so this drives its pg_ctl the way `stop()` does.
    """
    proc = cluster._run([cluster._bin("pg_ctl"), "stop", "-D", str(cluster.cluster_dir), "-m", "immediate",
                         "-w", "-t", str(timeout_s)], as_server=True, timeout=timeout_s + 30)
    if proc.returncode != 0 and cluster.is_running():
        raise AssertionError(f"pg_ctl stop -m immediate failed: {proc.stderr}{proc.stdout}")
    cluster._started = False
