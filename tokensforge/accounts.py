"""Accounts, projects and API keys in the database (no money here: see ledger/)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .errors import InvalidRequest, NotFound
from .keys import display_prefix, hash_key, new_id, new_key
from .ledger.store import translated
from .policy import Policy, parse_policy


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What the proxy needs to know about a caller, cached briefly in memory."""

    key_id: str
    account_id: str
    project_id: str | None
    key_policy: Policy
    project_policy: Policy | None
    revoked: bool


class AccountStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.identity_queries = 0  # key lookups that reached the database (the key cache's misses)

    async def create_account(
        self, name: str, bucket_ids: Iterable[str], account_id: str | None = None,
    ) -> dict[str, Any]:
        account_id = account_id or new_id("acct")
        async with translated("admin"), self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO accounts (id, name) VALUES ($1, $2) RETURNING id, name, created_at", account_id, name)
            await conn.executemany(
                "INSERT INTO buckets (account_id, bucket) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(account_id, b) for b in bucket_ids])
        return _account_view(row)

    async def ensure_buckets(self, bucket_ids: Iterable[str]) -> None:
        """Every account has a row per catalog bucket (a reload may add buckets)."""
        async with translated("admin"):
            await self.pool.execute(
                "INSERT INTO buckets (account_id, bucket) SELECT a.id, b FROM accounts a, unnest($1::text[]) b"
                " ON CONFLICT DO NOTHING", list(bucket_ids))

    async def get_account(self, account_id: str) -> dict[str, Any]:
        async with translated("admin"), self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT id, name, created_at FROM accounts WHERE id = $1", account_id)
            if row is None:
                raise NotFound(f"account {account_id!r} does not exist")
            projects = await conn.fetch(
                "SELECT id, name, policy, created_at FROM projects WHERE account_id = $1 ORDER BY created_at",
                account_id)
            keys = await conn.fetch(
                "SELECT id, name, project_id, policy, key_prefix, revoked_at, created_at FROM api_keys"
                " WHERE account_id = $1 ORDER BY created_at", account_id)
        view = _account_view(row)
        view["projects"] = [_project_view(p, account_id) for p in projects]
        view["keys"] = [_key_view(k, account_id) for k in keys]
        return view

    async def create_project(self, account_id: str, name: str, policy: dict[str, Any]) -> dict[str, Any]:
        parse_policy(policy)
        try:
            async with translated("admin"):
                row = await self.pool.fetchrow(
                    "INSERT INTO projects (id, account_id, name, policy) VALUES ($1, $2, $3, $4)"
                    " RETURNING id, name, policy, created_at", new_id("proj"), account_id, name, policy)
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"account {account_id!r} does not exist") from None
        return _project_view(row, account_id)

    async def create_key(
        self, account_id: str, name: str, project_id: str | None, policy: dict[str, Any],
        plaintext: str | None = None,
    ) -> dict[str, Any]:
        """Returns the key view plus its plaintext, the only time it exists outside the caller."""
        parse_policy(policy)
        plaintext = plaintext or new_key()
        async with translated("admin"), self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id):
                raise NotFound(f"account {account_id!r} does not exist")
            if project_id is not None and not await conn.fetchval(
                    "SELECT 1 FROM projects WHERE id = $1 AND account_id = $2", project_id, account_id):
                raise InvalidRequest(f"project {project_id!r} is not a project of this account", param="project_id")
            row = await conn.fetchrow(
                "INSERT INTO api_keys (id, account_id, project_id, name, policy, key_hash, key_prefix)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " RETURNING id, name, project_id, policy, key_prefix, revoked_at, created_at",
                new_id("key"), account_id, project_id, name, policy, hash_key(plaintext), display_prefix(plaintext))
        view = _key_view(row, account_id)
        view["key"] = plaintext
        return view

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        async with translated("admin"):
            row = await self.pool.fetchrow(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
                " RETURNING id, account_id, name, project_id, policy, key_prefix, revoked_at, created_at", key_id)
        if row is None:
            raise NotFound(f"key {key_id!r} does not exist")
        return _key_view(row, row["account_id"])

    async def identity(self, plaintext: str) -> KeyIdentity | None:
        self.identity_queries += 1
        async with translated("auth"):
            row = await self.pool.fetchrow(
                "SELECT k.id, k.account_id, k.project_id, k.policy, k.revoked_at, p.policy AS project_policy"
                " FROM api_keys k LEFT JOIN projects p ON p.id = k.project_id WHERE k.key_hash = $1",
                hash_key(plaintext))
        if row is None:
            return None
        return KeyIdentity(
            key_id=row["id"], account_id=row["account_id"], project_id=row["project_id"],
            key_policy=parse_policy(row["policy"]),
            project_policy=parse_policy(row["project_policy"]) if row["project_id"] else None,
            revoked=row["revoked_at"] is not None)



def _account_view(row: Any) -> dict[str, Any]:
    return {"object": "account", "id": row["id"], "name": row["name"], "created_at": row["created_at"].isoformat()}


def _project_view(row: Any, account_id: str) -> dict[str, Any]:
    return {"object": "project", "id": row["id"], "account_id": account_id, "name": row["name"],
            "policy": row["policy"], "created_at": row["created_at"].isoformat()}


def _key_view(row: Any, account_id: str) -> dict[str, Any]:
    return {
        "object": "api_key", "id": row["id"], "account_id": account_id, "project_id": row["project_id"],
        "name": row["name"], "policy": row["policy"], "prefix": row["key_prefix"],
        "revoked": row["revoked_at"] is not None,
        "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None,
        "created_at": row["created_at"].isoformat(),
    }
