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
        # a charge is posted by exactly one thing: the settlement of its request's reservation (outcome()
        # relies on it) or a settlement against a lease (its usage record names the lease)
        bad = await conn.fetch("""
            SELECT coalesce(r.request_id, l.request_id) AS request_id, count(r.id) AS settled
            FROM (SELECT id, request_id FROM reservations WHERE status = 'settled'
                  UNION ALL SELECT lease_id, request_id FROM usage_records WHERE lease_id IS NOT NULL) r
            FULL JOIN (SELECT id, request_id FROM ledger_entries WHERE kind = 'charge') l USING (request_id)
            GROUP BY 1 HAVING count(r.id) <> 1 OR count(l.id) <> 1""")
        assert not bad, f"settlements and charge entries disagree: {[dict(r) for r in bad]}"
        # leases: never 'settled' (they end voided or expired); what one charged is its usage records' charges
        bad = await conn.fetch("""
            SELECT r.id, r.status, r.charged_nanos, coalesce(u.total, 0) AS records_total FROM reservations r
            LEFT JOIN (SELECT lease_id, sum(charge_nanos) AS total FROM usage_records GROUP BY 1) u
              ON u.lease_id = r.id
            WHERE r.kind = 'lease' AND (r.status = 'settled' OR r.charged_nanos <> coalesce(u.total, 0))""")
        assert not bad, f"leases disagree with their usage records: {[dict(r) for r in bad]}"
        bad = await conn.fetch("""
            SELECT u.request_id FROM usage_records u LEFT JOIN reservations r ON r.id = u.lease_id
            WHERE u.lease_id IS NOT NULL AND (r.kind IS DISTINCT FROM 'lease' OR r.account_id <> u.account_id
                                              OR r.bucket <> u.bucket)""")
        assert not bad, f"usage records charged against another account's or bucket's lease: {bad}"
        # budgets: reserved = Σ open reservations in scope; spent = Σ settled charges in scope
        bad = await conn.fetch("""
            SELECT g.scope, g.period FROM budgets g
            LEFT JOIN LATERAL (
                SELECT coalesce(sum(r.amount_nanos) FILTER (WHERE r.status = 'open'), 0) AS open_total,
                       coalesce(sum(u.charge_nanos) FILTER (WHERE r.status = 'settled'), 0)
                       + coalesce(sum(r.charged_nanos) FILTER (WHERE r.kind = 'lease'), 0) AS spent
                FROM reservations r LEFT JOIN usage_records u ON u.request_id = r.request_id
                     AND r.status = 'settled'
                CROSS JOIN LATERAL unnest(r.budget_scopes, r.budget_periods) AS s(scope, period)
                WHERE s.scope = g.scope AND s.period = g.period) x ON true
            WHERE g.reserved_nanos <> x.open_total OR g.spent_nanos <> x.spent""")
        assert not bad, f"budget rows disagree with reservations: {[dict(r) for r in bad]}"
        await _assert_pool_invariants(conn)
    finally:
        if isinstance(dsn_or_conn, str):
            await conn.close()


async def _assert_pool_invariants(conn: asyncpg.Connection) -> None:
    """8. A pool's balance = grants − expiries − charges; a pool never pays for another bucket's routes;
    an expired allowance cannot be spent (each period's money is charged, held or lapsed, never carried)."""
    pools = "(SELECT DISTINCT account_id, bucket FROM subscriptions)"
    bad = await conn.fetch(f"""
        SELECT l.id, l.kind FROM ledger_entries l LEFT JOIN {pools} p USING (account_id, bucket)
        WHERE (p.bucket IS NOT NULL AND (l.kind NOT IN ('grant', 'expiry', 'charge') OR l.pool_period_end IS NULL))
           OR (p.bucket IS NULL AND l.kind IN ('grant', 'expiry'))""")
    assert not bad, f"invariant 8 broken (a pool moved by something else than grant/expiry/charge): {bad}"
    bad = await conn.fetch(f"""
        SELECT u.request_id, u.bucket, u.route_kind FROM usage_records u JOIN {pools} p USING (account_id, bucket)
        WHERE u.charge_nanos > 0 AND CASE WHEN u.bucket = 'research-free'
              THEN u.receipt ->> 'endpoint' <> 'research.section' ELSE u.route_kind <> 'subscription' END""")
    assert not bad, f"invariant 8 broken (a pool paid for another kind of route): {[dict(r) for r in bad]}"
    bad = await conn.fetch("""
        SELECT id FROM reservations WHERE pool_period_end IS NOT NULL AND pool_reserved_at >= pool_period_end""")
    assert not bad, f"invariant 8 broken (a reservation spent a period that had ended): {bad}"
    # per period: Σ entries = what its open holds still keep, plus (current period only) what is available
    bad = await conn.fetch("""
        WITH per AS (SELECT account_id, bucket, pool_period_end, sum(amount_nanos) AS total
                     FROM ledger_entries WHERE pool_period_end IS NOT NULL GROUP BY 1, 2, 3),
             held AS (SELECT account_id, bucket, pool_period_end, sum(amount_nanos) AS total
                      FROM reservations WHERE status = 'open' AND pool_period_end IS NOT NULL GROUP BY 1, 2, 3)
        SELECT p.account_id, p.bucket, p.pool_period_end, p.total, coalesce(h.total, 0) AS held,
               cur.id IS NOT NULL AS current
        FROM per p
        LEFT JOIN held h USING (account_id, bucket, pool_period_end)
        LEFT JOIN subscriptions cur ON cur.account_id = p.account_id AND cur.bucket = p.bucket
             AND cur.status <> 'ended' AND cur.period_end = p.pool_period_end
        JOIN buckets b ON b.account_id = p.account_id AND b.bucket = p.bucket
        WHERE p.total - coalesce(h.total, 0)
              <> CASE WHEN cur.id IS NULL THEN 0 ELSE b.balance_nanos - b.reserved_nanos END""")
    assert not bad, f"invariant 8 broken (a period's allowance outlived it or went missing): {[dict(r) for r in bad]}"
