"""GET /playground: the one-page browser playground (SPEC §6), served by the gateway itself.

The page is a single self-contained file (HTML + CSS + vanilla JS) shipped as package
data in `tokensforge.playground`; it is read once and served from memory. It talks to
the same origin's /v1 endpoints with the API key the user pastes, which it keeps in the
tab's sessionStorage only. The Content-Security-Policy pins the page's own inline script
and style by hash and allows network access to this origin only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()


def _load_page() -> bytes:
    return resources.files("tokensforge.playground").joinpath("index.html").read_bytes()


def _hashes(page: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode("ascii") + "'"
        for b in blocks)


PAGE = _load_page()
_text = PAGE.decode("utf-8")
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    f"script-src {_hashes(_text, 'script')}",
    f"style-src {_hashes(_text, 'style')}",
    "connect-src 'self'",
    "img-src 'self' data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


@routes.get("/playground")
@routes.get("/playground/")
async def playground(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8", headers=HEADERS)


FAVICON = resources.files("tokensforge.playground").joinpath("favicon.ico").read_bytes()


@routes.get("/favicon.ico")
async def favicon(request: web.Request) -> web.Response:
    """Browsers ask every page load for it; a 404 there is noise in every console."""
    return web.Response(body=FAVICON, content_type="image/x-icon",
                        headers={"cache-control": "public, max-age=86400", "x-content-type-options": "nosniff"})
