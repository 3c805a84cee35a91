"""The lean upstream client (tokensforge/upstream/h1.py) against real loopback servers that answer as scripted:
keep-alive reuse, bodies by length and chunked, flow control, each timeout, hostile answers, stale pooled
connections, gzip, TLS; and UpstreamClient's classification over it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tokensforge.catalog import Channel
from tokensforge.upstream import h1
from tokensforge.upstream.client import AttemptFailure, UpstreamClient
from tokensforge.upstream.h1 import H1Error, H1Pool, H1Response

READERS: dict[asyncio.StreamWriter, asyncio.StreamReader] = {}  # the server side's, for until_cut
Answer = Callable[[int, asyncio.StreamWriter], Awaitable[bool]]  # (request number, writer) -> keep the connection


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def chunked(*parts: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    for part in parts:
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


class Upstream:
    """A loopback HTTP/1.1 server: reads each request whole, then lets `answer` write what it likes."""

    def __init__(self, answer: Answer, ssl_context: ssl.SSLContext | None = None) -> None:
        self.answer, self.ssl_context = answer, ssl_context
        self.connections = 0
        self.requests: list[bytes] = []
        self.ended: list[str] = []  # per connection: "eof" (the client closed) or "answered"
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    def url(self, path: str = "/v1/chat/completions", scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        READERS[writer] = reader
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    found = re.search(rb"content-length: (\d+)", head, re.I)
                    body = await reader.readexactly(int(found.group(1)) if found else 0)
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.ended.append("eof")
                    return
                self.requests.append(head + body)
                if not await self.answer(len(self.requests), writer):
                    self.ended.append("answered")
                    return
        except asyncio.CancelledError:
            return  # the test is over (returned, not raised: asyncio's server logs a cancelled handler)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._tasks.discard(task)
            READERS.pop(writer, None)


async def until_cut(writer: asyncio.StreamWriter, cut: list[float] | None = None) -> bool:
    """Hold the answer until the client cuts the connection."""
    reader = READERS[writer]
    for _ in range(3000):
        if writer.is_closing() or reader.at_eof():
            if cut is not None:
                cut.append(time.monotonic())
            break
        await asyncio.sleep(0.01)
    return False


def request(path: str = "/v1/chat/completions", body: bytes = b"{}", host: str = "127.0.0.1") -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        path.encode(), host.encode(), len(body), body)


async def send(pool: H1Pool, server: Upstream, *, total_s: float = 5.0, first_byte_s: float | None = None,
               connect_s: float = 2.0, scheme: str = "http", host: str = "127.0.0.1") -> H1Response:
    origin, _ = pool.origin(server.url(scheme=scheme, host=host))
    return await pool.request(origin, request(host=host), connect_s=connect_s, total_s=total_s,
                              first_byte_s=first_byte_s)


def answering(*blobs: bytes, keep: bool = True) -> Answer:
    async def answer(n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(blobs[min(n, len(blobs)) - 1])
        await writer.drain()
        return keep
    return answer


async def test_keep_alive_connections_are_reused_and_both_body_framings_read() -> None:
    pool = H1Pool()
    async with Upstream(answering(ok(b'{"a":1}'), chunked(b'{"b":', b"2}"), ok(b"x" * 100_000))) as server:
        first = await send(pool, server)
        assert (first.status, first.content_length, await first.read()) == (200, 7, b'{"a":1}')
        assert first.headers["Content-Type"] == "application/json" and first.headers.get("CONTENT-LENGTH") == "7"
        first.release()
        second = await send(pool, server)
        assert second.content_length is None and await second.read() == b'{"b":2}'
        second.release()
        third = await send(pool, server)
        assert len(await third.read()) == 100_000
        third.release()
        assert server.connections == 1 and len(server.requests) == 3
        assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    await pool.close()
    assert not pool._conns


async def test_a_body_delimited_by_the_end_of_the_connection_is_read_and_not_pooled() -> None:
    pool = H1Pool()
    async with Upstream(answering(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", keep=False)) as server:
        response = await send(pool, server)
        assert response.content_length is None and await response.read() == b"until the end"
        response.release()
        assert not pool._idle.get(response_key(server))
    await pool.close()


async def test_a_slow_reader_pauses_the_transport_and_reading_resumes_it() -> None:
    size = 4 * 1024 * 1024
    async with Upstream(answering(ok(b"z" * size))) as server:
        pool = H1Pool()
        response = await send(pool, server)
        conn = response._conn
        assert conn is not None
        for _ in range(200):
            if conn.paused:
                break
            await asyncio.sleep(0.01)
        assert conn.paused, "the transport was never paused"
        await asyncio.sleep(0.1)
        assert response._buffered < h1.HIGH_WATER + 512 * 1024  # bounded while nobody reads
        assert len(await response.read()) == size
        assert not conn.paused
        response.release()
        again = await send(pool, server)  # the connection was resumed before it went back to the pool
        assert len(await again.read()) == size
        again.release()
        assert server.connections == 1
        await pool.close()


async def test_first_byte_then_total_timeouts_each_fire_once() -> None:
    cut: list[float] = []

    async def never(n: int, writer: asyncio.StreamWriter) -> bool:
        return await until_cut(writer, cut)

    async def trickle(n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(0.05)
            writer.write(b"2\r\nab\r\n")
        return False

    pool = H1Pool()
    async with Upstream(never) as server:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await send(pool, server, first_byte_s=0.2, total_s=5)
        assert 0.15 < time.monotonic() - started < 1.0
        for _ in range(100):
            if cut:
                break
            await asyncio.sleep(0.01)
        assert cut, "the connection of a timed-out request was not closed"
    async with Upstream(trickle) as server:
        started = time.monotonic()
        response = await send(pool, server, first_byte_s=0.2, total_s=0.8)
        got = b""
        with pytest.raises(TimeoutError):
            while chunk := await response.readany():  # chunks 50 ms apart: the first-byte bound is past
                got += chunk
        elapsed = time.monotonic() - started
        assert 0.7 < elapsed < 1.5 and len(got) >= 10, (elapsed, got)
        response.close()
    await pool.close()


async def test_connect_timeout_covers_the_tls_handshake() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()  # says nothing, not even a TLS hello
        writer.close()
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = H1Pool()
    try:
        origin, _ = pool.origin(f"https://127.0.0.1:{port}/v1")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.request(origin, request(), connect_s=0.2, total_s=5)
        assert time.monotonic() - started < 1.0
    finally:
        server.close()
        await server.wait_closed()
        await pool.close()


async def test_refused_connection_is_connect() -> None:
    async with Upstream(answering(ok())) as server:
        port = server.port
    pool = H1Pool()
    origin, _ = pool.origin(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(H1Error) as failure:
        await pool.request(origin, request(), connect_s=1, total_s=2)
    assert failure.value.outcome == "connect" and "127.0.0.1" not in str(failure.value)
    await pool.close()


@pytest.mark.parametrize(("answer", "outcome"), [
    (b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (70 * 1024) + b"\r\n\r\n", "malformed"),  # head over the cap
    (b"\x16\x03\x01 this is not http at all\r\n\r\n", "malformed"),  # garbage
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 2\r\n\r\nxx", "malformed"),
    (b"HTTP/1.1 200 OK\r\ncontent-le", "5xx"),  # bytes came, then the connection closed
    (b"", "connect"),  # closed before any byte, on a fresh connection: not retried
])
async def test_hostile_or_broken_heads_are_classified(answer: bytes, outcome: str) -> None:
    pool = H1Pool()
    async with Upstream(answering(answer, keep=False)) as server:
        with pytest.raises(H1Error) as failure:
            await send(pool, server)
        assert failure.value.outcome == outcome
        assert len(server.requests) == 1  # never sent twice
    await pool.close()
    assert not pool._conns


async def test_a_body_over_the_cap_and_a_body_cut_short() -> None:
    pool = H1Pool()
    async def answer(n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(chunked(b"x" * 5000) if n == 1 else b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        return n == 1  # the second is cut short

    async with Upstream(answer) as server:
        response = await send(pool, server)
        with pytest.raises(H1Error) as failure:
            await response.read(4096)
        assert failure.value.outcome == "malformed"
        response.release()  # not read to its end: closed, not pooled
        response = await send(pool, server)
        assert server.connections == 2
        with pytest.raises(H1Error) as failure:
            await response.read()
        assert failure.value.outcome == "5xx"
        response.release()
    await pool.close()


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async def answer(n: int, writer: asyncio.StreamWriter) -> bool:
        if n == 2:
            return False  # reads the request on the kept connection, closes without a byte
        writer.write(ok(b'{"n":%d}' % n))
        return True
    pool = H1Pool()
    async with Upstream(answer) as server:
        (first := await send(pool, server)).release()
        assert first.status == 200
        second = await send(pool, server)
        assert await second.read() == b'{"n":3}'  # the same request, sent again on a new connection
        second.release()
        assert server.connections == 2 and len(server.requests) == 3

    async def byte_then_close(n: int, writer: asyncio.StreamWriter) -> bool:
        if n == 2:
            writer.write(b"HTTP/1.1 5")
            return False
        writer.write(ok())
        return True
    async with Upstream(byte_then_close) as server:
        (await send(pool, server)).release()
        with pytest.raises(H1Error) as failure:
            await send(pool, server)
        assert failure.value.outcome == "5xx" and len(server.requests) == 2  # a byte came back: never resent
    await pool.close()


async def test_close_aborts_a_stream_and_release_drains_a_short_rest() -> None:
    gate = asyncio.Event()
    cut: list[float] = []

    async def stream(n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        if n == 1:
            return await until_cut(writer, cut)
        await gate.wait()
        writer.write(b"0\r\n\r\n")  # the end comes after the reader let go
        return True

    pool = H1Pool()
    async with Upstream(stream) as server:
        response = await send(pool, server)
        assert await response.readany() == b"hello"
        response.close()
        with pytest.raises(H1Error):
            await response.readany()
        for _ in range(100):
            if cut:
                break
            await asyncio.sleep(0.01)
        assert cut  # the upstream saw the request cut
        response = await send(pool, server)
        assert await response.readany() == b"hello"
        response.release()  # before its end: drained, then pooled
        gate.set()
        for _ in range(100):
            if pool._idle.get(response_key(server)):
                break
            await asyncio.sleep(0.01)
        assert len(pool._idle[response_key(server)]) == 1
    await pool.close()


def response_key(server: Upstream) -> tuple[str, str, int]:
    return ("http", "127.0.0.1", server.port)


async def test_gzip_and_deflate_answers_are_decoded() -> None:
    import zlib
    text = b'{"hello":"' + b"w" * 10_000 + b'"}'
    gz, zl = gzip.compress(text), zlib.compress(text)
    pool = H1Pool()
    async with Upstream(answering(ok(gz, b"content-encoding: gzip\r\n"),
                                  chunked(zl[:100], zl[100:]).replace(b"\r\n\r\n", b"\r\ncontent-encoding: deflate"
                                                                      b"\r\n\r\n", 1),
                                  ok(gz[:-10], b"content-encoding: gzip\r\n"))) as server:
        for _ in range(2):
            response = await send(pool, server)
            assert await response.read() == text
            response.release()
        response = await send(pool, server)
        with pytest.raises(H1Error) as failure:
            await response.read()
        assert failure.value.outcome == "malformed"  # a compressed body cut short
        response.release()
    await pool.close()


async def test_a_decompression_bomb_is_malformed_without_filling_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1, "MAX_DECODED_UNREAD", 1024 * 1024)
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # ~64 KiB on the wire
    pool = H1Pool()
    async with Upstream(answering(ok(bomb, b"content-encoding: gzip\r\n"))) as server:
        response = await send(pool, server)
        with pytest.raises(H1Error) as failure:
            await response.read()
        assert failure.value.outcome == "malformed" and response._buffered <= 1024 * 1024
        response.release()
    await pool.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


async def test_https_with_a_verified_certificate(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with Upstream(answering(ok(b'{"tls":1}'), chunked(b'{"tls":2}')), server_context) as server:
        trusting = H1Pool(ssl.create_default_context(cafile=str(cert)))
        for n in (1, 2):
            response = await send(trusting, server, scheme="https", host="localhost")
            assert await response.read() == b'{"tls":%d}' % n
            response.release()
        assert server.connections == 1
        await trusting.close()
        default = H1Pool()  # the system's trust store does not know this certificate
        with pytest.raises(H1Error) as failure:
            await send(default, server, scheme="https", host="localhost")
        assert failure.value.outcome == "connect"
        await default.close()


def test_keep_alive_timeouts_and_tls_on_uvloop(tls_files: tuple[Path, Path]) -> None:
    """The gateway runs on uvloop: the same exchanges there (pool, timers, TLS, close on shutdown)."""
    cert, key = tls_files

    async def answer(n: int, writer: asyncio.StreamWriter) -> bool:
        if n == 3:
            return await until_cut(writer)
        writer.write(ok(b"u" * 1_000_000) if n == 1 else chunked(b"a", b"b"))
        return True

    async def scenario() -> None:
        pool = H1Pool(ssl.create_default_context(cafile=str(cert)))
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(cert, key)
        for context, scheme, host in ((None, "http", "127.0.0.1"), (server_context, "https", "localhost")):
            async with Upstream(answer, context) as server:
                for expected in (b"u" * 1_000_000, b"ab"):
                    response = await send(pool, server, scheme=scheme, host=host)
                    assert await response.read() == expected
                    response.release()
                with pytest.raises(TimeoutError):
                    await send(pool, server, first_byte_s=0.1, scheme=scheme, host=host)
                assert server.connections == 1
        await pool.close()
        assert not pool._conns
    uvloop.run(scenario())


# ---------------------------------------------------------------------- UpstreamClient over the pool


def channel(port: int, **kw: Any) -> Channel:
    return Channel(id="c1", kind="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="K", **kw)


async def test_upstream_client_sends_one_blob_and_classifies_answers() -> None:
    async def answer(n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write([
            ok(b'{"id":"x"}'),
            ok(b'{"error":{"message":"slow down"}}', b"Retry-After-Ms: 1500\r\n").replace(b"200 OK", b"429 Too"),
            ok(b'{"error":{"message":"bad key sk-secret-1 at http://127.0.0.1"}}').replace(b"200 OK", b"401 No"),
            ok(b"[1,2]"),
            ok(b"x" * 2000),
        ][n - 1])
        return True

    pool = H1Pool()
    client = UpstreamClient(pool, {"K": "sk-secret-1"}, max_body_bytes=1000)
    async with Upstream(answer) as server:
        ch = channel(server.port)
        response = await client.open(ch, "/chat/completions", b'{"q":1}', {"traceparent": "00-ab-cd-01"})
        assert await client.read_json(ch, response) == {"id": "x"}
        sent = server.requests[0]
        assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % server.port)
        for line in (b"authorization: Bearer sk-secret-1", b"accept-encoding: identity", b"content-length: 7",
                     b"traceparent: 00-ab-cd-01"):
            assert line in sent
        assert sent.endswith(b'\r\n\r\n{"q":1}')
        with pytest.raises(AttemptFailure) as failure:
            await client.open(ch, "/chat/completions", b"{}")
        assert (failure.value.outcome, failure.value.retry_after_s, failure.value.message) == ("429", 1.5,
                                                                                              "slow down")
        with pytest.raises(AttemptFailure) as failure:
            await client.open(ch, "/chat/completions", b"{}")
        assert failure.value.outcome == "4xx" and "sk-secret-1" not in failure.value.message
        for expected in ("sent malformed JSON", "sent a body over the size limit"):
            response = await client.open(ch, "/chat/completions", b"{}")
            with pytest.raises(AttemptFailure) as failure:
                await client.read_json(ch, response)
            assert failure.value.outcome == "malformed" and expected in failure.value.message
        assert server.connections <= 2  # error answers read whole keep their connection too
    await pool.close()


async def test_upstream_client_timeouts_and_connect_failures_are_classified() -> None:
    async def hang(n: int, writer: asyncio.StreamWriter) -> bool:
        return await until_cut(writer)
    pool = H1Pool()
    client = UpstreamClient(pool, {})
    async with Upstream(hang) as server:
        ch = channel(server.port, timeout_s=5.0, first_byte_timeout_s=0.1)
        with pytest.raises(AttemptFailure) as failure:
            await client.open(ch, "/chat/completions", b"{}")
        assert failure.value.outcome == "timeout"
        port = server.port
    with pytest.raises(AttemptFailure) as failure:
        await client.open(channel(port), "/chat/completions", b"{}")
    assert failure.value.outcome == "connect" and "127.0.0.1" not in failure.value.message
    await pool.close()


async def test_pool_close_ends_idle_and_busy_connections() -> None:
    async def answer(n: int, writer: asyncio.StreamWriter) -> bool:
        if n == 1:
            writer.write(ok())
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        return await until_cut(writer)
    pool = H1Pool()
    async with Upstream(answer) as server:
        (await send(pool, server)).release()
        idle = pool._idle[response_key(server)][0]
        busy_pool = H1Pool()
        stream = await send(busy_pool, server)
        assert await stream.readany() == b"a"
        assert len(pool._conns) == 1 and len(busy_pool._conns) == 1
        await pool.close()
        await busy_pool.close()
        assert idle.closed and not pool._conns and not busy_pool._conns
        with pytest.raises(H1Error):
            await stream.readany()
