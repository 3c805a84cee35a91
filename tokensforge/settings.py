"""Settings: built once from the command line and the environment, then passed explicitly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    config_path: Path | None = None
    database_url: str | None = None
    admin_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".tokensforge")
    workers: int = 1
    reservation_ttl_s: float = 600.0
    sweep_interval_s: float = 5.0
    key_cache_ttl_s: float = 0.5
    max_body_bytes: int = 4 * 1024 * 1024
    db_pool_size: int = 20
    channel_env: Mapping[str, str] = field(default_factory=dict)  # api_key_env → secret

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        config = overrides.pop("config_path", None) or env.get("TOKENSFORGE_CONFIG")
        values: dict[str, object] = {
            "config_path": Path(str(config)) if config else None,
            "database_url": env.get("TOKENSFORGE_DATABASE_URL") or None,
            "admin_token": env.get("TOKENSFORGE_ADMIN_TOKEN") or None,
            "channel_env": dict(env),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
