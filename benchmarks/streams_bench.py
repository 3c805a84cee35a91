"""Many-streams client: open N concurrent streamed chat completions and read each to its end.

    python -m benchmarks.streams_bench --url http://127.0.0.1:PORT --key tf-... --n 5000

Streams are opened over `--ramp-s` seconds (so the listen backlog never overflows) and every
one is read to `data: [DONE]`. Against an upstream that spaces its chunks (the harness uses
`mock-upstream --chunk-delay-ms 1000 --completion-tokens 20`, ~19 s per stream) all N are open
at the same time: `peak_inflight` counts requests sent and not yet answered in full (the
connections the gateway holds), `peak_open` those of them already streaming (status line received).
A stream counts as an error when its status is not 200, it carries an SSE `error` event, it ends
without `[DONE]`, or the connection fails.
Prints one line `STREAMS_JSON {...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import uvloop

BODY = {"model": "gpt-4o-mini", "max_tokens": 20, "stream": True,
        "messages": [{"role": "user", "content": "Hold this stream open for a while."}]}


async def run(url: str, key: str, n: int, *, ramp_s: float, stream_timeout_s: float) -> dict[str, Any]:
    open_now = 0  # status line received, stream not finished
    peak_open = 0
    inflight = 0  # request sent (or being connected), answer not finished
    peak_inflight = 0
    done = 0
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    chunks_total = 0
    first_byte: list[float] = []
    durations: list[float] = []
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=stream_timeout_s, sock_connect=30)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    body = json.dumps(BODY).encode()
    started = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal open_now, peak_open, inflight, peak_inflight, done, chunks_total
        await asyncio.sleep(ramp_s * i / max(n, 1))
        t0 = time.perf_counter()
        opened = False
        inflight += 1
        peak_inflight = max(peak_inflight, inflight)
        try:
            async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                if r.status != 200:
                    errors[f"status {r.status}"] += 1
                    await r.read()
                    return
                opened = True
                open_now += 1
                peak_open = max(peak_open, open_now)
                first_byte.append(time.perf_counter() - t0)
                saw_done = False
                chunks = 0
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.startswith(b"data: [DONE]"):
                        saw_done = True
                        continue
                    if line.startswith(b'data: {"error"'):
                        errors["sse error event"] += 1
                        return
                    chunks += 1
                chunks_total += chunks
                if not saw_done:
                    errors["no [DONE]"] += 1
                    return
                done += 1
                durations.append(time.perf_counter() - t0)
        except TimeoutError:
            errors["timeout"] += 1
        except aiohttp.ClientError as exc:
            errors[type(exc).__name__] += 1
            samples.setdefault(type(exc).__name__, f"{exc} (after {time.perf_counter() - t0:.1f} s, "
                                                   f"{'after' if opened else 'before'} the status line)")
        except OSError as exc:
            errors[f"OSError {exc.errno}"] += 1
            samples.setdefault(f"OSError {exc.errno}", str(exc))
        finally:
            inflight -= 1
            if opened:
                open_now -= 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    first_byte.sort()
    durations.sort()

    def pct(values: list[float], p: float) -> float:
        return round(values[min(len(values) - 1, int(len(values) * p / 100))] * 1000, 1) if values else 0.0

    return {
        "n": n, "completed": done, "errors": sum(errors.values()), "error_kinds": dict(errors),
        "error_samples": samples,
        "peak_open": peak_open, "peak_inflight": peak_inflight, "chunks_total": chunks_total,
        "elapsed_s": round(elapsed, 2),
        "first_byte_ms": {"p50": pct(first_byte, 50), "p99": pct(first_byte, 99)},
        "stream_ms": {"p50": pct(durations, 50), "p99": pct(durations, 99)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streams_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="gateway base URL (loopback)")
    parser.add_argument("--key", required=True)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--ramp-s", type=float, default=5.0)
    parser.add_argument("--stream-timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, args.n + 1000):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.n * 2 + 1000)), hard))
    result = uvloop.run(run(args.url, args.key, args.n, ramp_s=args.ramp_s,
                            stream_timeout_s=args.stream_timeout_s))
    print("STREAMS_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
