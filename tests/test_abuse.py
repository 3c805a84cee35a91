"""Abuse resistance: bad keys, a saturated pool, slow clients, probe floods, rate-limit memory,
secrets in repr, and bad input that must get a 4xx (SPEC §5.6), never a 500."""

from __future__ import annotations

from tokensforge.settings import Settings

MESSAGES = [{"role": "user", "content": "hello"}]


# ------------------------------------------------------------------ 6. secrets stay out of repr


def test_settings_repr_shows_no_secret() -> None:
    settings = Settings.from_env({
        "TOKENSFORGE_ADMIN_TOKEN": "adm-very-secret", "OPENAI_API_KEY": "sk-very-secret",
        "TOKENSFORGE_DATABASE_URL": "postgresql://tf:pw-very-secret@db/tf", "TOKENSFORGE_DB_POOL_SIZE": "7"})
    assert settings.admin_token == "adm-very-secret" and settings.channel_env["OPENAI_API_KEY"] == "sk-very-secret"
    for text in (repr(settings), str(settings), f"{settings}"):
        assert "very-secret" not in text
        assert "db_pool_size=7" in text  # the rest is still there to debug with
