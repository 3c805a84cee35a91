"""Webhooks, the pure part (SPEC §2 "Webhooks"): what a webhook may be, how a delivery is signed,
when a failed one is tried again. No I/O: `webhooks.py` stores and delivers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from .errors import InvalidRequest

EVENTS = ("balance.low", "budget.threshold", "pool.granted", "pool.expired")
SIGNATURE_HEADER = "x-tokensforge-signature"
MAX_URL_CHARS = 2048
MAX_WEBHOOKS_PER_ACCOUNT = 20


@dataclass(frozen=True, slots=True)
class NewWebhook:
    url: str
    events: tuple[str, ...]
    thresholds: dict[str, int]


def parse_webhook(body: Mapping[str, Any], buckets: Collection[str]) -> NewWebhook:
    """`{url, events, thresholds?}` checked (400 naming the field); `buckets` are the catalog's."""
    url = body.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest("'url' must be a non-empty string (an http or https URL)", param="url")
    if len(url) > MAX_URL_CHARS or "\x00" in url or any(c.isspace() for c in url):
        raise InvalidRequest(f"'url' must be a URL of at most {MAX_URL_CHARS} characters, without spaces",
                             param="url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("'url' must be an http or https URL with a host", param="url")
    events = body.get("events")
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise InvalidRequest(f"'events' must be a non-empty list of event types ({', '.join(EVENTS)})",
                             param="events")
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise InvalidRequest(f"unknown event type {unknown[0]!r} (types: {', '.join(EVENTS)})", param="events")
    thresholds = _thresholds(body.get("thresholds"), buckets)
    if "balance.low" in events and not thresholds:
        raise InvalidRequest("'balance.low' needs 'thresholds': {bucket: nanos} (the available amount it "
                             "alerts below)", param="thresholds")
    return NewWebhook(url, tuple(dict.fromkeys(events)), thresholds)


def _thresholds(raw: Any, buckets: Collection[str]) -> dict[str, int]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest("'thresholds' must be an object {bucket: nanos}", param="thresholds")
    out: dict[str, int] = {}
    for bucket, nanos in raw.items():
        if bucket not in buckets:
            raise InvalidRequest(f"'thresholds' names unknown bucket {bucket!r} (buckets: {', '.join(buckets)})",
                                 param="thresholds")
        if isinstance(nanos, bool) or not isinstance(nanos, int) or not 0 < nanos < 2**63:
            raise InvalidRequest(f"'thresholds.{bucket}' must be a positive integer (nano-USD)", param="thresholds")
        out[bucket] = nanos
    return out


def new_salt() -> str:
    """A webhook's public salt: stored, useless without the server's key (`derive_secret`)."""
    return secrets.token_hex(16)


def secrets_key(secret_key: str | None, admin_token: str | None) -> bytes | None:
    """The server key webhook secrets are derived from: TOKENSFORGE_SECRET_KEY, else one derived from the admin
    token (which every webhook's creator had to hold); None when the server has neither."""
    base = secret_key or admin_token
    if not base:
        return None
    return hmac.new(base.encode(), b"tokensforge webhook secrets", hashlib.sha256).digest()


def derive_secret(key: bytes, webhook_id: str, salt: str) -> str:
    """The webhook's signing secret, recomputed whenever it signs: the database keeps only the salt, so a copy
    of the database cannot forge a delivery (the project stores no secret in plaintext). Its UTF-8 bytes are
    the receiver's HMAC key."""
    mac = hmac.new(key, f"{webhook_id}:{salt}".encode(), hashlib.sha256).digest()
    return "whsec_" + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now_s: float, tolerance_s: float = 300) -> bool:
    """What a receiver does: the header's v1 matches and its t is within `tolerance_s` of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now_s - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def event_body(event_id: str, type_: str, created_at: datetime, account_id: str, data: Any) -> bytes:
    return orjson.dumps({"id": event_id, "type": type_, "created_at": rfc3339(created_at),
                         "account_id": account_id, "data": data})


def retry_delay_s(attempts: int, base_s: float, max_s: float) -> float:
    """Doubling from `base_s` after each failed attempt (1st failure: base), at most `max_s`."""
    return float(min(max_s, base_s * 2 ** min(max(attempts - 1, 0), 40)))


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def webhook_view(row: Mapping[str, Any], *, secret: str | None = None) -> dict[str, Any]:
    view = {"id": row["id"], "object": "webhook", "account_id": row["account_id"], "url": row["url"],
            "events": list(row["events"]), "thresholds": row["thresholds"],
            "created_at": rfc3339(row["created_at"]), "pending_events": row.get("pending_events", 0)}
    if secret is not None:
        view["secret"] = secret
    return view


def delivery_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": f"whd_{row['seq']}", "object": "webhook.delivery", "event_id": row["event_id"],
            "type": row["type"], "attempt": row["attempt"], "status_code": row["status_code"],
            "ok": row["status_code"] is not None and 200 <= row["status_code"] < 300,
            "error": row["error"], "duration_ms": row["duration_ms"], "event_status": row["event_status"],
            "created_at": rfc3339(row["created_at"])}
