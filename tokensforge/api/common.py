"""Request and response helpers shared by the endpoint modules."""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidRequest

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


def require_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{key}' is required and must be a non-empty string", param=key)
    return value


def optional_str(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else require_str(body, key)


def query_limit(request: web.Request, default: int = 20, maximum: int = 100) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {maximum}", param="limit")
    return int(raw)
