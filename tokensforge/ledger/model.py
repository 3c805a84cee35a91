"""Pure ledger types and views: no database, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..money import usd

BUDGET_PERIODS = ("day", "month", "total")


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """A budget the reservation must fit: scope is "key:<id>" or "project:<id>"."""

    scope: str
    period: str
    limit_nanos: int


def entry_view(row: Any) -> dict[str, Any]:
    """A ledger entry as the API shows it (SPEC §2)."""
    return {
        "id": row["id"],
        "account_id": row["account_id"],
        "bucket": row["bucket"],
        "kind": row["kind"],
        "amount_nanos": row["amount_nanos"],
        "amount_usd": usd(row["amount_nanos"]),
        "balance_after_nanos": row["balance_after_nanos"],
        "balance_after_usd": usd(row["balance_after_nanos"]),
        "request_id": row["request_id"],
        "idempotency_key": row["idempotency_key"],
        "note": row["note"],
        "created_at": row["created_at"].isoformat(),
    }


def bucket_view(bucket: str, name: str, balance_nanos: int, reserved_nanos: int) -> dict[str, Any]:
    available = balance_nanos - reserved_nanos
    return {
        "bucket": bucket,
        "name": name,
        "balance_nanos": balance_nanos,
        "reserved_nanos": reserved_nanos,
        "available_nanos": available,
        "balance_usd": usd(balance_nanos),
        "reserved_usd": usd(reserved_nanos),
        "available_usd": usd(available),
    }


#: cursors are `seq` values of bigint columns
MAX_CURSOR = 2**63 - 1


def parse_cursor(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_CURSOR:
        raise ValueError("cursor must be a value of next_cursor from a previous page")
    return int(text)
