"""Stored Responses: per account, with a retention period.

A stored response serves two readers: a follow-up turn (`previous_response_id`), which needs the
canonical history of the conversation and, when the turn was forwarded natively, the upstream's own
response id and channel; and the client's views (`GET` / `DELETE /v1/responses/{id}`, its
`input_items`), which show the Response object exactly as it was returned and the input items sent.

Every read is `WHERE account_id = $1 AND id = $2` (another account's id is as unknown as one that never
existed, so ids cannot be probed) and sees only unexpired rows. Input items are paged by their position
(`seq`), never by OFFSET, so a page costs the same wherever it is and never reads more than a page.

Sizes are bounded before they reach here: a request body by `max_body_bytes` (4 MiB by default, the
input items and the history's input part), a unary upstream answer by `max_upstream_body_bytes` (16 MiB)
and any answer by the route's output cap. The store adds its own ceiling on what it keeps so that no
setting turns one row into an unbounded read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import orjson

from .errors import InvalidRequest, NotFound
from .ledger.store import translated

log = logging.getLogger("tokensforge.conversations")

RETENTION_DAYS = 30
#: a response object or an input-item list above this is not kept (logged): far above what the gateway's
#: own limits let through, low enough that a view always reads a bounded row
MAX_STORED_BYTES = 32 * 1024 * 1024
_SEQ_END = 2**31 - 1

Order = Literal["asc", "desc"]


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """What a follow-up turn needs from the response it continues."""

    history: list[dict[str, Any]]  # Responses input items: that turn's conversation and its answer
    upstream_response_id: str | None  # the upstream's own id, when that turn was forwarded natively
    channel_id: str | None  # the channel that served it natively


@dataclass(frozen=True, slots=True)
class ItemsPage:
    """One page of input items, in the order asked for; each item is its stored JSON text."""

    items: list[tuple[str, str]]  # (item id, item JSON)
    has_more: bool


# ================================================================== pure: input items


_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
_STATUS_TYPES = frozenset({"message", "function_call", "function_call_output"})


def input_items(value: Any, response_id: str) -> list[dict[str, Any]]:
    """The client's `input` as OpenAI's input_items lists it: item objects with ids, in the order sent.

    A string is one user message; a message's string content becomes one input_text (output_text for
    an assistant) part; an item keeps the id it came with unless an earlier item of the same request
    already had it (cursors must name one item) or it cannot be a text key (NUL). The ids the gateway
    gives (`msg_<base>_in<n>`) cannot collide with its output item ids (`msg_<base>_<n>`)."""
    raw = [{"role": "user", "content": value}] if isinstance(value, str) else value
    if not isinstance(raw, list):
        return []
    base = response_id.removeprefix("resp_")
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict):
            continue
        out = _normal_item(item)
        item_id = out.get("id")
        if not isinstance(item_id, str) or not item_id or "\x00" in item_id or item_id in seen:
            item_id = f"{_ID_PREFIX.get(str(out.get('type')), 'item')}_{base}_in{len(items)}"
        seen.add(item_id)
        items.append({"id": item_id, **{k: v for k, v in out.items() if k != "id"}})
    return items


def _normal_item(item: dict[str, Any]) -> dict[str, Any]:
    out = dict(item)
    if out.get("type") is None and "role" in out:
        out["type"] = "message"
    kind = out.get("type")
    if kind == "message" and isinstance(out.get("content"), str):
        text = out["content"]
        out["content"] = [{"type": "output_text", "text": text, "annotations": []} if out.get("role") == "assistant"
                          else {"type": "input_text", "text": text}]
    if kind in _STATUS_TYPES and out.get("status") is None:
        out["status"] = "completed"
    return out


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


# ================================================================== pure: pages


@dataclass(frozen=True, slots=True)
class Window:
    """A page request in `seq` terms: the open interval (after_seq, before_seq), scanned from one end."""

    after_seq: int
    before_seq: int
    ascending: bool  # scan direction in the database
    reverse: bool  # the scan runs against the listing order (a `before` page): flip the rows back


def window(order: Order, after_seq: int | None, before_seq: int | None) -> Window:
    """OpenAI's list semantics over a sequence: `after` continues in the listing order past the cursor,
    `before` gives the items just before the cursor (still listed in `order`). `has_more` then tells
    whether items remain beyond the page in the direction the page was read."""
    ascending = order == "asc"
    # a cursor's meaning in seq terms depends on the listing order
    low, high = (after_seq, before_seq) if ascending else (before_seq, after_seq)
    scan_up = ascending if after_seq is not None or before_seq is None else not ascending
    return Window(after_seq=-1 if low is None else low, before_seq=_SEQ_END if high is None else high,
                  ascending=scan_up, reverse=scan_up != ascending)


# ================================================================== I/O


_SAVE = """
WITH saved AS (
    INSERT INTO stored_responses (id, account_id, history, response, upstream_response_id, channel_id, expires_at)
    VALUES ($1, $2, $3, $4::json, $5, $6, now() + make_interval(days => $7))
    ON CONFLICT (id) DO NOTHING
    RETURNING id)
