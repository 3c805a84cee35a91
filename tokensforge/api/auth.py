"""API keys (`Authorization: Bearer`, or `x-api-key` as Anthropic clients send it) → identity and policy."""

from __future__ import annotations

from aiohttp import web

from ..accounts import KeyIdentity
from ..errors import InvalidApiKey
from ..keys import KEY_PREFIX
from ..policy import EffectivePolicy
from ..state import GATEWAY, Gateway


async def authenticate(request: web.Request) -> tuple[Gateway, KeyIdentity, EffectivePolicy]:
    gw = request.app[GATEWAY]
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "").strip()
    if not token.startswith(KEY_PREFIX):
        raise InvalidApiKey("missing or malformed API key: send 'Authorization: Bearer tf-…' (or x-api-key)")
    caller = await gw.keys.lookup(token)
    if caller is None:
        raise InvalidApiKey("invalid or revoked API key")
    return gw, caller[0], caller[1]
