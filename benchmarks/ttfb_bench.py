"""Time to first content byte of streamed chat completions, at a fixed concurrency.

    python -m benchmarks.ttfb_bench --url http://127.0.0.1:PORT --concurrency 32 --duration 5 -- TOKEN [TOKEN ...]

wrk times whole responses and its Lua cannot see when the first chunk of a body arrives, so the
harness keeps wrk for throughput and uses this small asyncio load generator for first-byte
latency. `--concurrency` tasks each send one streamed request after another over their own
keep-alive connection: `--warmup` seconds unrecorded, then `--duration` seconds recorded (a
request counts when it was sent inside the recorded window; those still running at its end are
read to their end). Per request it times from just before the request is written to the arrival
of the first SSE event whose `delta.content` is not empty (the role chunk's empty content does
not count) and reads the stream to `data: [DONE]`. Tokens are used round robin.

A request is an error when its status is not 200, it carries an error event, it has no content
chunk or no `[DONE]`, or the connection fails. Loopback only. Prints one line `TTFB_JSON {...}`
with percentiles in milliseconds and how busy the client's own core was (a saturated client
inflates every target's first byte alike; compare targets within one run).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import uvloop

BODY = {"model": "gpt-4o-mini", "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Say something short about benchmarks."}]}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def has_content(line: bytes) -> bool:
    """Is this SSE line a chat chunk whose first choice carries non-empty delta content?"""
    if not line.startswith(b"data: {"):
        return False
    try:
        event = orjson.loads(line[6:])
        return bool(event["choices"][0]["delta"].get("content"))
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return False


def percentile_ms(sorted_s: list[float], p: float) -> float | None:
    if not sorted_s:
        return None
    return round(sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * p / 100))] * 1000, 3)


class Load:
    """The recorded samples and error counts of one run."""

    def __init__(self) -> None:
        self.ttfb_s: list[float] = []
        self.total_s: list[float] = []
        self.errors: Counter[str] = Counter()

    async def one(self, session: aiohttp.ClientSession, url: str, body: bytes, token: str,
                  record: bool) -> None:
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        t0 = time.perf_counter()
        first: float | None = None
        saw_done = False
        try:
            async with session.post(url, data=body, headers=headers) as r:
                if r.status != 200:
                    await r.read()
                    self._error(record, f"status {r.status}")
                    return
                async for line in r.content:
                    if first is None and has_content(line):
                        first = time.perf_counter() - t0
                    elif line.startswith(b"data: [DONE]"):
                        saw_done = True
                    elif line.startswith(b'data: {"error"'):
                        self._error(record, "sse error event")
                        return
        except TimeoutError:
            self._error(record, "timeout")
            return
        except (aiohttp.ClientError, OSError) as exc:
            self._error(record, type(exc).__name__)
            return
        if first is None or not saw_done:
            self._error(record, "no content chunk" if first is None else "no [DONE]")
            return
        if record:
            self.ttfb_s.append(first)
            self.total_s.append(time.perf_counter() - t0)

    def _error(self, record: bool, kind: str) -> None:
        if record:
            self.errors[kind] += 1


async def run(url: str, tokens: list[str], *, concurrency: int, duration_s: float, warmup_s: float,
              timeout_s: float) -> dict[str, Any]:
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    body = orjson.dumps(BODY)
    load = Load()
    next_token = itertools.cycle(tokens)
    loop = asyncio.get_running_loop()
    start = loop.time()
    record_from, record_until = start + warmup_s, start + warmup_s + duration_s

    async def worker(session: aiohttp.ClientSession) -> None:
        while (now := loop.time()) < record_until:
            await load.one(session, endpoint, body, next(next_token), record=now >= record_from)

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        await asyncio.gather(*workers)
        cpu1, wall1 = _cpu_s(), time.perf_counter()
    ttfb, total = sorted(load.ttfb_s), sorted(load.total_s)
    return {
        "concurrency": concurrency, "duration_s": duration_s, "requests": len(ttfb),
        "errors": sum(load.errors.values()), "error_kinds": dict(load.errors),
        "rps": round(len(ttfb) / duration_s, 1) if duration_s > 0 else None,
        "ttfb_ms": {"p50": percentile_ms(ttfb, 50), "p90": percentile_ms(ttfb, 90),
                    "p99": percentile_ms(ttfb, 99),
                    "mean": round(sum(ttfb) / len(ttfb) * 1000, 3) if ttfb else None},
        "stream_ms": {"p50": percentile_ms(total, 50), "p99": percentile_ms(total, 99)},
        "client_cpu_util": round((cpu1 - cpu0) / (wall1 - wall0), 3) if wall1 > wall0 else None,
    }


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ttfb_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL of the target (loopback only)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="recorded seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="unrecorded seconds before")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("tokens", nargs="+", help="bearer tokens, used round robin")
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in LOOPBACK:
        parser.error("--url must point at 127.0.0.1 (the benchmark loads loopback only)")
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--concurrency must be >= 1, --duration > 0, --warmup >= 0")
    result = uvloop.run(run(args.url, args.tokens, concurrency=args.concurrency, duration_s=args.duration,
                            warmup_s=args.warmup, timeout_s=args.timeout))
    print("TTFB_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
