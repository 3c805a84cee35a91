"""A lean HTTP/1.1 client for the hot upstream calls: pooled keep-alive connections, one request blob, llhttp.

aiohttp's ClientSession cost a quarter of the gateway's CPU per proxied request (request and response
objects, timer contexts re-armed per read, connector bookkeeping, cookie and redirect machinery nobody here
uses). An upstream call needs much less: write bytes that are mostly constant per channel, read a status, a
few headers and a body (whole or streamed), keep the connection for the next call.

- `H1Pool` keeps idle keep-alive connections per (scheme, host, port), newest first; TLS for https
  through one verifying `ssl` context (server_hostname set). A reused connection that turns out closed
  before any byte of the answer came back is replaced once by a fresh one (the upstream never answered).
- Responses are parsed by llhttp (the `httptools` binding): bounded head (`MAX_HEAD_BYTES`); what is not
  HTTP/1.1 is `malformed`; gzip/deflate answers are decoded (zlib), any other content-encoding is
  `malformed`; the reading side is paused while more than `HIGH_WATER` bytes wait unread.
- One timer per request (`loop.call_at`): at the first-byte bound when it is shorter, then once at the total
  bound, which covers the whole exchange (connect, head, body, a stream to its end). Never re-armed per read.

Failures are `H1Error` (its `outcome` a retry class of SPEC §1: connect, 5xx, malformed) or `TimeoutError`;
messages never carry the URL, the host or a header.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # unread bytes buffered before the transport is paused
LOW_WATER = 64 * 1024  # ... and resumed once the reader is below this
MAX_HEAD_BYTES = 64 * 1024  # status line + headers
MAX_DECODED_UNREAD = 32 * 1024 * 1024  # a decompression bomb unread beyond this is malformed
IDLE_S = 30.0  # an idle connection older than this is not reused
DRAIN_S = 1.0  # a released answer's rest (a stream's last chunk after its [DONE]) is awaited this long ...
DRAIN_BYTES = 64 * 1024  # ... up to this many bytes, to keep the connection


class H1Error(Exception):
    """An exchange failed; `outcome` is the retry class (connect, 5xx, malformed). No URL, no secret."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class _Stale(H1Error):
    """A reused keep-alive connection closed before any byte of the answer: the request is sent again."""


