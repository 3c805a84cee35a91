"""The peer: LiteLLM's proxy, installed into its own venv (benchmarks/.peer-venv), run without a database.

Only used with `--peer`. A failed install is reported in the results, never fatal to the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .common import BENCH_DIR, BenchError

PEER_VENV = BENCH_DIR / ".peer-venv"
REQUIREMENT = "litellm[proxy]"


def litellm_bin() -> Path:
    return PEER_VENV / "bin" / "litellm"


def _ok() -> bool:
    py = PEER_VENV / "bin" / "python"
    if not (py.exists() and litellm_bin().exists()):
        return False
    proc = subprocess.run([str(py), "-c", "import litellm.proxy.proxy_server"], capture_output=True,
                          timeout=300, check=False, env=peer_env(os.environ))
    return proc.returncode == 0


def ensure_litellm(log: Path) -> str:
    """Install `litellm[proxy]` into benchmarks/.peer-venv unless it is already there; returns its version."""
    if not _ok():
        with open(log, "a") as out:
            steps = []
            if not (PEER_VENV / "bin" / "python").exists():
                steps.append([sys.executable, "-m", "venv", str(PEER_VENV)])
            steps.append([str(PEER_VENV / "bin" / "pip"), "install", "-q", "--upgrade", "pip"])
            steps.append([str(PEER_VENV / "bin" / "pip"), "install", "-q", REQUIREMENT])
            for step in steps:
                out.write(f"$ {' '.join(step)}\n")
                out.flush()
                try:
                    proc = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=1200,
                                          stdin=subprocess.DEVNULL, check=False)
                except subprocess.TimeoutExpired:
                    raise BenchError(f"`{' '.join(step)}` timed out (see {log})") from None
                if proc.returncode != 0:
                    raise BenchError(f"`{' '.join(step)}` failed with exit {proc.returncode} (see {log})")
        if not _ok():
            raise BenchError(f"litellm installed but `import litellm.proxy.proxy_server` fails (see {log})")
    found = subprocess.run([str(PEER_VENV / "bin" / "python"), "-c",
                            "from importlib.metadata import version; print(version('litellm'))"],
                           capture_output=True, text=True, timeout=120, check=False)
    return found.stdout.strip() or "unknown"


def peer_env(base: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """No telemetry, no remote cost map, no database, quiet logs."""
    env = {k: v for k, v in base.items() if not k.startswith(("TOKENSFORGE_", "DATABASE_URL", "LITELLM_"))}
    env.update({
        "LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION", "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True",
        "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
    })
    return env


def write_config(path: Path, upstream_base: str, master_key: str) -> Path:
    """Route `gpt-4o-mini` to the simulated upstream (`upstream_base` ends in /v1).

    LiteLLM refuses to start without a master key; clients send it as their bearer token
    (checked in memory: no database is configured).
    """
    path.write_text(f"""model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {upstream_base}
      api_key: sk-bench-upstream
litellm_settings:
  telemetry: false
  drop_params: true
  set_verbose: false
  json_logs: false
general_settings:
  master_key: {master_key}
  disable_spend_logs: true
""")
    return path


def command(config: Path, port: int) -> list[str]:
    return [str(litellm_bin()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
