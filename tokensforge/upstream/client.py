"""Calls to upstream channels: one pooled session, the channel's own secret, classified failures.

Every failure becomes an `AttemptFailure` whose `outcome` is one of the retry
classes of SPEC §1 (timeout, connect, 5xx, 429) or a class that is never
retried (4xx). Messages never carry the channel's URL or secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ..catalog import Channel


class AttemptFailure(Exception):
    def __init__(self, outcome: str, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


def new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True,
        json_serialize=lambda v: orjson.dumps(v).decode(), raise_for_status=False)


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
    """One channel's per-request constants (UpstreamClient._prepare)."""

    __slots__ = ("channel", "headers", "timeout", "_urls")

    def __init__(self, channel: Channel, headers: dict[str, str]) -> None:
        self.channel = channel
        self.headers = headers  # never mutated: a request with extra headers gets a copy
        # `total` bounds the whole exchange, body and stream included. A `sock_read` equal to it could
        # never fire first (it restarts on every read) yet re-arms a timer on every chunk received:
        # ~15 µs of CPU per request, more per stream. So it is set only for a shorter first-byte bound.
        first_byte_s = channel.first_byte_timeout_s
        self.timeout = aiohttp.ClientTimeout(
            total=channel.timeout_s, sock_connect=channel.connect_timeout_s,
            sock_read=first_byte_s if first_byte_s and first_byte_s < channel.timeout_s else None)
        self._urls: dict[str, URL] = {}

    def url(self, path: str) -> URL:
        """base_url + path, parsed once (aiohttp parses a string URL on every request)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.channel.base_url + path)
        return url


class UpstreamClient:
    """Opens requests to channels; concurrency per channel is capped by its max_concurrency.

    Upstreams are untrusted: a non-streamed body larger than `max_body_bytes` is a failure,
    like a malformed one."""

    def __init__(self, session: aiohttp.ClientSession, env: Mapping[str, str], *,
                 max_body_bytes: int = 16 * 1024 * 1024) -> None:
        self.session = session
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
        makes new ones): its timeouts, headers and parsed URLs."""
        prepared = self._prepared.get(channel.id)
        if prepared is None or prepared.channel is not channel:
            prepared = self._prepared[channel.id] = _Prepared(channel, self._headers(channel))
        return prepared

    async def open(self, channel: Channel, path: str, payload: bytes,
                   extra_headers: Mapping[str, str] | None = None) -> aiohttp.ClientResponse:
        """POST and wait for the status line; non-2xx answers become AttemptFailure."""
        prepared = self._prepare(channel)
        try:
            headers = prepared.headers
            if extra_headers:
                headers = {**headers, **extra_headers}
            response = await self.session.post(prepared.url(path), data=payload, headers=headers,
                                               timeout=prepared.timeout)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise AttemptFailure("timeout", f"channel {channel.id} timed out") from None
        except aiohttp.ClientConnectorError:
            raise AttemptFailure("connect", f"could not connect to channel {channel.id}") from None
        except aiohttp.ClientError as exc:
            raise AttemptFailure("connect", f"channel {channel.id} failed: {type(exc).__name__}") from None
        if response.status < 400:
            return response
        try:
            raw = await response.content.read(64 * 1024)  # enough for any error message; never unbounded
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        finally:
            response.close()
        message = self.scrub(channel, _upstream_message(raw))
        status = response.status
        if status == 429:
            raise AttemptFailure("429", message or "rate limited upstream", status=status,
                                 retry_after_s=_retry_after(response.headers))
        outcome = "5xx" if status >= 500 else "4xx"
        raise AttemptFailure(outcome, message or f"upstream answered {status}", status=status)

    async def _read_capped(self, channel: Channel, response: aiohttp.ClientResponse) -> bytes:
        chunks, size = [], 0
        while chunk := await response.content.read(64 * 1024):
            size += len(chunk)
            if size > self.max_body_bytes:
                raise AttemptFailure("malformed", f"channel {channel.id} sent a body over the size limit",
                                     status=response.status)
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(self, channel: Channel, response: aiohttp.ClientResponse) -> dict[str, Any]:
        """The whole body of a non-streamed answer, parsed; malformed JSON or a body over the size
        cap is a failure."""
        if (response.content_length or 0) > self.max_body_bytes:
            raise AttemptFailure("malformed", f"channel {channel.id} sent a body over the size limit",
                                 status=response.status)
        try:
            raw = await response.read() if response.content_length is not None else await self._read_capped(
                channel, response)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise AttemptFailure("timeout", f"channel {channel.id} timed out", status=response.status) from None
        except aiohttp.ClientError:
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
