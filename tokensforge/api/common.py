"""Request and response helpers shared by the endpoint modules."""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidRequest, NotFound

REQUEST_ID = web.RequestKey("request_id", str)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that names the problem."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def has_nul(value: Any) -> bool:
    """PostgreSQL text and jsonb cannot hold U+0000: such a value must be refused before it gets there."""
    if isinstance(value, str):
        return "\x00" in value
    return value is not None and b"\\u0000" in orjson.dumps(value)


def no_nul(value: Any, param: str) -> Any:
    if has_nul(value):
        raise InvalidRequest(f"'{param}' must not contain NUL characters", param=param)
    return value


def require_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{key}' is required and must be a non-empty string", param=key)
    return str(no_nul(value, key))


def path_id(request: web.Request, name: str) -> str:
    """An id from the URL path; one no row can have (a NUL) is simply not found."""
    value = request.match_info[name]
    if has_nul(value):
        raise NotFound(f"no {name.removesuffix('_id')} {value!r}")
    return value


def query_str(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return None if value is None else str(no_nul(value, name))


def optional_str(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else require_str(body, key)


def query_limit(request: web.Request, default: int = 20, maximum: int = 100) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:  # "²".isdigit(), int("²") fails
        raise InvalidRequest(f"'limit' must be an integer from 1 to {maximum}", param="limit")
    return int(raw)
