"""Summarise a py-spy profile in collapsed-stack form (`py-spy record --format raw`).

    python -m benchmarks.profile_summary profile.txt [--top 25]

Prints the functions with the most samples on top of the stack (self) and anywhere on the stack
(inclusive), as percentages of all samples. Also used by `benchmarks.run --profile`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    """`func (path/to/file.py:123)` → `func (file.py)`; drops line numbers so lines of a function add up."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    short = "/".join(Path(file).parts[-2:]) if "/" in file else file
    return f"{m.group('func')} ({short})"


def summarise(text: str, top: int = 25) -> dict[str, Any]:
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m.group("count"))
        frames = [_name(f) for f in m.group("stack").split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            incl_counts[f] += count

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)] if total else []
    return {"samples": total, "self": pct(self_counts), "inclusive": pct(incl_counts),
            "groups": groups(text)}


# Where a sample goes: the first group (in this order) with a marker anywhere on its stack.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("receipts (build/finish)", ("receipts.py",)),
    ("auth + key cache", ("api/auth.py", "keys.py", "accounts.py")),
    ("ledger calls (LedgerStore → asyncpg)", ("ledger/store.py", "asyncpg/")),
    ("upstream call (UpstreamClient → h1 pool)", ("upstream/client.py", "upstream/h1.py", "httptools/",
                                                  "aiohttp/client", "aiohttp/connector")),
    ("pricing, routing, policy, money", ("pricing.py", "routing.py", "policy.py", "money.py",
                                         "ratelimit.py")),
    ("gateway handler code (api/, proxy.py)", ("tokensforge/",)),
    ("aiohttp server (parse, middleware, write)", ("aiohttp/",)),
)


# The process's entry frames (every sample that py-spy unwinds fully starts with them).
_ENTRY = ("runpy", "tokensforge/cli.py", "tokensforge/__main__.py", "uvloop/__init__.py",
          "asyncio/runners.py")


def groups(text: str) -> list[tuple[str, float]]:
    """Share of busy samples per component (GROUPS); the rest is the event loop itself."""
    counts: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m.group("count"))
        stack = ";".join(f for f in m.group("stack").split(";") if not any(e in f for e in _ENTRY))
        total += count
        for name, markers in GROUPS:
            if any(marker in stack for marker in markers):
                counts[name] += count
                break
        else:
            counts["event loop, I/O and the rest (uvloop C code)"] += count
    return [(name, round(100 * n / total, 1)) for name, n in counts.most_common()] if total else []


def render(summary: dict[str, Any]) -> str:
    out = [f"{summary['samples']} samples", "", "share %  component"]
    out += [f"{p:6.1f}   {name}" for name, p in summary.get("groups", [])]
    out += ["", "self %   function (top of stack)"]
    out += [f"{p:6.1f}   {name}" for name, p in summary["self"]]
    out += ["", "incl %   function (anywhere on the stack)"]
    out += [f"{p:6.1f}   {name}" for name, p in summary["inclusive"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_summary", description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(render(summarise(args.path.read_text(errors="replace"), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
