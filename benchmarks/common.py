"""Plumbing shared by the benchmark harness: processes, pinning, CPU/RSS readings, wrk, machine facts.

Every process the harness starts is a `Proc`: its own process group (so stop() reaches its
children too), an optional CPU affinity (the equivalent of `taskset -c N`, applied in the child
before exec), the raised open-file limit, and PR_SET_PDEATHSIG so it dies with the harness even
if the harness itself is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from tokensforge.embedded_pg import EmbeddedPostgres

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_PR_SET_PDEATHSIG = 1
T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark step that cannot go on; the message says what to do."""


# --------------------------------------------------------------------------- limits and pinning


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_count() -> int:
    return os.cpu_count() or 1


def pin_plan() -> dict[str, set[int] | None]:
    """Which cores each role gets: the system under test alone on core 0, everything else on core 1.

    On a one-core machine nothing is pinned (None = leave the inherited affinity).
    """
    if cpu_count() < 2:
        return {"sut": None, "load": None}
    return {"sut": {0}, "load": {1}}


def set_affinity_tree(pid: int, cpus: set[int] | None) -> None:
    """Pin a running process and all its descendants (threads included) to `cpus`."""
    if cpus is None:
        cpus = set(range(cpu_count()))
    for p in [pid, *descendants(pid)]:
        for tid in _threads(p):
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _preexec(cpus: set[int] | None, nofile: int | None) -> Callable[[], None]:
    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass
        if nofile is not None:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
            except (ValueError, OSError):
                pass
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return run


# --------------------------------------------------------------------------- /proc readings


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # fields from #3 (state) on


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (walks /proc; fine for the handful of processes here)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """utime + stime of pid; with tree, also of its live descendants and of those that exited.

    A descendant that exits takes its times out of /proc; once reaped they are added to its parent's
    cutime/cstime, so the tree's total counts both (PostgreSQL's postmaster reaps its backends, and a
    client pool replaces connections now and then: asyncpg's after 50,000 queries each — without the
    reaped part such a row read less CPU than PostgreSQL spent, even a negative amount)."""
    total = 0
    for p in [pid, *(descendants(pid) if tree else [])]:
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # fields 14 and 15: utime, stime
        if tree:
            total += int(f[13]) + int(f[14])  # fields 16 and 17: cutime, cstime (reaped children)
    return total / CLK_TCK