class Headers(dict[str, str]):
    """Response headers, names lower-cased; lookups are case-insensitive."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)


class Origin:
    """Where requests go: (scheme, host, port), the Host header, the TLS context."""

    __slots__ = ("key", "host", "port", "host_header", "ssl")

    def __init__(self, scheme: str, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.key = (scheme, host, port)
        self.host, self.port, self.ssl = host, port, ssl_context
        name = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        self.host_header = name if port == default else f"{name}:{port}"


class H1Response:
    """One answer: `status`, `headers`, `content_length`; the body through `readany()` / `read()`
    (`content` is the response itself, a byte source). `release()` gives a finished connection back to the
    pool (or closes it), `close()` cuts the exchange now; both idempotent."""

    __slots__ = ("status", "headers", "content_length", "_conn", "_loop", "_chunks", "_buffered", "_head_done",
                 "_complete", "_keep", "_error", "_waiter", "_timer", "_deadline", "_first_byte_armed",
                 "_got_byte", "_head_bytes", "_decoder", "_eof_body", "_interim", "_draining", "_header_bytes")

    def __init__(self, conn: _Conn, loop: asyncio.AbstractEventLoop, deadline: float,
                 first_byte_deadline: float | None) -> None:
        self.status = 0
        self.headers = Headers()
        self.content_length: int | None = None
        self._conn: _Conn | None = conn
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._head_done = self._complete = self._keep = self._got_byte = self._eof_body = self._interim = False
        self._draining = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = deadline
        self._first_byte_armed = first_byte_deadline is not None and first_byte_deadline < deadline
        at = first_byte_deadline if self._first_byte_armed and first_byte_deadline is not None else deadline
        self._timer: asyncio.TimerHandle | None = loop.call_at(at, self._on_timer)
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._header_bytes = 0  # the head's header lines
        self._decoder: zlib._Decompress | None = None

    @property
    def content(self) -> H1Response:
        return self

    # ------------------------------------------------------------------ reading

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _head(self) -> None:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def readany(self) -> bytes:
        """Every byte of the body buffered now (waiting for some if none); b"" at its end. What came before a
        failure is returned first. All of it at once: events that arrived together are relayed together."""
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn.paused and self._buffered < LOW_WATER:
            conn.resume()
        return chunk

    async def read(self, max_bytes: int | None = None) -> bytes:
        """The whole body; one over `max_bytes` is `malformed`."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.readany():
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                error = H1Error("malformed", "sent a body over the size limit")
                self._fail(error)  # its connection is not kept
                raise error
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ------------------------------------------------------------------ ending

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the body came to its end on a
        keep-alive connection; an answer whose head came but not yet its end (a stream's closing chunk after
        its [DONE]) is drained briefly (DRAIN_S, DRAIN_BYTES) to keep the connection; else it is closed."""
        conn = self._conn
        if conn is None or self._draining:
            return
        self._stop_timer()
        if self._complete and self._keep and self._error is None:
            self._conn = None
            conn.idle()
        elif self._head_done and not self._complete and self._error is None:
            self._draining = True
            self._chunks.clear()
            self._buffered = 0
            if conn.paused:
                conn.resume()
            self._timer = self._loop.call_at(self._loop.time() + DRAIN_S, self.close)
        else:
            self._conn = None
            conn.abort()

    def close(self) -> None:
        """Cut the exchange now (the connection is aborted)."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self._stop_timer()
        conn.abort()
        if self._error is None and not self._complete:
            self._error = H1Error("5xx", "the answer was closed before its end")
        self._wake()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._stop_timer()
        conn = self._conn
        if conn is not None:
            conn.abort()
        self._wake()

    def _on_timer(self) -> None:
        self._timer = None
        if self._complete or self._error is not None:
            return
        if self._first_byte_armed and self._got_byte:  # the first byte came in time: now the total bound
            self._first_byte_armed = False
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._fail(TimeoutError())

    # ------------------------------------------------------------------ fed by the connection

    def _feed(self, data: bytes) -> None:
        if self._draining:
            self._buffered += len(data)
            if self._buffered > DRAIN_BYTES:
                raise H1Error("5xx", "sent more than the gateway drains")
            return
        decoder = self._decoder
        if decoder is not None:
            room = MAX_DECODED_UNREAD - self._buffered
            try:
                data = decoder.decompress(data, room + 1)  # a bomb stops here, not after it filled the memory
            except zlib.error:
                raise H1Error("malformed", "sent a body that does not decode") from None
            if len(data) > room:
                raise H1Error("malformed", "sent a body that decodes to more than the gateway accepts")
            if not data:
                return
        self._chunks.append(data)
        self._buffered += len(data)
        conn = self._conn
        if self._buffered > HIGH_WATER and conn is not None and not conn.paused:
            conn.pause()
        self._wake()

    def _finish(self, keep_alive: bool) -> None:
        if self._decoder is not None and not self._draining:
            try:
                tail = self._decoder.flush()
            except zlib.error:
                raise H1Error("malformed", "sent a body that does not decode") from None
            if not self._decoder.eof:
                raise H1Error("malformed", "sent a compressed body cut short")
            if tail:
                self._chunks.append(tail)
                self._buffered += len(tail)
        self._complete, self._keep = True, keep_alive
        self._stop_timer()
        conn = self._conn
        if self._draining and conn is not None:  # released before its end: the connection is free now
            self._conn = None
            if keep_alive:
                conn.idle()
            else:
                conn.abort()
        self._wake()


