"""API key material: plaintext shown once, SHA-256 stored, a short prefix for display."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "tf-"


def new_key() -> str:
    # 32 random bytes → 43 url-safe characters
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode("utf-8")).digest()


def display_prefix(plaintext: str) -> str:
    """The first characters, enough to recognise a key in a list, too few to use it."""
    return plaintext[:7] + "…"


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(8)}"