def tcp_ext_counter(name: str) -> int | None:
    """A system-wide TcpExt counter from /proc/net/netstat (e.g. ListenOverflows), None if absent."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    except OSError:
        return None
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head and head[0] == "TcpExt:" and name in head:
            return int(values[head.index(name)])
    return None


def status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A subprocess in its own process group, logged to a file, always stopped by stop()."""

    def __init__(self, name: str, args: Sequence[str], *, log_dir: Path, cpus: set[int] | None = None,
                 env: Mapping[str, str] | None = None, nofile: int | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.cpus = cpus
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self._stopped = False
        try:
            self.proc = subprocess.Popen(
                self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                preexec_fn=_preexec(cpus, nofile))  # noqa: PLW1509 - the harness starts no threads
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_http(self, url: str, *, timeout_s: float = 60, ok: Iterable[int] = (200,)) -> None:
        """Poll url until it answers one of `ok`; fail early if the process died."""
        wanted = set(ok)
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status in wanted:
                        return
                    last = f"status {r.status}"
            except urllib.error.HTTPError as exc:
                if exc.code in wanted:
                    return
                last = f"status {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready at {url} after {timeout_s} s ({last}):\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.proc.poll() is None:
                _killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            _killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group (workers, helpers)
            if self.proc.poll() is None:
                self.proc.wait(timeout=10)
        finally:
            self._log.close()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_capture(args: Sequence[str], *, timeout_s: float, cpus: set[int] | None = None,
                env: Mapping[str, str] | None = None, nofile: int | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short-lived helper to completion in its own group; the group is killed on timeout."""
    proc, _ = run_capture_probed(args, timeout_s=timeout_s, cpus=cpus, env=env, nofile=nofile, cwd=cwd)
    return proc


def run_capture_probed(args: Sequence[str], *, timeout_s: float, cpus: set[int] | None = None,
                       env: Mapping[str, str] | None = None, nofile: int | None = None,
                       cwd: Path | None = None, probe_at_s: Sequence[float] = (),
                       probe: Callable[[], T] | None = None) -> tuple[subprocess.CompletedProcess[str], list[T]]:
    """run_capture, calling `probe()` at each of `probe_at_s` seconds after the start while the helper
    runs (in this thread: the harness starts no threads); returns the helper's result and the samples.
    The helpers probed (wrk) write little until they exit, so their pipes cannot fill meanwhile."""
    started = time.monotonic()
    proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            env=dict(env) if env is not None else None, cwd=cwd,
                            preexec_fn=_preexec(cpus, nofile))  # noqa: PLW1509 - no threads here
    samples: list[T] = []
    try:
        for at_s in probe_at_s:
            time.sleep(max(0.0, started + at_s - time.monotonic()))
            if probe is None or proc.poll() is not None:
                break
            samples.append(probe())
        out, err = proc.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise BenchError(f"{' '.join(args)} did not finish in {timeout_s} s:\n{err[-2000:]}") from None
    except BaseException:
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), samples


def http_json(method: str, url: str, body: Any = None, *, headers: Mapping[str, str] | None = None,
              timeout_s: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


# --------------------------------------------------------------------------- wrk


def ensure_wrk() -> str:
    """Path of `wrk`; installs Debian's package (apt-get update, then install) when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError("wrk is not installed and apt-get is not available: install wrk "
                         "(https://github.com/wg/wrk) and put it on PATH")
    if os.geteuid() != 0:
        raise BenchError("wrk is not installed and installing it needs root: run "
                         "`sudo apt-get update && sudo apt-get install -y wrk`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("benchmarks: wrk not found; installing Debian's wrk package", file=sys.stderr, flush=True)
    for step in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", "wrk"]):
        try:
            proc = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"`{' '.join(step)}` timed out; install wrk by hand") from None
        if proc.returncode != 0:
            raise BenchError(f"`{' '.join(step)}` failed (exit {proc.returncode}); install wrk by hand:\n"
                             f"{(proc.stderr or proc.stdout)[-2000:]}")
    found = shutil.which("wrk")
    if not found:
        raise BenchError("apt-get install wrk succeeded but no `wrk` is on PATH")
    return found


def wrk_version(wrk: str) -> str:
    try:
        proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


# --------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def os_name() -> str:
    pretty = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{pretty} (kernel {platform.release()})"


def pkg_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def postgres_version(bindir: Path) -> str:
    try:
        proc = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
        return proc.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# --------------------------------------------------------------------------- durable PostgreSQL, py-spy

TOOLS_DIR = BENCH_DIR / ".tools"  # py-spy, installed on first use (pip --target), git-ignored
PY_SPY_REQUIREMENT = "py-spy>=0.3.14"


#: the module pg_stat_statements needs preloaded (Debian's postgresql-15 package ships it)
STATEMENTS_MODULE = "pg_stat_statements"


class _StatementsPostgres(EmbeddedPostgres):
    """A cluster that preloads pg_stat_statements, counting nothing until a session or database
    asks for it (`compute_query_id` and `pg_stat_statements.track` are superuser-settable per
    session, so the CPU measured beside it runs with both off)."""

    def _server_options(self, port: int, socket_dir: Path) -> str:
        return " ".join([super()._server_options(port, socket_dir),
                         f"-c shared_preload_libraries={STATEMENTS_MODULE}",
                         "-c pg_stat_statements.track=none", "-c compute_query_id=off",
                         "-c pg_stat_statements.max=2000", "-c track_functions=pl"])


def statements_module_available(bindir: Path | None = None) -> bool:
    """Is pg_stat_statements' shared library installed next to the server found for throwaways?"""
    from tokensforge.embedded_pg import find_pg_bindir

    lib = (bindir or find_pg_bindir()).parent / "lib" / f"{STATEMENTS_MODULE}.so"
    return lib.exists()


def durable_throwaway(*, durable: bool = True, statements: bool = False) -> EmbeddedPostgres:
    """A throwaway cluster (fresh dir under /tmp, removed by close()) with PostgreSQL's durability
    defaults — fsync, synchronous_commit and full_page_writes on — unless `durable=False` (the
    test suite's settings: all three off). The product promises a receipt's ledger entry is on disk
    before the answer leaves, so every headline figure is measured on the durable one. With
    `statements`, pg_stat_statements is preloaded (off until a session turns it on)."""
    pg = (_StatementsPostgres if statements else EmbeddedPostgres).throwaway()
    pg.durable = durable  # read by initdb (no --no-sync) and the server options; set before start()
    return pg


def ensure_py_spy(log: Path) -> str | None:
    """Path of a py-spy binary: on PATH, next to this Python, or installed from PyPI into
    benchmarks/.tools on first use. None (and the reason in `log`) when that fails."""
    for candidate in (shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy"),
                      str(TOOLS_DIR / "bin" / "py-spy")):
        if candidate and Path(candidate).exists():
            return candidate
    step = [sys.executable, "-m", "pip", "install", "-q", "--target", str(TOOLS_DIR), PY_SPY_REQUIREMENT]
    with open(log, "a") as out:
        out.write(f"$ {' '.join(step)}\n")
        out.flush()
        try:
            proc = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=600,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return None
    found = TOOLS_DIR / "bin" / "py-spy"
    return str(found) if proc.returncode == 0 and found.exists() else None
