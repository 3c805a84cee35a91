"""Settings: built once from the command line and the environment, then passed explicitly."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .tracing import wanted as tracing_wanted


@dataclass(frozen=True)
class Settings:
    config_path: Path | None = None
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    # Migrations (a session advisory lock) and the LISTEN connection need a session of their own, which a
    # transaction-mode pooler (PgBouncer) in TOKENSFORGE_DATABASE_URL does not give: they use this URL.
    direct_database_url: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    #: what webhook signing secrets are derived from (webhook_model.secrets_key); the admin token when unset
    secret_key: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".tokensforge")
    workers: int = 1
    reservation_ttl_s: float = 600.0
    sweep_interval_s: float = 5.0
    key_cache_ttl_s: float = 0.5
    unknown_key_cache_ttl_s: float = 5.0  # NOTIFY 'keys' (sent on key creation) clears it sooner
    unknown_key_cache_size: int = 10_000
    max_body_bytes: int = 4 * 1024 * 1024
    max_upstream_body_bytes: int = 16 * 1024 * 1024  # a larger non-streamed upstream answer is a failure
    db_pool_size: int = 20
    db_acquire_timeout_s: float = 5.0  # a request waits at most this long for a pool connection, then 503
    # asyncpg's per-connection cache of named prepared statements (its default, 100). 0 = unnamed statements
    # only, needed behind PgBouncer < 1.21 in transaction mode, where a named statement prepared on one server
    # connection is missing (or already exists) on the next one.
    db_statement_cache_size: int = 100
    http_keepalive_timeout_s: float = 75.0  # idle connection, and the time to send a request head
    body_read_timeout_s: float = 60.0  # the time a client may take to send a JSON request body
    leases: bool = True  # hold money in per-process leases (ledger/leases.py); off = a reservation per request
    lease_ttl_s: float = 60.0  # a crashed process's leases are voided this long after its last renewal
    lease_fraction: float = 0.25  # a grant takes at most this share of the bucket's available balance
    lease_idle_s: float = 5.0  # unused lease money goes back after this long without a request
    breaker_failure_threshold: int = 5
    breaker_cooldown_s: float = 5.0
    # webhook delivery (webhooks.py): every process polls the outbox; a failed POST is tried again after
    # retry_base_s, doubling up to retry_max_s, until the event is webhook_give_up_s old
    tracing: bool = False  # OpenTelemetry traces, on when the standard OTEL_* variables name an OTLP endpoint
    webhooks: bool = True
    webhook_poll_interval_s: float = 1.0
    webhook_timeout_s: float = 10.0
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 3600.0
    webhook_give_up_s: float = 24 * 3600.0
    channel_env: Mapping[str, str] = field(default_factory=dict, repr=False)  # api_key_env → secret

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        config = overrides.pop("config_path", None) or env.get("TOKENSFORGE_CONFIG")
        values: dict[str, object] = {
            **_tunables(env),
            "config_path": Path(str(config)) if config else None,
            "database_url": env.get("TOKENSFORGE_DATABASE_URL") or None,
            "direct_database_url": env.get("TOKENSFORGE_DIRECT_DATABASE_URL") or None,
            "admin_token": env.get("TOKENSFORGE_ADMIN_TOKEN") or None,
            "secret_key": env.get("TOKENSFORGE_SECRET_KEY") or None,
            "channel_env": dict(env),
            "tracing": tracing_wanted(env),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["direct_database_url"] and not values["database_url"]:
            raise ValueError("TOKENSFORGE_DIRECT_DATABASE_URL is set but TOKENSFORGE_DATABASE_URL is not: "
                             "the direct URL only makes sense next to a pooled one")
        return cls(**values)  # type: ignore[arg-type]

    def direct_dsn(self, pool_dsn: str) -> str:
        """The database URL for sessions a transaction-mode pooler would break (migrations, LISTEN):
        TOKENSFORGE_DIRECT_DATABASE_URL, else the pool's own `pool_dsn`."""
        return self.direct_database_url or pool_dsn


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


# Operational knobs that ops may set through the environment (TOKENSFORGE_<NAME>).
_TUNABLE: dict[str, Callable[[str], object]] = {
    "reservation_ttl_s": float, "sweep_interval_s": float, "key_cache_ttl_s": float,
    "unknown_key_cache_ttl_s": float, "unknown_key_cache_size": int,
    "max_body_bytes": int, "max_upstream_body_bytes": int, "db_pool_size": int, "db_acquire_timeout_s": float,
    "db_statement_cache_size": int,
    "http_keepalive_timeout_s": float, "body_read_timeout_s": float,
    "breaker_failure_threshold": int, "leases": _flag, "lease_ttl_s": float, "lease_fraction": float,
    "lease_idle_s": float, "breaker_cooldown_s": float,
    "webhooks": _flag, "webhook_poll_interval_s": float, "webhook_timeout_s": float, "webhook_retry_base_s": float,
    "webhook_retry_max_s": float, "webhook_give_up_s": float,
}


def _tunables(env: Mapping[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, kind in _TUNABLE.items():
        raw = env.get(f"TOKENSFORGE_{name.upper()}")
        if raw:
            try:
                values[name] = kind(raw)
            except ValueError:
                what = getattr(kind, "__name__", "value").lstrip("_")  # _flag → "flag"
                raise ValueError(f"TOKENSFORGE_{name.upper()}={raw!r} is not a valid {what}") from None
    return values
