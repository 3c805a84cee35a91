"""Calls to upstream channels: one connection pool (h1.py), the channel's own secret, classified failures.

Every failure becomes an `AttemptFailure` whose `outcome` is one of the retry
classes of SPEC §1 (timeout, connect, 5xx, 429) or a class that is never
retried (4xx). Messages never carry the channel's URL or secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson

from ..catalog import Channel
from .h1 import H1Error, H1Pool, H1Response


class AttemptFailure(Exception):
    def __init__(self, outcome: str, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _upstream_message(raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
        message = data["error"]["message"]
        return str(message)[:500]
    except Exception:  # not an OpenAI-shaped error; say nothing of its body
        return ""


class _Prepared:
    """One channel's per-request constants (UpstreamClient._prepare): where its requests go and, per path,
    the request line and constant headers as bytes (each request adds its length, extra headers and body)."""

    __slots__ = ("channel", "origin", "pool", "headers", "names", "connect_s", "total_s", "first_byte_s",
                 "_heads")

    def __init__(self, pool: H1Pool, channel: Channel, headers: dict[str, str]) -> None:
        self.channel = channel
        self.pool = pool
        self.origin = pool.origin(channel.base_url)[0]
        self.headers = headers
        self.names = frozenset(headers)
        # `total` bounds the whole exchange, body and stream included; the first-byte bound only when shorter
        self.total_s = channel.timeout_s
        self.connect_s = channel.connect_timeout_s
        first_byte_s = channel.first_byte_timeout_s
        self.first_byte_s = first_byte_s if first_byte_s and first_byte_s < channel.timeout_s else None
        self._heads: dict[str, bytes] = {}

    def head(self, path: str, headers: Mapping[str, str] | None = None) -> bytes:
        """The request line and headers up to (not including) content-length; built once per path."""
        if headers is None:
            head = self._heads.get(path)
            if head is not None:
                return head
        target = self.pool.origin(self.channel.base_url + path)[1]  # base_url + path, as aiohttp joined them
        lines = [f"POST {target} HTTP/1.1",
                 f"host: {self.origin.host_header}"]
        lines += [f"{name}: {value}" for name, value in (self.headers if headers is None else headers).items()]
        text = "\r\n".join(lines) + "\r\n"
        if "\n" in text.replace("\r\n", "") or "\r" in text.replace("\r\n", ""):
            raise ValueError("an upstream request line or header carries a line break")
        head = text.encode()
        if headers is None:
            self._heads[path] = head
        return head

    def blob(self, path: str, payload: bytes, extra_headers: Mapping[str, str] | None) -> bytes:
        """The whole request: one buffer for one write."""
        length = b"content-length: %d\r\n" % len(payload)
        if not extra_headers:
            return b"".join((self.head(path), length, b"\r\n", payload))
        if any(name.lower() in self.names for name in extra_headers):  # an override: the slow path
            return b"".join((self.head(path, {**self.headers, **{k.lower(): v for k, v in extra_headers.items()}}),
                             length, b"\r\n", payload))
        extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers.items())
        if "\n" in extra.replace("\r\n", "") or "\r" in extra.replace("\r\n", ""):
            raise ValueError("an upstream header carries a line break")
        return b"".join((self.head(path), length, extra.encode(), b"\r\n", payload))


class UpstreamClient:
    """Opens requests to channels; concurrency per channel is capped by its max_concurrency.

    Upstreams are untrusted: a non-streamed body larger than `max_body_bytes` is a failure,
    like a malformed one."""

    def __init__(self, pool: H1Pool, env: Mapping[str, str], *,
                 max_body_bytes: int = 16 * 1024 * 1024) -> None:
        self.pool = pool
        self.env = env
        self.max_body_bytes = max_body_bytes
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._prepared: dict[str, _Prepared] = {}

    def _headers(self, channel: Channel) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        secret = self.env.get(channel.api_key_env) if channel.api_key_env else None
        if channel.kind == "anthropic":
            headers["anthropic-version"] = channel.anthropic_version or "2023-06-01"
            if secret:
                headers["x-api-key"] = secret
        elif secret:
            headers["authorization"] = f"Bearer {secret}"
        return headers

    def limit(self, channel: Channel) -> asyncio.Semaphore:
        sem = self._limits.get(channel.id)
        if sem is None:
            sem = self._limits[channel.id] = asyncio.Semaphore(channel.max_concurrency)
        return sem

    def scrub(self, channel: Channel, text: str) -> str:
        """Remove the channel's URL and secret from anything that may reach a client or a log."""
        text = text.replace(channel.base_url, f"<channel {channel.id}>")
        secret = self.env.get(channel.api_key_env) if channel.api_key_env else None
        return text.replace(secret, "<secret>") if secret else text

    def _prepare(self, channel: Channel) -> _Prepared:
        """What every request to `channel` shares, built once per channel object (a catalog reload
        makes new ones): its origin, timeouts and request heads."""
        prepared = self._prepared.get(channel.id)
        if prepared is None or prepared.channel is not channel:
            prepared = self._prepared[channel.id] = _Prepared(self.pool, channel, self._headers(channel))
        return prepared

    async def open(self, channel: Channel, path: str, payload: bytes,
                   extra_headers: Mapping[str, str] | None = None) -> H1Response:
        """POST and wait for the status line and headers; non-2xx answers become AttemptFailure."""
        prepared = self._prepare(channel)
        try:
            response = await self.pool.request(
                prepared.origin, prepared.blob(path, payload, extra_headers), connect_s=prepared.connect_s,
                total_s=prepared.total_s, first_byte_s=prepared.first_byte_s)
        except TimeoutError:
            raise AttemptFailure("timeout", f"channel {channel.id} timed out") from None
        except H1Error as exc:
            if exc.outcome == "connect":
                raise AttemptFailure("connect", f"could not connect to channel {channel.id} ({exc})") from None
            raise AttemptFailure(exc.outcome, f"channel {channel.id} failed: {exc}") from None
        if response.status < 400:
            return response
        parts: list[bytes] = []
        size = 0
        try:
            while size < 64 * 1024 and (chunk := await response.readany()):  # enough for any error message
                parts.append(chunk)
                size += len(chunk)
        except (TimeoutError, H1Error):
            pass
        finally:
            response.release()  # kept for the next request if the error body came whole
        message = self.scrub(channel, _upstream_message(b"".join(parts)))
        status = response.status
        if status == 429:
            raise AttemptFailure("429", message or "rate limited upstream", status=status,
                                 retry_after_s=_retry_after(response.headers))
        outcome = "5xx" if status >= 500 else "4xx"
        raise AttemptFailure(outcome, message or f"upstream answered {status}", status=status)

    async def read_json(self, channel: Channel, response: H1Response) -> dict[str, Any]:
        """The whole body of a non-streamed answer, parsed; malformed JSON or a body over the size
        cap is a failure."""
        try:
            if (response.content_length or 0) > self.max_body_bytes:
                raise H1Error("malformed", "sent a body over the size limit")
            raw = await response.read(self.max_body_bytes)
        except TimeoutError:
            raise AttemptFailure("timeout", f"channel {channel.id} timed out", status=response.status) from None
        except H1Error as exc:
            if exc.outcome == "malformed":
                raise AttemptFailure("malformed", f"channel {channel.id} {exc}", status=response.status) from None
            raise AttemptFailure("5xx", f"channel {channel.id} broke the response", status=response.status) from None
        finally:
            response.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise AttemptFailure("malformed", f"channel {channel.id} sent malformed JSON", status=response.status)
        return data
