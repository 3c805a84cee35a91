"""Pure ledger types and views: no database, no HTTP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ..money import usd

BUDGET_PERIODS = ("day", "month", "total")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: a receipt holds ids, names and short messages; anything longer is an upstream's junk
MAX_TEXT_CHARS = 8192
#: containers nested below this depth are cut: orjson (the jsonb codec) serialises 254 levels
MAX_DEPTH = 253
#: top-level receipt fields the SQL casts (tf_record): (smallest, largest) value the column takes
_CAST_FIELDS = {"reserved_nanos": (INT64_MIN, INT64_MAX), "charge_nanos": (INT64_MIN, INT64_MAX),
                "latency_ms": (INT32_MIN, INT32_MAX)}


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """A budget the reservation must fit: scope is "key:<id>" or "project:<id>"."""

    scope: str
    period: str
    limit_nanos: int


class Held(int):
    """What `LedgerStore.reserve` returns: the bucket's available amount left (an int, as it always
    was), and for a pool the end of the period that holds the money (it settles against that period)."""

    pool_period_end: datetime | None

    def __new__(cls, available_nanos: int, pool_period_end: datetime | None = None) -> Held:
        held = super().__new__(cls, available_nanos)
        held.pool_period_end = pool_period_end
        return held

    @property
    def available_nanos(self) -> int:
        return int(self)


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


def bucket_view(bucket: str, name: str, balance_nanos: int, reserved_nanos: int,
                leased_nanos: int = 0) -> dict[str, Any]:
    """`reserved` is what requests hold; `leased` what gateway processes hold for this account in leases
    (in-flight requests' money included): it is given back before any refusal, so it counts as available."""
    available = balance_nanos - reserved_nanos
    return {
        "bucket": bucket,
        "name": name,
        "balance_nanos": balance_nanos,
        "reserved_nanos": reserved_nanos,
        "available_nanos": available,
        "balance_usd": usd(balance_nanos),
        "reserved_usd": usd(reserved_nanos),
        "leased_nanos": leased_nanos,
        "available_usd": usd(available),
    }


def pool_view(row: Any, available_nanos: int) -> dict[str, Any]:
    """A pool's current period as /v1/balance and /v1/quote show it: what was granted, what was
    used, and what is still available and lapses at period end if unused."""
    lapses = max(available_nanos, 0)
    return {
        "plan": row["plan"],
        "period": row["period"],
        "period_start": row["period_start"].isoformat(),
        "period_end": row["period_end"].isoformat(),
        "allowance_nanos": row["period_allowance_nanos"],
        "used_nanos": row["used_nanos"],
        "lapses_nanos": lapses,
        "lapses_usd": usd(lapses),
        "lapses_at": row["period_end"].isoformat(),
    }


def subscription_view(row: Any) -> dict[str, Any]:
    """A subscription as the admin API shows it."""
    def iso(name: str) -> str | None:
        value = row[name]
        return None if value is None else str(value.isoformat())
    return {
        "id": row["id"],
        "object": "subscription",
        "account_id": row["account_id"],
        "plan": row["plan"],
        "bucket": row["bucket"],
        "allowance_nanos": row["allowance_nanos"],
        "allowance_usd": None if row["allowance_nanos"] is None else usd(row["allowance_nanos"]),
        "period": row["period"],
        "status": row["status"],
        "starts_at": iso("starts_at"),
        "current_period_start": iso("period_start"),
        "current_period_end": iso("period_end"),
        "periods_granted": row["periods"],
        "ends_at": iso("ends_at"),
        "cancelled_at": iso("cancelled_at"),
        "created_at": iso("created_at"),
    }


#: cursors are `seq` values of bigint columns
MAX_CURSOR = 2**63 - 1


def parse_cursor(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_CURSOR:
        raise ValueError("cursor must be a value of next_cursor from a previous page")
    return int(text)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a reservation, read back by id (e.g. after a connection dropped mid-settle).

    `charge_nanos` and `ledger_entry_id` are those of the charge entry (0 and None unless settled);
    `balance_after_nanos` is the bucket balance that settlement left (for a void: the balance its
    usage record saw, else the bucket's current balance); `receipt` is the stored usage record."""

    reservation_id: str
    request_id: str
    status: str  # open | settled | voided | expired
    ledger_entry_id: str | None
    charge_nanos: int
    balance_after_nanos: int | None
    receipt: dict[str, Any] | None


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """A receipt PostgreSQL will store: jsonb refuses NUL and invalid Unicode, and the usage
    record casts some fields to bigint/integer. So one upstream's odd error message or usage
    count cannot fail the group commit it shares with other requests' settlements.

    NUL is stripped, lone surrogates become U+FFFD (split pairs are joined), integers outside
    bigint and non-finite floats become null, strings longer than MAX_TEXT_CHARS are cut, keys
    become text, other values their text, containers nested deeper than orjson serialises are
    null. A record that needs none of it (nearly all) is returned as it is: checking costs one
    orjson pass, a fraction of walking it in Python."""
    if _storable(record):
        return record
    out: dict[str, Any] = _clean(record, 0)
    for name, (low, high) in _CAST_FIELDS.items():
        if name in out:
            out[name] = _cast_int(out[name], low, high)
    return out


def _storable(record: dict[str, Any]) -> bool:
    try:
        # refuses surrogates, non-text keys, deep nesting and (strict) integers beyond 53 bits:
        # those beyond bigint are among them, the rest come out of the slow path unchanged
        raw = orjson.dumps(record, option=orjson.OPT_STRICT_INTEGER)
    except orjson.JSONEncodeError:
        return False
    return (len(raw) <= MAX_TEXT_CHARS and b"\\u0000" not in raw
            and all(_cast_ok(record.get(name), low, high) for name, (low, high) in _CAST_FIELDS.items()))


def _cast_ok(value: Any, low: int, high: int) -> bool:
    return value is None or (type(value) is int and low <= value <= high)


def _clean(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return None if depth > MAX_DEPTH else {_clean_text(str(k)): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return None if depth > MAX_DEPTH else [_clean(v, depth + 1) for v in value]
    return _clean_text(str(value))


def _clean_text(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # surrogates: UTF-16 round trip joins pairs, replaces the lone ones
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS - 1] + "…"
    return text


def _cast_int(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, float) and math.isfinite(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None
