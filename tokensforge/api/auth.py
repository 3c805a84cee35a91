"""Bearer API keys → identity and effective policy."""

from __future__ import annotations

from aiohttp import web

from ..accounts import KeyIdentity
from ..errors import InvalidApiKey
from ..keys import KEY_PREFIX
from ..policy import EffectivePolicy, effective
from ..state import GATEWAY, Gateway


async def authenticate(request: web.Request) -> tuple[Gateway, KeyIdentity, EffectivePolicy]:
    gw = request.app[GATEWAY]
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not token.startswith(KEY_PREFIX):
        raise InvalidApiKey("missing or malformed API key: send 'Authorization: Bearer tf-…'")
    identity = await gw.keys.lookup(token)
    if identity is None or identity.revoked:
        raise InvalidApiKey("invalid or revoked API key")
    policy = effective(identity.key_policy, identity.project_policy,
                       key_id=identity.key_id, project_id=identity.project_id)
    return gw, identity, policy