class _Conn(asyncio.Protocol):
    """One connection; at most one exchange at a time (`response`)."""

    def __init__(self, pool: H1Pool, key: tuple[str, str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: H1Response | None = None
        self.closed = False
        self.paused = False
        self.used = False  # it has served an answer: a stale keep-alive connection is possible
        self.idle_since = 0.0
        self._error: H1Error | None = None  # raised from a parser callback

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not registered as one
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response._complete:  # bytes after the answer or between exchanges
            self.abort()
            return
        response._got_byte = True
        if not response._head_done:
            response._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            error, self._error = self._error, None
            response._fail(error or H1Error("malformed", "answered with what is not HTTP/1.1"))
            self.abort()
            return
        except httptools.HttpParserUpgrade:
            response._fail(H1Error("malformed", "answered with a protocol upgrade"))
            self.abort()
            return
        if not response._head_done and response._head_bytes > MAX_HEAD_BYTES:
            response._fail(H1Error("malformed", "sent a status line and headers over the size limit"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost classifies what ended

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._unidle(self)
        self.pool._gone(self)
        response = self.response
        if response is None or response._complete or response._error is not None:
            return
        if response._head_done:
            if response._eof_body and exc is None:  # a body delimited by the end of the connection
                try:
                    response._finish(False)
                except H1Error as error:
                    response._fail(error)
            else:
                response._fail(H1Error("5xx", "broke off the answer"))
        elif response._got_byte:
            response._fail(H1Error("5xx", "closed the connection in the middle of the status and headers"))
        elif self.used:
            response._fail(_Stale("connect", "closed the connection before answering"))
        else:
            response._fail(H1Error("connect", "closed the connection before answering"))

    def pause_writing(self) -> None:  # a request larger than the socket buffer: the transport buffers it
        pass

    def resume_writing(self) -> None:
        pass

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response._complete:  # a second answer to one request
            self._error = H1Error("malformed", "sent more than one answer")
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        response._header_bytes += len(name) + len(value) + 4
        if response._header_bytes > MAX_HEAD_BYTES:
            self._error = H1Error("malformed", "sent a status line and headers over the size limit")
            raise self._error
        key = name.decode("latin-1").lower()
        if not dict.__contains__(response.headers, key):
            dict.__setitem__(response.headers, key, value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the answer follows
            response._interim = True
            response.headers = Headers()
            return
        headers = response.headers
        response.status = status
        length = headers.get("content-length")
        response.content_length = int(length) if length is not None and length.isdigit() else None
        encoding = (headers.get("content-encoding") or "identity").strip().lower()
        if encoding not in ("identity", ""):
            if encoding not in ("gzip", "x-gzip", "deflate"):
                self._error = H1Error("malformed", "answered with an unsupported content-encoding")
                raise self._error
            response._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib, by the header
        chunked = "chunked" in (headers.get("transfer-encoding") or "").lower()
        response._eof_body = length is None and not chunked and status not in (204, 304)
        response._head_done = True
        response._wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        try:
            response._feed(body)
        except H1Error as exc:
            self._error = exc
            raise

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        if response._interim:
            response._interim = False
            return
        try:
            response._finish(self.parser.should_keep_alive())
        except H1Error as exc:
            self._error = exc
            raise

    # ---------------------------------------------------------------- pool side

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()  # connection_lost follows
        self.pool._unidle(self)

    def idle(self) -> None:
        self.response = None
        if self.closed or self.transport is None or self.transport.is_closing():
            self.abort()
            return
        if self.paused:  # the chunk that filled the buffer also ended the answer
            self.resume()
        self.used = True
        self.idle_since = self.pool.loop.time()
        self.pool._idle.setdefault(self.key, []).append(self)


class H1Pool:
    """Keep-alive connections per origin, opened on demand (no cap: the channels' slots bound them)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._conns: set[_Conn] = set()
        self._lost: asyncio.Future[None] | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def origin(self, url: str) -> tuple[Origin, str]:
        """(the origin, the request target) of an http(s) URL."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an upstream URL must be http(s)://host[:port]/path")
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        port = parts.port or (443 if scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if any(c in target for c in " \r\n"):
            raise ValueError("an upstream URL's path must not carry spaces or line breaks")
        return Origin(scheme, parts.hostname, port, context), target

    async def request(self, origin: Origin, blob: bytes, *, connect_s: float, total_s: float,
                      first_byte_s: float | None = None) -> H1Response:
        """Send `blob` (a whole HTTP/1.1 request) and wait for the answer's status and headers."""
        loop = self.loop
        deadline = loop.time() + total_s
        for attempt in (0, 1):
            conn = self._take(origin.key) if attempt == 0 else None
            if conn is None:
                conn = await self._connect(origin, max(0.0, min(connect_s, deadline - loop.time())))
            first_byte = loop.time() + first_byte_s if first_byte_s is not None else None
            response = H1Response(conn, loop, deadline, first_byte)
            conn.response = response
            assert conn.transport is not None
            conn.transport.write(blob)
            try:
                await response._head()
            except _Stale:
                response.close()
                if attempt == 0:
                    continue
                raise H1Error("connect", "closed the connection before answering") from None
            except BaseException:
                response.close()
                raise
            return response
        raise AssertionError("unreachable")

    def _take(self, key: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = self.loop.time() - IDLE_S
        while idle:
            conn = idle.pop()
            if conn.idle_since < oldest:  # the rest are older still
                conn.abort()
                while idle:
                    idle.pop().abort()
                return None
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.abort()
        return None

    async def _connect(self, origin: Origin, timeout_s: float) -> _Conn:
        if self._closing:
            raise H1Error("connect", "the gateway is shutting down")
        conn = _Conn(self, origin.key)
        loop = self.loop
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(
                    lambda: conn, origin.host, origin.port, ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None)
        except TimeoutError:
            raise
        except OSError:  # refused, unreachable, no such host, a TLS handshake or certificate failure
            raise H1Error("connect", "could not connect") from None
        if self._closing:  # close() ran while this connection was being made: it never saw it
            conn.abort()
            raise H1Error("connect", "the gateway is shutting down")
        self._conns.add(conn)
        return conn

    def _unidle(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _gone(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if not self._conns and self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def close(self) -> None:
        """Abort every connection (idle or busy) and wait until their transports are gone."""
        self._closing = True
        conns = list(self._conns)
        self._idle.clear()
        if not conns:
            return
        self._lost = self.loop.create_future()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(self._lost)
        except TimeoutError:
            pass
