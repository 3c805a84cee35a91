-- What a settlement costs PostgreSQL (issue #17): the same rows and the same answers, fewer
-- statements and function calls to write them. Measured statement by statement with
-- pg_stat_statements (track = all) by benchmarks/ledger_bench.py (`--settle-profile`), which the
-- benchmark report prints; the figures quoted here are from that table on a durable cluster.
--
-- 1. The charge guard (ledger_charge_requests, ledger_pool_grants: 0010) is written once per
--    statement from its transition table instead of by a plpgsql call per row. The constraint that
--    refuses a second charge keeps its name (ledger_one_charge_per_request); the error now comes at
--    the end of the inserting statement instead of at the row, and the transaction fails either way.
--    The webhook outbox trigger (0008/0010) already keeps that transition table, so it costs nothing.
-- 2. The spend rollup (usage_hourly, 0010) is one grouped upsert per statement instead of one per
--    usage record. The guard of usage records (usage_once) stays a row trigger: it skips a second
--    record of a request, which only a BEFORE row trigger can do.
-- 3. The item-by-item lease settlement (tf_lease_finish_each, the one every batch of ≤ 3 uses, hence
--    every settlement at low load) writes its usage record itself: through tf_record_in, a SQL
--    function PostgreSQL parses and plans again in every transaction, it cost 0.15 ms of 0.39 ms.
--    Both settlements ask the one-row guard table whether a request has its record already, not
--    every monthly partition of usage_records.
-- 4. The set-based settlement (batches of more than 3) writes its usage records' guard rows itself,
--    in one statement, and inserts only the records whose guard row it wrote; the row trigger
--    usage_once, which would do the same one plpgsql call per record, steps aside while it does
--    (its WHEN reads a transaction-local setting, tokensforge.usage_guarded, that only this
--    function turns on, around that one statement). Every other writer still goes through it.

-- 1. ------------------------------------------------------------------------------------------------

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
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION tf_ledger_guards();

-- 2. ------------------------------------------------------------------------------------------------

CREATE FUNCTION tf_usage_rollup_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_hourly AS h (account_id, hour, bucket, model, route_id, route_kind, charge_nanos, requests)
    SELECT n.account_id, date_trunc('hour', n.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           coalesce(n.bucket, ''), coalesce(n.model, ''), coalesce(n.route_id, ''), coalesce(n.route_kind, ''),
           sum(n.charge_nanos), count(*)
    FROM new_records n GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (account_id, hour, bucket, model, route_id, route_kind) DO UPDATE
    SET charge_nanos = h.charge_nanos + EXCLUDED.charge_nanos, requests = h.requests + EXCLUDED.requests;
    RETURN NULL;
END $$;

DROP TRIGGER usage_rollup ON usage_records;
CREATE TRIGGER usage_rollup AFTER INSERT ON usage_records
    REFERENCING NEW TABLE AS new_records FOR EACH STATEMENT EXECUTE FUNCTION tf_usage_rollup_rows();
-- tf_usage_rollup stays: the update trigger (tf_usage_rollup_update) adds the new row through it

-- 3. ------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION tf_lease_finish_each(p_leases text[], p_request_ids text[], p_charges bigint[],
                                                p_records jsonb[])
RETURNS TABLE (idx integer, outcome text, ledger_entry_id text, balance_after_nanos bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r reservations%ROWTYPE;
    v_balance bigint;
    v_entry text;
    v_rec jsonb;
BEGIN
    PERFORM tf_lock_for(ARRAY(SELECT DISTINCT unnest(p_leases)));
    FOR i IN 1 .. coalesce(array_length(p_leases, 1), 0) LOOP
        IF EXISTS (SELECT 1 FROM usage_request_ids u WHERE u.request_id = p_request_ids[i]) THEN
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
        END IF;
        IF p_records[i] IS NOT NULL THEN
            v_rec := p_records[i];
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
            ON CONFLICT DO NOTHING;
        END IF;
        RETURN QUERY SELECT i, 'ok'::text, v_entry, v_balance;
    END LOOP;
END $$;

-- 4. ------------------------------------------------------------------------------------------------

DROP TRIGGER usage_once ON usage_records;
CREATE TRIGGER usage_once BEFORE INSERT ON usage_records FOR EACH ROW
    WHEN (current_setting('tokensforge.usage_guarded', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION tf_usage_once();

-- The set-based settlement: as 0005 wrote it but for the guard probe and the guard rows (4).
CREATE OR REPLACE FUNCTION tf_lease_finish_many(p_leases text[], p_request_ids text[], p_charges bigint[], p_records jsonb[])
RETURNS TABLE (idx integer, outcome text, ledger_entry_id text, balance_after_nanos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tf_lock_for(ARRAY(SELECT DISTINCT unnest(p_leases)));  -- budget rows, then bucket rows, sorted
    PERFORM set_config('tokensforge.usage_guarded', 'on', true);
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
    guards AS (  -- what usage_once would write, one statement for the batch; a request that has its record is skipped
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
    )
    SELECT j.idx, j.outcome, e.id, r.balance_after
    FROM judged j LEFT JOIN running r ON r.idx = j.idx LEFT JOIN entries e ON e.request_id = j.request_id
         AND j.outcome = 'ok'
    ORDER BY j.idx;
    PERFORM set_config('tokensforge.usage_guarded', 'off', true);
END $$;
