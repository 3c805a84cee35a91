"""PostgreSQL's cost per proxied request: commits (`pg_stat_database.xact_commit`) and CPU.

Commits are read while the load runs, not before and after it, because PostgreSQL 15 publishes
them lazily: a busy backend flushes its counters at most once a second (at a transaction end),
and one that goes idle less than a second after its last flush keeps the rest pending for
PGSTAT_IDLE_INTERVAL (10 s); `pg_stat_force_next_flush()` only flushes the backend that calls it.
Measured here (PostgreSQL 15.18): right after 3 s of inserts on four connections the counter
showed 65 % of the commits, unchanged for 8 s, then all of them ~10 s after the load stopped.
So a before/after pair would count the warm-up's tail and miss the run's own. During steady load
every backend lags by at most about a second's work at both ends of a window, so
(commits at t_b - commits at t_a) / (requests completed between t_a and t_b) is unbiased; its
spread is roughly one backend-second of commits over the window length (reported with it).

The counter is read over a connection to the `postgres` database, so the reads never count
themselves. CPU is exact and not lazy: utime + stime of the postmaster and all its children
from /proc (`common.cpu_seconds(pid, tree=True)`).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import asyncpg

_COMMITS_SQL = "SELECT xact_commit FROM pg_stat_database WHERE datname = $1"


class CommitCounter:
    """A synchronous reader of one database's `xact_commit` (the harness has no event loop)."""

    def __init__(self, admin_dsn: str, dbname: str) -> None:
        self.dbname = dbname
        self._loop = asyncio.new_event_loop()
        try:
            self._conn: asyncpg.Connection[Any] = self._loop.run_until_complete(
                asyncpg.connect(admin_dsn, timeout=30))
            # no executor threads may linger: the harness forks children with a preexec_fn
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
        except BaseException:
            self._loop.close()
            raise

    def read(self) -> int:
        value = self._loop.run_until_complete(self._conn.fetchval(_COMMITS_SQL, self.dbname, timeout=10))
        return int(value or 0)

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._conn.close(timeout=5))
        except (OSError, asyncpg.PostgresError, TimeoutError):
            pass
        finally:
            self._loop.close()


def requests_completed(metrics_text: str) -> int:
    """Sum of `tokensforge_requests_total` over all its label sets (the gateway's own count)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("tokensforge_requests_total{") or line.startswith("tokensforge_requests_total "):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def gateway_requests(base_url: str) -> int:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        return requests_completed(r.read().decode())


def probe_times(seconds: float) -> tuple[float, float]:
    """When to read the counters inside a run of `seconds`: after the ramp-up, before the end."""
    first = min(1.5, max(0.3, 0.15 * seconds))
    last = seconds - min(0.8, max(0.2, 0.08 * seconds))
    return first, max(first + 0.1, last)


def commits_per_request(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """From two probe samples {t, commits, requests}: commits per request in the window between."""
    failed = [x["error"] for x in samples if "error" in x]
    if failed:
        return {"error": failed[0]}
    if len(samples) < 2:
        return {"error": "fewer than two samples (the run ended early)"}
    a, b = samples[0], samples[-1]
    requests = int(b["requests"] - a["requests"])
    commits = int(b["commits"] - a["commits"])
    out: dict[str, Any] = {"window_s": round(b["t"] - a["t"], 2), "window_requests": requests,
                           "window_commits": commits}
    if requests > 0:
        out["commits_per_request"] = round(commits / requests, 3)
    return out


_DURABILITY = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")


def durability_probe(dsn: str, commits: int = 300) -> dict[str, Any]:
    """The server's durability settings (SHOW) and the latency of a one-row commit: `commits`
    INSERTs into a logged table, one transaction each, one after another on one connection. On a
    durable server each waits for the WAL flush (fdatasync), so its p50 is what the disk adds to
    every settlement that commits alone (at c=4 batches are one item) — the number to read beside
    the added latency at c=4."""
    async def run() -> dict[str, Any]:
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            settings = {name: await conn.fetchval(f"SHOW {name}") for name in _DURABILITY}
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (id bigint, at timestamptz)")
            times: list[float] = []
            for i in range(commits + 20):
                t = time.perf_counter()
                await conn.execute("INSERT INTO bench_commit_probe VALUES ($1, now())", i)
                if i >= 20:  # the first few warm the connection and the table's pages
                    times.append((time.perf_counter() - t) * 1000)
            await conn.execute("DROP TABLE bench_commit_probe")
        finally:
            await conn.close(timeout=5)
        times.sort()
        return {"settings": settings, "commits": len(times),
                "commit_ms": {"p50": round(times[len(times) // 2], 3),
                              "p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
                              "mean": round(sum(times) / len(times), 3)}}

    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(run())
        loop.run_until_complete(loop.shutdown_default_executor())
        return result
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        loop.close()


# --------------------------------------------------------------------------- per-statement timings

#: pg_stat_statements' columns read for the report (PostgreSQL 14+: toplevel, wal_bytes)
_STATEMENTS_SQL = """
SELECT s.toplevel, s.calls, s.total_exec_time, s.mean_exec_time, s.rows, s.wal_bytes, s.wal_fpi,
       s.shared_blks_hit, s.shared_blks_read, s.shared_blks_dirtied, s.query
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = current_database()
  AND s.query !~* '^\\s*(explain|load|set|reset|select pg_stat_statements_reset|select pg_backend_pid)'
ORDER BY s.total_exec_time DESC
LIMIT $1
"""


def one_line(sql: str, limit: int = 160) -> str:
    """A statement's text on one line, whitespace folded, cut to `limit` characters."""
    text = " ".join(sql.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


async def top_statements(conn: asyncpg.Connection[Any], *, per: int, limit: int = 15) -> list[dict[str, Any]]:
    """The current database's statements by total execution time (pg_stat_statements, nested ones
    included when `pg_stat_statements.track = all`): calls, total and mean ms, and per `per`
    settlements the calls, ms, WAL bytes and full-page images — so the rows read as a settlement's cost.
    A top-level statement's time includes the nested statements it ran."""
    rows = await conn.fetch(_STATEMENTS_SQL, limit)
    per = max(per, 1)
    return [{"toplevel": r["toplevel"], "calls": r["calls"], "total_ms": round(r["total_exec_time"], 1),
             "mean_ms": round(r["mean_exec_time"], 4), "rows": r["rows"],
             "calls_per_settle": round(r["calls"] / per, 3),
             "ms_per_settle": round(r["total_exec_time"] / per, 4),
             "wal_bytes_per_settle": round(int(r["wal_bytes"]) / per),
             "wal_fpi_per_settle": round(r["wal_fpi"] / per, 3),
             "blks_dirtied_per_settle": round(r["shared_blks_dirtied"] / per, 3),
             "query": one_line(r["query"])} for r in rows]


def statements_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of top_statements() rows."""
    out = ["| statement | top | calls | mean ms | ms / settle | WAL B / settle | FPI / settle |",
           "|---|:-:|---:|---:|---:|---:|---:|"]
    for r in rows:
        query = r["query"].replace("|", "\\|")
        out.append(f"| `{query}` | {'✓' if r['toplevel'] else ''} | {r['calls']:,} | {r['mean_ms']} | "
                   f"{r['ms_per_settle']} | {r['wal_bytes_per_settle']:,} | {r['wal_fpi_per_settle']} |")
    return out
