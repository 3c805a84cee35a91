"""Abuse resistance: bad keys, a saturated pool, slow clients, probe floods, rate-limit memory,
secrets in repr, and bad input that must get a 4xx (SPEC §5.6), never a 500."""

from __future__ import annotations

import pytest

from tokensforge.errors import RateLimited
from tokensforge.ratelimit import RateLimiter
from tokensforge.settings import Settings

MESSAGES = [{"role": "user", "content": "hello"}]


# ------------------------------------------------------------------ 5. rate-limiter memory is bounded


def test_idle_rate_limit_scopes_are_dropped() -> None:
    limiter = RateLimiter()
    for i in range(10_000):
        limiter.admit(f"key:{i}", 10, None, 1, now=i * 0.001)
    assert limiter.scopes() == 10_000
    limiter.admit("key:late", 10, None, 1, now=200.0)
    assert limiter.scopes() == 1


def test_a_busy_scope_holds_one_slot_per_second_not_one_entry_per_request() -> None:
    limiter = RateLimiter()
    for i in range(60_000):  # 1,000 requests a second for a minute
        limiter.admit("key:busy", None, 10**9, 3, now=i * 0.001)
    assert limiter.slots("key:busy") <= 61
    with pytest.raises(RateLimited):  # still every token of the last minute counts
        limiter.admit("key:busy", None, 60_000 * 3, 1, now=59.9995)


def test_rpm_keeps_its_sliding_minute() -> None:
    limiter = RateLimiter()
    for t in (0.0, 10.0, 20.0):
        limiter.admit("key:a", 3, None, 1, now=t)
    with pytest.raises(RateLimited) as info:
        limiter.admit("key:a", 3, None, 1, now=30.0)
    assert info.value.headers["retry-after"] == "30"
    assert info.value.body()["error"]["limit_scope"] == "key"
    limiter.admit("key:a", 3, None, 1, now=60.0)  # the request at 0 left the window
    with pytest.raises(RateLimited):  # a refused request is not counted, the admitted one is
        limiter.admit("key:a", 3, None, 1, now=60.5)
    limiter.admit("key:b", 3, None, 1, now=30.0)  # scopes are separate


def test_tpm_waits_for_enough_tokens_to_leave_the_window() -> None:
    limiter = RateLimiter()
    limiter.admit("project:p", None, 250, 100, now=0.0)
    limiter.admit("project:p", None, 250, 100, now=30.0)
    with pytest.raises(RateLimited) as info:
        limiter.admit("project:p", None, 250, 100, now=40.0)
    assert info.value.headers["retry-after"] == "20" and "tokens" in info.value.message
    limiter.admit("project:p", None, 250, 50, now=40.0)  # fits exactly
    with pytest.raises(RateLimited) as info:
        limiter.admit("project:p", None, 250, 300, now=41.0)  # can never fit
    assert info.value.headers["retry-after"] == "60"
    limiter.admit("project:p", None, 250, 100, now=60.0)


# ------------------------------------------------------------------ 6. secrets stay out of repr


def test_settings_repr_shows_no_secret() -> None:
    settings = Settings.from_env({
        "TOKENSFORGE_ADMIN_TOKEN": "adm-very-secret", "OPENAI_API_KEY": "sk-very-secret",
        "TOKENSFORGE_DATABASE_URL": "postgresql://tf:pw-very-secret@db/tf", "TOKENSFORGE_DB_POOL_SIZE": "7"})
    assert settings.admin_token == "adm-very-secret" and settings.channel_env["OPENAI_API_KEY"] == "sk-very-secret"
    for text in (repr(settings), str(settings), f"{settings}"):
        assert "very-secret" not in text
        assert "db_pool_size=7" in text  # the rest is still there to debug with