INSERT INTO stored_response_items (response_id, seq, item_id, item)
SELECT saved.id, u.n - 1, u.item_id, u.item::json
FROM saved, unnest($8::text[], $9::text[]) WITH ORDINALITY AS u (item_id, item, n)
"""
_LIVE = "account_id = $1 AND id = $2 AND expires_at > now()"
_PAGE = """
SELECT item_id, item::text AS item FROM stored_response_items
WHERE response_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq {direction} LIMIT $4
"""


class ConversationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def save(self, response_id: str, account_id: str, history: list[dict[str, Any]], *,
                   response: dict[str, Any] | None = None, input_items: Sequence[dict[str, Any]] = (),
                   upstream_response_id: str | None = None, channel_id: str | None = None) -> None:
        """Keep one response for `RETENTION_DAYS`: `history` for follow-ups; `response` (the object as it
        was returned; None: follow-ups only, not viewable) and its `input_items` (see `input_items`) for
        the views; the upstream's id and channel when it was forwarded natively. Saving an id twice keeps
        the first. What cannot be kept is not kept at all, logged, and the answer goes out regardless (it is
        already paid for): a response or item list above `MAX_STORED_BYTES`, or text PostgreSQL refuses
        (a NUL character cannot be in jsonb)."""
        response_text = None if response is None else _json_text(response)
        texts = [_json_text(item) for item in input_items]
        if len(response_text or "") + sum(map(len, texts)) > MAX_STORED_BYTES:
            log.warning("response %s is too large to store (over %d bytes)", response_id, MAX_STORED_BYTES)
            return
        try:
            async with translated("conversation"):
                await self.pool.execute(_SAVE, response_id, account_id, history, response_text,
                                        upstream_response_id, channel_id, RETENTION_DAYS,
                                        [str(item["id"]) for item in input_items], texts)
        except asyncpg.DataError as exc:
            log.warning("response %s cannot be stored: %s", response_id, exc)

    async def load(self, response_id: str, account_id: str) -> list[dict[str, Any]]:
        """The stored conversation up to and including `response_id`; 404 if unknown, expired, deleted or
        another account's (the same answer for all four, so ids of other accounts cannot be probed)."""
        return (await self.load_turn(response_id, account_id)).history

    async def load_turn(self, response_id: str, account_id: str) -> StoredTurn:
        """`load` with the upstream's own id and channel of a natively forwarded turn: when the same
        channel serves the follow-up, its `previous_response_id` can be rewritten to the upstream's id."""
        async with translated("conversation"):
            row = await self.pool.fetchrow(
                f"SELECT history, upstream_response_id, channel_id FROM stored_responses WHERE {_LIVE}",
                account_id, response_id)
        if row is None:
            raise NotFound(f"previous response {response_id!r} was not found", param="previous_response_id")
        return StoredTurn(row["history"], row["upstream_response_id"], row["channel_id"])

    async def response(self, response_id: str, account_id: str) -> bytes:
        """The Response object as it was returned (JSON bytes, verbatim); 404 as `load`."""
        async with translated("conversation"):
            text = await self.pool.fetchval(
                f"SELECT response::text FROM stored_responses WHERE {_LIVE} AND response IS NOT NULL",
                account_id, response_id)
        if text is None:
            raise _not_found(response_id)
        return str(text).encode()

    async def delete(self, response_id: str, account_id: str) -> None:
        """Forget a stored response: its views 404 and a follow-up naming it is refused from now on.

        Only the stored conversation goes (its input items with it). The usage record, the receipt and
        the ledger entries of the request that produced it stay as they are: money history is
        append-only, and `/v1/receipts/{id}` still answers for the response id."""
        async with translated("conversation"):
            deleted = await self.pool.fetchval(
                f"DELETE FROM stored_responses WHERE {_LIVE} RETURNING id", account_id, response_id)
        if deleted is None:
            raise _not_found(response_id)

    async def items(self, response_id: str, account_id: str, *, limit: int, order: Order = "desc",
                    after: str | None = None, before: str | None = None) -> ItemsPage:
        """One page of the input items of a viewable response (`limit` + 1 rows read, no more); 404 as
        `load`, 400 naming the cursor when `after` / `before` is not an item of this response."""
        async with translated("conversation"), self.pool.acquire() as conn:
            if await conn.fetchval(f"SELECT 1 FROM stored_responses WHERE {_LIVE} AND response IS NOT NULL",
                                   account_id, response_id) is None:
                raise _not_found(response_id)
            span = window(order, await _cursor(conn, response_id, after, "after"),
                          await _cursor(conn, response_id, before, "before"))
            rows = await conn.fetch(_PAGE.format(direction="ASC" if span.ascending else "DESC"),
                                    response_id, span.after_seq, span.before_seq, limit + 1)
        items = [(row["item_id"], row["item"]) for row in rows[:limit]]
        return ItemsPage(items[::-1] if span.reverse else items, has_more=len(rows) > limit)

    async def purge(self) -> int:
        async with translated("conversation"):
            status = await self.pool.execute("DELETE FROM stored_responses WHERE expires_at < now()")
        return int(status.split()[-1])


async def _cursor(conn: asyncpg.Connection, response_id: str, item_id: str | None, param: str) -> int | None:
    if item_id is None:
        return None
    seq = await conn.fetchval("SELECT seq FROM stored_response_items WHERE response_id = $1 AND item_id = $2",
                              response_id, item_id)
    if seq is None:
        raise InvalidRequest(f"'{param}' is not an input item of this response: {item_id!r}", param=param)
    return int(seq)


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id {response_id!r} not found.", param="response_id")
