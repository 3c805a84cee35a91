"""Request and response helpers shared by the endpoint modules."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidRequest, TokensForgeError
from ..state import GATEWAY

REQUEST_ID = web.RequestKey("request_id", str)
#: set once a streamed answer started: from then on an error can only end the stream, not replace it
STREAM = web.RequestKey("stream", web.StreamResponse)


_ID_BYTES = 12
_ID_BATCH = 256
_random_ids: Iterator[str] = iter(())


def new_request_id() -> str:
    """"req_" + 24 hex digits from the OS's CSPRNG, as `secrets.token_hex(12)` gives, but read 256 ids
    at a time: one getrandom() call per request was a measurable share of the hot path. (Workers are
    spawned, never forked, so no two processes share a batch.)"""
    global _random_ids
    chunk = next(_random_ids, None)
    if chunk is None:
        pool = os.urandom(_ID_BYTES * _ID_BATCH).hex()
        step = _ID_BYTES * 2
        _random_ids = iter([pool[i:i + step] for i in range(0, len(pool), step)])
        chunk = next(_random_ids)
    return "req_" + chunk


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


#: deeper JSON is refused: no request of ours nests near this, and deep nesting is what breaks
#: recursive code downstream (orjson.dumps itself gives up past 254 levels)
MAX_JSON_DEPTH = 64
_DEFAULT_BODY_READ_TIMEOUT_S = 60.0


class RequestTimeout(TokensForgeError):
    status, code, type, final = 408, "request_timeout", "invalid_request_error", True


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that names the problem.

    A client that takes longer than `body_read_timeout_s` to send its body gets a 408; aiohttp
    then closes the connection once its lingering time has passed (server.py `running()`)."""
    gw = request.app.get(GATEWAY)
    timeout_s = gw.settings.body_read_timeout_s if gw is not None else _DEFAULT_BODY_READ_TIMEOUT_S
    if request.content.is_eof():  # the whole body is already here (small bodies come with the head)
        raw = await request.read()
    else:
        try:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    # fewer brackets than the limit cannot nest past it: only then walk the tree (C-speed count)
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and _depth_exceeds(body, MAX_JSON_DEPTH):
        raise InvalidRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether objects/arrays nest deeper than `limit` (iterative: no recursion to blow up)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def check_text(value: str, param: str) -> str:
    """PostgreSQL text cannot hold NUL: refuse it at the edge (400) instead of failing in the database."""
    if "\x00" in value:
        raise InvalidRequest(f"'{param}' must not contain NUL characters", param=param)
    return value


def check_json_text(value: Any, param: str) -> Any:
    """`check_text` for every string (and key) inside a JSON value bound for a jsonb column."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            check_text(node, param)
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return value


def path_param(request: web.Request, name: str) -> str:
    return check_text(request.match_info[name], name)


def query_text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return None if value is None else check_text(value, name)


def require_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{key}' is required and must be a non-empty string", param=key)
    return check_text(value, key)


def optional_str(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else require_str(body, key)


def query_limit(request: web.Request, default: int = 20, maximum: int = 100) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {maximum}", param="limit")
    return int(raw)
