-- What a settlement costs PostgreSQL (issue #17): the same rows and the same answers, written with
-- fewer statements and function calls. Measured statement by statement with pg_stat_statements
-- (track = all), EXPLAIN (ANALYZE, BUFFERS, WAL) and perf by benchmarks/ledger_bench.py
-- (`--settle-profile`, printed in the benchmark report) on a durable cluster.
--
-- A settlement carved from a lease wrote, besides its five rows (lease, bucket, budgets, charge
-- entry, usage record), three rows through triggers — the usage record's guard (usage_once), the
-- charge's guard (ledger_once) and the hourly rollup (usage_rollup) — each a plpgsql call per row,
-- and at one item per batch its usage record through tf_record_in, a SQL function PostgreSQL parses
-- and plans again in every transaction (0.15 ms of the 0.39 ms that record cost). perf on the
-- backends at one item per batch: trigger functions 17 % of their CPU, the after-trigger queue 14 %.
--
-- Now the two lease settlements write those three rows themselves, in the statements they already
-- run (set-based for a batch), and the triggers step aside while they do: each trigger's WHEN reads
-- a transaction-local setting, tokensforge.settling, that only these two functions turn on, around
-- their own writes, and off again. Every other writer (tf_record, tf_finish_item, top-ups, grants,
-- the sweeper's lost-stream records…) still goes through the triggers, unchanged:
--   * usage_request_ids: the guard row is inserted first (ON CONFLICT DO NOTHING) and the usage
--     record only if it was, so a second record of a request is still skipped;
--   * ledger_charge_requests: inserted with each charge entry, so a second charge of a request
--     still fails with ledger_one_charge_per_request;
--   * usage_hourly: the same upsert, once per (account, hour, bucket, model, route) of the batch.
-- The charge guard's trigger (for the other writers) runs once per statement from the transition
-- table the webhook outbox trigger (0008/0010) keeps anyway, instead of once per row. Both
-- settlements ask the one-table guard whether a request has its record, not every monthly
-- partition of usage_records.

-- 1. The triggers step aside for the settlements ------------------------------------------------

DROP TRIGGER usage_once ON usage_records;
CREATE TRIGGER usage_once BEFORE INSERT ON usage_records FOR EACH ROW
    WHEN (current_setting('tokensforge.settling', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION tf_usage_once();

DROP TRIGGER usage_rollup ON usage_records;
CREATE TRIGGER usage_rollup AFTER INSERT ON usage_records FOR EACH ROW
    WHEN (current_setting('tokensforge.settling', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION tf_usage_rollup();

CREATE FUNCTION tf_ledger_guards() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_charge_requests (request_id, created_at)
    SELECT n.request_id, n.created_at FROM new_entries n WHERE n.kind = 'charge' ORDER BY n.request_id;
    INSERT INTO ledger_pool_grants (account_id, bucket, pool_period_end, created_at)
    SELECT n.account_id, n.bucket, n.pool_period_end, n.created_at FROM new_entries n WHERE n.kind = 'grant'
    ORDER BY 1, 2, 3;
    RETURN NULL;
END $$;

DROP TRIGGER ledger_once ON ledger_entries;
DROP FUNCTION tf_ledger_once();
-- AFTER statement triggers fire in name order: the guards before the webhook outbox
CREATE TRIGGER ledger_guards AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT
    WHEN (current_setting('tokensforge.settling', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION tf_ledger_guards();

-- 2. Item by item (batches of up to 3: every settlement at low load) --------------------------------

CREATE OR REPLACE FUNCTION tf_lease_finish_each(p_leases text[], p_request_ids text[], p_charges bigint[],
                                                p_records jsonb[])
RETURNS TABLE (idx integer, outcome text, ledger_entry_id text, balance_after_nanos bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r reservations%ROWTYPE;
    v_balance bigint;
    v_entry text;
    v_rec jsonb;
    u usage_records%ROWTYPE;
BEGIN
    PERFORM tf_lock_for(ARRAY(SELECT DISTINCT unnest(p_leases)));
    PERFORM set_config('tokensforge.settling', 'on', true);
    FOR i IN 1 .. coalesce(array_length(p_leases, 1), 0) LOOP
        IF EXISTS (SELECT 1 FROM usage_request_ids g WHERE g.request_id = p_request_ids[i]) THEN
            RETURN QUERY SELECT i, 'resolved'::text, NULL::text, NULL::bigint;
            CONTINUE;
        END IF;
        v_entry := NULL;
        IF p_charges[i] = 0 THEN
            SELECT b.balance_nanos INTO v_balance FROM buckets b
            JOIN reservations l ON l.account_id = b.account_id AND l.bucket = b.bucket WHERE l.id = p_leases[i];
        ELSE
            UPDATE reservations SET amount_nanos = amount_nanos - p_charges[i], charged_nanos = charged_nanos + p_charges[i]
            WHERE id = p_leases[i] AND status = 'open' AND kind = 'lease' AND p_charges[i] BETWEEN 1 AND amount_nanos
            RETURNING * INTO r;
            IF NOT FOUND THEN
                IF EXISTS (SELECT 1 FROM reservations WHERE id = p_leases[i] AND status = 'open') THEN
                    RETURN QUERY SELECT i, 'charge_out_of_range'::text, NULL::text, NULL::bigint;
                ELSE
                    RETURN QUERY SELECT i, 'resolved'::text, NULL::text, NULL::bigint;
                END IF;
                CONTINUE;
            END IF;
            FOR j IN 1 .. coalesce(array_length(r.budget_scopes, 1), 0) LOOP
                UPDATE budgets SET reserved_nanos = reserved_nanos - p_charges[i], spent_nanos = spent_nanos + p_charges[i]
                WHERE scope = r.budget_scopes[j] AND period = r.budget_periods[j];
            END LOOP;
            UPDATE buckets SET balance_nanos = balance_nanos - p_charges[i], reserved_nanos = reserved_nanos - p_charges[i]
            WHERE account_id = r.account_id AND bucket = r.bucket
            RETURNING buckets.balance_nanos INTO v_balance;
            INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note)
            VALUES (r.account_id, r.bucket, 'charge', -p_charges[i], v_balance, p_request_ids[i],
                    p_records[i] ->> 'selected_model')
            RETURNING id INTO v_entry;
            INSERT INTO ledger_charge_requests (request_id, created_at) VALUES (p_request_ids[i], now());
        END IF;
        IF p_records[i] IS NOT NULL THEN
            v_rec := p_records[i];
            INSERT INTO usage_request_ids (request_id, created_at) VALUES (v_rec ->> 'request_id', now())
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                INSERT INTO usage_records (
                    request_id, account_id, project_id, key_id, status, model, route_id, route_kind, bucket,
                    reserved_nanos, charge_nanos, ledger_entry_id, latency_ms, receipt, lease_id)
                VALUES (
                    v_rec ->> 'request_id', v_rec ->> 'account_id', v_rec ->> 'project_id', v_rec ->> 'key_id',
                    v_rec ->> 'status', v_rec ->> 'selected_model', v_rec #>> '{route,id}', v_rec #>> '{route,kind}',
                    v_rec ->> 'bucket', coalesce((v_rec ->> 'reserved_nanos')::bigint, 0), p_charges[i], v_entry,
                    (v_rec ->> 'latency_ms')::integer,
                    v_rec || jsonb_build_object('ledger_entry_id', v_entry, 'balance_after_nanos', v_balance,
                                                'charge_nanos', p_charges[i]),
                    CASE WHEN p_charges[i] > 0 THEN p_leases[i] END)
                RETURNING * INTO u;
                INSERT INTO usage_hourly AS h (account_id, hour, bucket, model, route_id, route_kind, charge_nanos,
                                               requests)
                VALUES (u.account_id, date_trunc('hour', u.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                        coalesce(u.bucket, ''), coalesce(u.model, ''), coalesce(u.route_id, ''),
                        coalesce(u.route_kind, ''), u.charge_nanos, 1)
                ON CONFLICT (account_id, hour, bucket, model, route_id, route_kind) DO UPDATE
                SET charge_nanos = h.charge_nanos + EXCLUDED.charge_nanos, requests = h.requests + 1;
            END IF;
        END IF;
        RETURN QUERY SELECT i, 'ok'::text, v_entry, v_balance;
    END LOOP;
    PERFORM set_config('tokensforge.settling', 'off', true);
END $$;

-- 3. Set-based (larger batches): as 0005 wrote it, but for the guard probe and the three rows --------

CREATE OR REPLACE FUNCTION tf_lease_finish_many(p_leases text[], p_request_ids text[], p_charges bigint[], p_records jsonb[])
RETURNS TABLE (idx integer, outcome text, ledger_entry_id text, balance_after_nanos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tf_lock_for(ARRAY(SELECT DISTINCT unnest(p_leases)));  -- budget rows, then bucket rows, sorted
    PERFORM set_config('tokensforge.settling', 'on', true);
    RETURN QUERY
    WITH items AS (
        SELECT t.i::integer AS idx, t.lease_id, t.request_id, t.charge, t.rec,
               row_number() OVER (PARTITION BY t.request_id ORDER BY t.i) AS nth
        FROM unnest(p_leases, p_request_ids, p_charges, p_records) WITH ORDINALITY AS t(lease_id, request_id, charge, rec, i)
    ),
    leases AS (
        SELECT r.id, r.account_id, r.bucket, r.amount_nanos, r.budget_scopes, r.budget_periods,
               r.status = 'open' AND r.kind = 'lease' AS open
        FROM reservations r WHERE r.id = ANY (p_leases) ORDER BY r.id FOR UPDATE
    ),
    judged AS (
        SELECT i.*, l.account_id, l.bucket, l.budget_scopes, l.budget_periods,
               CASE WHEN l.id IS NULL OR i.nth > 1
                         OR EXISTS (SELECT 1 FROM usage_request_ids u WHERE u.request_id = i.request_id) THEN 'resolved'
                    WHEN i.charge = 0 THEN 'ok'
                    WHEN NOT l.open THEN 'resolved'
                    WHEN i.charge < 0 THEN 'charge_out_of_range'
                    WHEN sum(i.charge) FILTER (WHERE i.charge > 0) OVER (PARTITION BY i.lease_id ORDER BY i.idx)
                         > l.amount_nanos THEN 'charge_out_of_range'
                    ELSE 'ok' END AS outcome
        FROM items i LEFT JOIN leases l ON l.id = i.lease_id
    ),
    ok AS (SELECT * FROM judged j WHERE j.outcome = 'ok'),
    by_lease AS (SELECT ok.lease_id, sum(ok.charge) AS total FROM ok WHERE ok.charge > 0 GROUP BY 1),
    lease_update AS (
        UPDATE reservations r SET amount_nanos = r.amount_nanos - s.total, charged_nanos = r.charged_nanos + s.total
        FROM by_lease s WHERE r.id = s.lease_id
    ),
    budget_update AS (
        UPDATE budgets g SET reserved_nanos = g.reserved_nanos - s.total, spent_nanos = g.spent_nanos + s.total
        FROM (SELECT b.scope, b.period, sum(ok.charge) AS total
              FROM ok CROSS JOIN LATERAL unnest(ok.budget_scopes, ok.budget_periods) AS b(scope, period)
              WHERE ok.charge > 0 GROUP BY 1, 2) s
        WHERE g.scope = s.scope AND g.period = s.period
    ),
    running AS (
        SELECT ok.*, (k.balance_nanos - sum(ok.charge) OVER (PARTITION BY ok.account_id, ok.bucket ORDER BY ok.idx)
                   )::bigint AS balance_after
        FROM ok JOIN buckets k ON k.account_id = ok.account_id AND k.bucket = ok.bucket
    ),
    bucket_update AS (
        UPDATE buckets k SET balance_nanos = k.balance_nanos - s.total, reserved_nanos = k.reserved_nanos - s.total
        FROM (SELECT ok.account_id, ok.bucket, sum(ok.charge) AS total FROM ok WHERE ok.charge > 0 GROUP BY 1, 2) s
        WHERE k.account_id = s.account_id AND k.bucket = s.bucket
    ),
    entries AS (
        INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note)
        SELECT r.account_id, r.bucket, 'charge', -r.charge, r.balance_after, r.request_id, r.rec ->> 'selected_model'
        FROM running r WHERE r.charge > 0 ORDER BY r.idx
        RETURNING ledger_entries.id, ledger_entries.request_id
    ),
    charge_guards AS (  -- what ledger_guards would write: a second charge of a request fails here
        INSERT INTO ledger_charge_requests (request_id, created_at)
        SELECT e.request_id, now() FROM entries e ORDER BY 1
    ),
    guards AS (  -- what usage_once would write; a request that has its record already is skipped
        INSERT INTO usage_request_ids (request_id, created_at)
        SELECT x.rec ->> 'request_id', now() FROM running x WHERE x.rec IS NOT NULL ORDER BY 1
        ON CONFLICT DO NOTHING
        RETURNING usage_request_ids.request_id
    ),
    records AS (
        INSERT INTO usage_records (
            request_id, account_id, project_id, key_id, status, model, route_id, route_kind, bucket,
            reserved_nanos, charge_nanos, ledger_entry_id, latency_ms, receipt, lease_id)
        SELECT x.rec ->> 'request_id', x.rec ->> 'account_id', x.rec ->> 'project_id', x.rec ->> 'key_id',
               x.rec ->> 'status', x.rec ->> 'selected_model', x.rec #>> '{route,id}', x.rec #>> '{route,kind}',
               x.rec ->> 'bucket', coalesce((x.rec ->> 'reserved_nanos')::bigint, 0), x.charge, e.id,
               (x.rec ->> 'latency_ms')::integer,
               x.rec || jsonb_build_object('ledger_entry_id', e.id, 'balance_after_nanos', x.balance_after,
                                           'charge_nanos', x.charge),
               CASE WHEN x.charge > 0 THEN x.lease_id END
        FROM running x LEFT JOIN entries e ON e.request_id = x.request_id
        WHERE x.rec IS NOT NULL AND x.rec ->> 'request_id' IN (SELECT g.request_id FROM guards g)
        ON CONFLICT DO NOTHING
        RETURNING usage_records.account_id, usage_records.created_at, usage_records.bucket, usage_records.model,
                  usage_records.route_id, usage_records.route_kind, usage_records.charge_nanos
    ),
    rollup AS (  -- what usage_rollup would write, one upsert per key of the batch
        INSERT INTO usage_hourly AS h (account_id, hour, bucket, model, route_id, route_kind, charge_nanos, requests)
        SELECT n.account_id, date_trunc('hour', n.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
               coalesce(n.bucket, ''), coalesce(n.model, ''), coalesce(n.route_id, ''), coalesce(n.route_kind, ''),
               sum(n.charge_nanos), count(*)
        FROM records n GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
        ON CONFLICT (account_id, hour, bucket, model, route_id, route_kind) DO UPDATE
        SET charge_nanos = h.charge_nanos + EXCLUDED.charge_nanos, requests = h.requests + EXCLUDED.requests
    )
    SELECT j.idx, j.outcome, e.id, r.balance_after
    FROM judged j LEFT JOIN running r ON r.idx = j.idx LEFT JOIN entries e ON e.request_id = j.request_id
         AND j.outcome = 'ok'
    ORDER BY j.idx;
    PERFORM set_config('tokensforge.settling', 'off', true);
END $$;
