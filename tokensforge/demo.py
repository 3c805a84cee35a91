"""`tokensforge demo`: the whole product on one machine, with no setup.

Embedded PostgreSQL, the simulated upstream on a free loopback port, a demo
catalog pointing at it, and a funded demo account. The demo key and admin
token live in files under the data dir (the database holds only the key's
hash), so a restart keeps balances and prints the same key.
"""

from __future__ import annotations

import logging
import os
import secrets
from importlib import resources
from pathlib import Path

from .accounts import AccountStore
from .catalog import RESEARCH_FREE_BUCKET, Catalog, load_catalog
from .db import create_pool, migrate
from .keys import hash_key, new_key
from .ledger.pools import PoolStore
from .ledger.store import LedgerStore
from .mock_upstream import Faults, MockConfig
from .mock_upstream import create_app as create_mock_app
from .server import Database, listening_socket, running, serve_forever
from .settings import Settings

log = logging.getLogger("tokensforge.demo")

DEMO_ACCOUNT = "acct_demo"
DEMO_FUNDING_NANOS = {"credit": 5_000_000_000, "routed": 5_000_000_000}  # $5 each
UPSTREAM_KEY_ENV = "TOKENSFORGE_DEMO_UPSTREAM_KEY"
#: the demo account's subscription: $2 of allowance a month into each pool bucket of the catalog
DEMO_PLAN = "Pro (demo)"
DEMO_PLAN_ALLOWANCE_NANOS = 2_000_000_000


def _secret_file(path: Path, make: str) -> str:
    """The secret kept in `path`, or `make`, stored there first.

    Created 0600 from the start (never readable by others, not even between a write
    and a chmod) and exclusively (an existing file, whatever made it, is never replaced).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(make + "\n")
    except BaseException:
        path.unlink(missing_ok=True)  # an empty secret file would be read back as the secret
        raise
    return make


def write_catalog(data_dir: Path, upstream_url: str) -> Path:
    template = resources.files("tokensforge.demo_files").joinpath("catalog.toml").read_text(encoding="utf-8")
    path = data_dir / "demo-catalog.toml"
    path.write_text(template.replace("{upstream}", upstream_url), encoding="utf-8")
    return path


async def bootstrap(dsn: str, catalog: Catalog, api_key: str) -> None:
    """Idempotently create the demo account, its key and its initial funding."""
    await migrate(dsn)
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        accounts, ledger = AccountStore(pool), LedgerStore(pool)
        if not await pool.fetchval("SELECT 1 FROM accounts WHERE id = $1", DEMO_ACCOUNT):
            await accounts.create_account("Demo account", catalog.buckets, account_id=DEMO_ACCOUNT)
        if not await pool.fetchval("SELECT 1 FROM api_keys WHERE key_hash = $1", hash_key(api_key)):
            await accounts.create_key(DEMO_ACCOUNT, "demo key", None, {}, plaintext=api_key)
        for bucket, amount in DEMO_FUNDING_NANOS.items():
            await ledger.topup(DEMO_ACCOUNT, bucket, amount, f"demo-initial-{bucket}", "demo funding")
        pools = PoolStore(ledger)
        live = {s["bucket"] for s in await pools.subscriptions(DEMO_ACCOUNT) if s["status"] != "ended"}
        for pool_bucket in catalog.buckets.values():
            if pool_bucket.kind == "pool" and pool_bucket.id not in live | {RESEARCH_FREE_BUCKET}:
                await pools.create(DEMO_ACCOUNT, pool_bucket.id, DEMO_PLAN, DEMO_PLAN_ALLOWANCE_NANOS, "month", None)
        await pools.tick(catalog.research_free_daily_nanos)  # today's free research allowance, before serving
    finally:
        await pool.close()


def banner(host: str, port: int, api_key: str, admin_token: str, *, data_dir: Path, db: Database) -> str:
    base = f"http://{host}:{port}"
    moved = f"\n                 because {db.home.reason}" if db.home is not None and db.home.moved else ""
    return f"""
Tokens Forge demo is running.

  API base URL   {base}/v1
  API key        {api_key}
  Admin token    {admin_token}
  Playground     {base}/playground
                 {base}/playground#key={api_key}  (opens with the key set)
  Metrics        {base}/metrics
  Demo files     {data_dir.absolute()}  (key, admin token, catalog)
  Database       {db.describe()}{moved}

Try it:
  curl -s {base}/v1/balance -H "Authorization: Bearer {api_key}"
  curl -s {base}/v1/chat/completions -H "Authorization: Bearer {api_key}" \\
       -H "content-type: application/json" \\
       -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}]}}'

Press Ctrl-C to stop (balances are kept in {db.describe()}).
"""


async def run_demo(settings: Settings, db: Database) -> None:
    data_dir, dsn = settings.data_dir, db.dsn
    upstream_secret = _secret_file(data_dir / "demo-upstream-secret", secrets.token_urlsafe(24))
    api_key = _secret_file(data_dir / "demo-key", new_key())
    admin_token = settings.admin_token or _secret_file(data_dir / "admin-token", "adm-" + secrets.token_urlsafe(24))
    mock = create_mock_app(MockConfig(
        per_model={"relay-a/gpt-4o-mini-flaky": Faults(error_status=503, error_rate=0.25)},
        api_key=upstream_secret))
    mock_sock = listening_socket("127.0.0.1", 0)
    upstream_url = f"http://127.0.0.1:{mock_sock.getsockname()[1]}/v1"
    async with running(mock, mock_sock):
        catalog = load_catalog(write_catalog(data_dir, upstream_url))
        await bootstrap(dsn, catalog, api_key)
        env = dict(settings.channel_env)
        env[UPSTREAM_KEY_ENV] = upstream_secret
        demo_settings = Settings(**{**settings.__dict__, "config_path": data_dir / "demo-catalog.toml",
                                    "admin_token": admin_token, "channel_env": env})

        async def ready() -> None:
            print(banner(settings.host, settings.port, api_key, admin_token, data_dir=data_dir, db=db), flush=True)

        await serve_forever(demo_settings, catalog, dsn, on_ready=ready)
