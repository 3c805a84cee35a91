"""SPEC §5 invariants, checked against the real database after tests that move money."""

from __future__ import annotations

import asyncpg


async def assert_ledger_invariants(dsn_or_conn: str | asyncpg.Connection) -> None:
    conn = await asyncpg.connect(dsn_or_conn) if isinstance(dsn_or_conn, str) else dsn_or_conn
    try:
        # 1. balance = Σ ledger entries; reserved = Σ open reservations; available ≥ 0
        bad = await conn.fetch("""
            SELECT b.account_id, b.bucket, b.balance_nanos, b.reserved_nanos,
                   coalesce(l.total, 0) AS ledger_total, coalesce(r.total, 0) AS open_total
            FROM buckets b
            LEFT JOIN (SELECT account_id, bucket, sum(amount_nanos) AS total FROM ledger_entries
                       GROUP BY 1, 2) l USING (account_id, bucket)
            LEFT JOIN (SELECT account_id, bucket, sum(amount_nanos) AS total FROM reservations
                       WHERE status = 'open' GROUP BY 1, 2) r USING (account_id, bucket)
            WHERE b.balance_nanos <> coalesce(l.total, 0) OR b.reserved_nanos <> coalesce(r.total, 0)
               OR b.balance_nanos - b.reserved_nanos < 0""")
        assert not bad, f"invariant 1 broken: {[dict(r) for r in bad]}"
        # balance_after of each entry is the running sum
        bad = await conn.fetch("""
            SELECT id FROM (SELECT id, balance_after_nanos, sum(amount_nanos) OVER
                (PARTITION BY account_id, bucket ORDER BY seq) AS running FROM ledger_entries) x
            WHERE balance_after_nanos <> running""")
        assert not bad, f"balance_after_nanos is not the running balance: {bad}"
        # 2. every charged usage record has exactly one charge entry of that amount, and vice versa
        bad = await conn.fetch("""
            SELECT u.request_id, u.charge_nanos, count(l.seq) AS entries, min(-l.amount_nanos) AS amount
            FROM usage_records u LEFT JOIN ledger_entries l ON l.request_id = u.request_id AND l.kind = 'charge'
            WHERE u.charge_nanos > 0 GROUP BY 1, 2
            HAVING count(l.seq) <> 1 OR min(-l.amount_nanos) <> u.charge_nanos""")
        assert not bad, f"invariant 2 broken (usage without its charge): {[dict(r) for r in bad]}"
        bad = await conn.fetch("""
            SELECT l.id FROM ledger_entries l LEFT JOIN usage_records u ON u.request_id = l.request_id
            WHERE l.kind = 'charge' AND (u.request_id IS NULL OR u.ledger_entry_id <> l.id)""")
        assert not bad, f"invariant 2 broken (charge without usage record): {bad}"
        # a reservation is settled exactly when its request has the charge entry (outcome() relies on it)
        bad = await conn.fetch("""
            SELECT coalesce(r.request_id, l.request_id) AS request_id, count(r.id) AS settled
            FROM (SELECT id, request_id FROM reservations WHERE status = 'settled') r
            FULL JOIN (SELECT id, request_id FROM ledger_entries WHERE kind = 'charge') l USING (request_id)
            GROUP BY 1 HAVING count(r.id) <> 1 OR count(l.id) <> 1""")
        assert not bad, f"settled reservations and charge entries disagree: {[dict(r) for r in bad]}"
        # budgets: reserved = Σ open reservations in scope; spent = Σ settled charges in scope
        bad = await conn.fetch("""
            SELECT g.scope, g.period FROM budgets g
            LEFT JOIN LATERAL (
                SELECT coalesce(sum(r.amount_nanos) FILTER (WHERE r.status = 'open'), 0) AS open_total,
                       coalesce(sum(u.charge_nanos) FILTER (WHERE r.status = 'settled'), 0) AS spent
                FROM reservations r LEFT JOIN usage_records u ON u.request_id = r.request_id
                     AND r.status = 'settled'
                CROSS JOIN LATERAL unnest(r.budget_scopes, r.budget_periods) AS s(scope, period)
                WHERE s.scope = g.scope AND s.period = g.period) x ON true
            WHERE g.reserved_nanos <> x.open_total OR g.spent_nanos <> x.spent""")
        assert not bad, f"budget rows disagree with reservations: {[dict(r) for r in bad]}"
    finally:
        if isinstance(dsn_or_conn, str):
            await conn.close()
