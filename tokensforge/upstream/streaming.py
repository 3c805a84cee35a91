"""Server-sent events from an untrusted upstream: bounded lines, bounded totals, typed frames.

`SseReader` turns the upstream's byte stream into `(event name, data)` pairs per the SSE
framing (`event:` / `data:` lines, a blank line dispatches); a line longer than the cap
or a stream larger than the total cap is a `MalformedUpstream`, never a crash of the
pump. Comments (`:` lines) and unknown fields are skipped.
"""

from __future__ import annotations

from typing import Protocol

from ..canonical import MalformedUpstream

class ByteSource(Protocol):
    async def readany(self) -> bytes: ...


class SseReader:
    def __init__(self, source: ByteSource, *, max_line_bytes: int, max_total_bytes: int) -> None:
        self._source = source
        self._max_line = max_line_bytes
        self._left = max_total_bytes
        self._buffer = b""
        self._lines: list[bytes] = []
        self._eof = False

    async def _line(self) -> bytes | None:
        """The next line without its terminator; None at the end of the stream."""
        while not self._lines:
            if self._eof:
                if self._buffer:
                    line, self._buffer = self._buffer, b""
                    return line.rstrip(b"\r")
                return None
            chunk = await self._source.readany()
            if not chunk:
                self._eof = True
                continue
            self._left -= len(chunk)
            if self._left < 0:
                raise MalformedUpstream("the upstream stream is larger than the gateway accepts")
            parts = (self._buffer + chunk).split(b"\n")
            self._buffer = parts.pop()
            if len(self._buffer) > self._max_line:
                raise MalformedUpstream("an upstream stream line is longer than the gateway accepts")
            self._lines = parts
            self._lines.reverse()
        line = self._lines.pop()
        if len(line) > self._max_line:
            raise MalformedUpstream("an upstream stream line is longer than the gateway accepts")
        return line.rstrip(b"\r")

    def event_ready(self) -> bool:
        """Whether a whole event is already buffered: `next()` will return without reading the network
        (a relay writes what it has once this is False, so events that arrived together leave together)."""
        lines = self._lines
        return b"" in lines or b"\r" in lines or (self._eof and bool(lines or self._buffer))

    def __aiter__(self) -> SseReader:
        return self

    async def __anext__(self) -> tuple[str | None, bytes]:
        event = await self.next()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next(self) -> tuple[str | None, bytes] | None:
        """The next event as (event name or None, data); None when the stream ended."""
        event: str | None = None
        data: list[bytes] = []
        while True:
            line = await self._line()
            if line is None:
                return (event, b"\n".join(data)) if data else None
            if not line:
                if data:
                    return event, b"\n".join(data)
                event = None
                continue
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
