"""Research reports in PostgreSQL (migration 0004): written as a run goes, read back by the API.

A report row is created when a run starts (status "running"); each finished section is
added with its receipt in one statement that also moves the report's running total; the
run's end (also a client that left: the handler calls `finish` shielded) sets the final
status, recomputes the total from the section rows and adds any section that was charged
but never recorded (a cancellation that landed between the section's settlement and its
row), so a stored report's total always equals what the ledger charged for it.
No money moves here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from .db import reads, view_connection
from .errors import LedgerUnavailable
from .ledger.model import clean_record
from .ledger.store import translated

log = logging.getLogger("tokensforge.research")

#: the error a section gets when it was charged but its answer was lost with the client
LOST_SECTION_ERROR = {"code": "client_cancelled",
                      "message": "the client disconnected before this section's text was recorded"}


@dataclass(frozen=True, slots=True)
class NewReport:
    id: str
    account_id: str
    project_id: str | None
    key_id: str | None
    request_id: str
    topic: str
    model: str
    route_id: str
    route_kind: str
    bucket: str
    context: str | None
    outline: tuple[str, ...]
    max_charge_nanos: int
    balance_before_nanos: int


def storable_text(text: str) -> str:
    """Model text as PostgreSQL keeps it: no NUL, no lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def section_request_id(request_id: str, position: int) -> str:
    """The request id of a report's section (position from 0): each section is its own request."""
    return f"{request_id}_s{position + 1}"


_LIST_SQL = """
SELECT r.seq, r.id, r.topic, r.model, r.status, r.created_at, r.total_charge_nanos,
       (SELECT count(*) FROM research_sections s WHERE s.report_id = r.id)::integer AS sections
FROM research_reports r
WHERE r.account_id = $1 AND ($2::bigint IS NULL OR r.seq < $2) AND ($4::text IS NULL OR r.project_id = $4)
ORDER BY r.seq DESC LIMIT $3"""

_ADD_SECTION_SQL = """
WITH s AS (
    INSERT INTO research_sections (report_id, position, title, request_id, content, charge_nanos, receipt, error)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING charge_nanos)
UPDATE research_reports SET total_charge_nanos = total_charge_nanos + (SELECT charge_nanos FROM s),
                            updated_at = now()
WHERE id = $1"""

# sections that were charged (their usage record says so) but have no row yet
_ADD_LOST_SECTIONS_SQL = """
INSERT INTO research_sections (report_id, position, title, request_id, content, charge_nanos, receipt, error)
SELECT $1, p.position, p.title, u.request_id, NULL, u.charge_nanos, u.receipt, $5::jsonb
FROM unnest($2::integer[], $3::text[], $4::text[]) AS p(position, title, request_id)
JOIN research_reports r ON r.id = $1
JOIN usage_records u ON u.request_id = p.request_id AND u.account_id = r.account_id AND u.charge_nanos > 0
ON CONFLICT DO NOTHING"""

_FINISH_SQL = """
UPDATE research_reports r SET
    status = $2,
    total_charge_nanos = (SELECT coalesce(sum(s.charge_nanos), 0) FROM research_sections s WHERE s.report_id = r.id),
    balance_after_nanos = (SELECT b.balance_nanos FROM buckets b
                           WHERE b.account_id = r.account_id AND b.bucket = r.bucket),
    updated_at = now()
WHERE r.id = $1
RETURNING r.*"""

_SECTIONS_SQL = "SELECT * FROM research_sections WHERE report_id = $1 ORDER BY position"

# runs whose gateway died: still "running", untouched for longer than a reservation lives, and no section
# holding money any more (a live run's section always has an open, renewed reservation)
_STALE_SQL = """
SELECT r.id, r.request_id, r.outline FROM research_reports r
WHERE r.status = 'running' AND r.updated_at < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM reservations v WHERE v.status = 'open'
                  AND v.request_id LIKE replace(replace(r.request_id, '\\', '\\\\'), '_', '\\_') || '\\_s%')
ORDER BY r.updated_at LIMIT $2"""


class ReportStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, report: NewReport) -> asyncpg.Record:
        """The report row of a run that starts now (status "running")."""
        async with translated("research"):
            row: asyncpg.Record = await self.pool.fetchrow(
                "INSERT INTO research_reports (id, account_id, project_id, key_id, request_id, topic, model,"
                " route_id, route_kind, bucket, context, outline, max_charge_nanos, balance_before_nanos)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING *",
                report.id, report.account_id, report.project_id, report.key_id, report.request_id, report.topic,
                report.model, report.route_id, report.route_kind, report.bucket, report.context,
                list(report.outline), report.max_charge_nanos, report.balance_before_nanos)
            return row

    async def add_section(self, report_id: str, position: int, title: str, request_id: str,
                          content: str | None, receipt: dict[str, Any] | None,
                          error: dict[str, Any] | None) -> None:
        """Record a finished (or failed) section and add its charge to the report's total."""
        charge = receipt["charge_nanos"] if receipt is not None else 0
        async with translated("research"):
            await self.pool.execute(
                _ADD_SECTION_SQL, report_id, position, title, request_id,
                storable_text(content) if content is not None else None, charge,
                clean_record(receipt) if receipt is not None else None,
                clean_record(error) if error is not None else None)

    async def finish(self, report_id: str, status: str, started: list[tuple[int, str, str]]
                     ) -> tuple[asyncpg.Record, list[asyncpg.Record]]:
        """End a run: its final status and totals, given the (position, title, request id) of every
        section it started; returns the stored report and its sections."""
        async with translated("research"), self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_ADD_LOST_SECTIONS_SQL, report_id, [p for p, _, _ in started],
                               [t for _, t, _ in started], [r for _, _, r in started], LOST_SECTION_ERROR)
            row: asyncpg.Record = await conn.fetchrow(_FINISH_SQL, report_id, status)
            sections: list[asyncpg.Record] = await conn.fetch(_SECTIONS_SQL, report_id)
            return row, sections

    async def interrupt_stale(self, idle_s: float, limit: int = 100) -> int:
        """Close the runs of gateways that died mid-report: status "interrupted", with every section that
        was charged (recovered from its usage record) and the totals the ledger agrees with."""
        async with translated("research"):
            stale = await self.pool.fetch(_STALE_SQL, idle_s, limit)
        for row in stale:
            started = [(i, title, section_request_id(row["request_id"], i)) for i, title in enumerate(row["outline"])]
            await self.finish(row["id"], "interrupted", started)
        return len(stale)

    async def page(self, account_id: str, *, limit: int, after: int | None,
                   project_id: str | None = None) -> list[asyncpg.Record]:
        """The account's reports (one project's, given `project_id`), newest first (cursor: `seq`)."""
        async with translated("research"), view_connection(self.pool) as conn:  # a read replica if there is one
            rows: list[asyncpg.Record] = await conn.fetch(_LIST_SQL, account_id, after, limit, project_id)
            return rows

    async def get(self, account_id: str, report_id: str, project_id: str | None = None
                  ) -> tuple[asyncpg.Record, list[asyncpg.Record]] | None:
        """One report of this account (of this project, given `project_id`) with its sections, or None
        (also for another account's or a sibling project's id)."""
        async with translated("research"), view_connection(self.pool) as conn:  # a read replica if there is one
            found = await _report(conn, account_id, report_id, project_id)
        if found is None and reads(self.pool) is not self.pool:  # not replicated yet: the primary has it
            async with translated("research"), self.pool.acquire() as conn:
                found = await _report(conn, account_id, report_id, project_id)
        return found


async def _report(conn: asyncpg.Connection, account_id: str, report_id: str, project_id: str | None
                  ) -> tuple[asyncpg.Record, list[asyncpg.Record]] | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM research_reports WHERE account_id = $1 AND id = $2 AND ($3::text IS NULL OR project_id = $3)",
        account_id, report_id, project_id)
    if row is None:
        return None
    sections: list[asyncpg.Record] = await conn.fetch(_SECTIONS_SQL, report_id)
    return row, sections


async def interrupt_stale_forever(store: ReportStore, *, idle_s: float, interval_s: float) -> None:
    """In every process, like the reservation sweeper: runs left "running" by a dead gateway are closed."""
    while True:
        try:
            if (count := await store.interrupt_stale(idle_s)) > 0:
                log.warning("closed %d research report(s) whose gateway stopped mid-run", count)
        except LedgerUnavailable:
            log.debug("report sweeper: database unavailable, will retry")
        except Exception:  # keep sweeping whatever one pass hit
            log.exception("report sweep failed")
        await asyncio.sleep(interval_s)
