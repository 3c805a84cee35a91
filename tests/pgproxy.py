"""A TCP proxy between asyncpg and PostgreSQL that cuts connections at chosen protocol moments.

Like asyncpg's own test suite, adversity is real: the database really runs the statement, the
client really loses the socket. The proxy parses PostgreSQL's message framing (type byte + int32
length; connect with `sslmode=disable` so both streams are framed from the first byte after the
startup packet) so it can tell a statement's reply from a prepare round trip:

- `drop_next_reply()`: the next reply to a statement's execution (from BindComplete on) is held
  until its ReadyForQuery — which PostgreSQL sends only after the implicit COMMIT — then thrown
  away and both sides closed. The statement committed; the client never hears so.
- `drop_next_request()`: the next bytes a client sends on an established connection are thrown
  away and both sides closed. Nothing reached the server.
- `refuse`: new connections are closed at once (the database looks down).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from urllib.parse import urlsplit, urlunsplit


class PgProxy:
    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        assert parts.hostname is not None and parts.port is not None
        self._target = (parts.hostname, parts.port)
        self._dsn_parts = parts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drop_reply = False
        self._drop_request = False
        self.refuse = False
        self.refuse_after_drop = False
        self.drops = 0
        self.dropped = asyncio.Event()

    async def start(self) -> str:
        """Listen on a loopback port; returns the DSN that goes through the proxy."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._dsn_parts.netloc.rsplit(":", 1)[0] + f":{port}"
        query = "sslmode=disable" + (f"&{self._dsn_parts.query}" if self._dsn_parts.query else "")
        return urlunsplit(self._dsn_parts._replace(netloc=netloc, query=query))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def drop_next_reply(self) -> None:
        self._drop_reply, self.dropped = True, asyncio.Event()

    def drop_next_request(self) -> None:
        self._drop_request, self.dropped = True, asyncio.Event()

    # ------------------------------------------------------------------ plumbing

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        if self.refuse:
            client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            return
        self._writers.add(server_w)
        conn = _Conn(self, client_w, server_w)
        for coro in (conn.upstream(client_r), conn.downstream(server_r)):
            task = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _claim(self, which: str) -> bool:
        """One armed drop happens once, on whichever connection gets there first."""
        if which == "reply" and self._drop_reply:
            self._drop_reply = False
        elif which == "request" and self._drop_request:
            self._drop_request = False
        else:
            return False
        self.drops += 1
        if self.refuse_after_drop:
            self.refuse = True
        return True


# A statement's execution answers BindComplete, DataRow…, CommandComplete, then ReadyForQuery after
# Sync (and COMMIT). Prepare answers (ParseComplete, descriptions) come after a Flush, with no
# ReadyForQuery to wait for: they pass at once, or the client would wait for them forever.
_EXECUTION = (b"2", b"D", b"C")


class _Conn:
    def __init__(self, proxy: PgProxy, client_w: asyncio.StreamWriter, server_w: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client_w = client_w
        self.server_w = server_w
        self.ready = False  # the server sent its first ReadyForQuery: startup is over

    def cut(self) -> None:
        self.client_w.close()
        self.server_w.close()
        self.proxy.dropped.set()

    async def upstream(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.ready and self.proxy._claim("request"):
                    self.cut()
                    return
                self.server_w.write(data)
                await self.server_w.drain()
        self.server_w.close()

    async def downstream(self, reader: asyncio.StreamReader) -> None:
        held: list[bytes] = []
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(5)
                kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                message = header + await reader.readexactly(length - 4)
                if self.ready and (held or (self.proxy._drop_reply and kind in _EXECUTION)):
                    held.append(message)
                    if kind != b"Z":
                        continue
                    if any(m[:1] == b"C" for m in held) and self.proxy._claim("reply"):
                        self.cut()  # ReadyForQuery: the statement's transaction has committed
                        return
                    message, held = b"".join(held), []
                self.ready = self.ready or kind == b"Z"
                self.client_w.write(message)
                await self.client_w.drain()
        self.client_w.close()
