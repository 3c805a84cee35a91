"""Stored Responses turns (`store` / `previous_response_id`): per account, with a retention period."""

from __future__ import annotations

from typing import Any

import asyncpg

from .errors import NotFound
from .ledger.store import translated

RETENTION_DAYS = 30


class ConversationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def save(self, response_id: str, account_id: str, history: list[dict[str, Any]]) -> None:
        async with translated("conversation"):
            await self.pool.execute(
                "INSERT INTO stored_responses (id, account_id, history, expires_at)"
                " VALUES ($1, $2, $3, now() + make_interval(days => $4)) ON CONFLICT (id) DO NOTHING",
                response_id, account_id, history, RETENTION_DAYS)

    async def load(self, response_id: str, account_id: str) -> list[dict[str, Any]]:
        """The stored conversation up to and including `response_id`; 404 if unknown, expired or another
        account's (the same answer for all three, so ids of other accounts cannot be probed)."""
        async with translated("conversation"):
            history = await self.pool.fetchval(
                "SELECT history FROM stored_responses WHERE id = $1 AND account_id = $2 AND expires_at > now()",
                response_id, account_id)
        if history is None:
            raise NotFound(f"previous response {response_id!r} was not found", param="previous_response_id")
        stored: list[dict[str, Any]] = history
        return stored

    async def purge(self) -> int:
        async with translated("conversation"):
            status = await self.pool.execute("DELETE FROM stored_responses WHERE expires_at < now()")
        return int(status.split()[-1])
