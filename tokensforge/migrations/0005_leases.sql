-- Leases: money a gateway process holds in escrow for many requests (issue #10).
--
-- A lease is a reservation row of kind 'lease', held by one process (`holder`), so every
-- invariant that speaks of open reservations covers it unchanged: the bucket's (and the
-- budgets') reserved amount counts it, and the sweeper voids it when its holder stops
-- renewing it (a crashed process), like any reservation. The process carves per-request
-- holds out of its lease in memory; each settlement posts its charge against the lease in
-- the same transaction as the charge entry and the usage record:
--
--     lease.amount − charge,  bucket.balance − charge,  bucket.reserved − charge,
--     budget.reserved − charge,  budget.spent + charge,  usage_records.lease_id = lease.
--
-- So for every lease: amount taken = amount + charged_nanos + returned, and its charged_nanos
-- is the sum of its usage records' charges (tests/invariants.py). A request carved from a
-- lease leaves no row until it settles: its receipt is stored once, with its usage record.
--
-- Lock order is unchanged: budget rows, then bucket rows, then reservation rows.

ALTER TABLE reservations ADD COLUMN kind text NOT NULL DEFAULT 'request' CHECK (kind IN ('request', 'lease'));
ALTER TABLE reservations ADD COLUMN holder text;                       -- the process holding a lease
ALTER TABLE reservations ADD COLUMN charged_nanos bigint NOT NULL DEFAULT 0 CHECK (charged_nanos >= 0);
ALTER TABLE reservations ADD CONSTRAINT lease_has_holder CHECK (kind <> 'lease' OR holder IS NOT NULL);
CREATE INDEX reservations_open_leases ON reservations (account_id, bucket) WHERE status = 'open' AND kind = 'lease';

ALTER TABLE usage_records ADD COLUMN lease_id text;                    -- the lease its charge was posted against

-- The usage record insert, shared by request settlements (lease NULL) and lease settlements.
CREATE FUNCTION tf_record_in(p_receipt jsonb, p_lease text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO usage_records (
        request_id, account_id, project_id, key_id, status, model, route_id, route_kind, bucket,
        reserved_nanos, charge_nanos, ledger_entry_id, latency_ms, receipt, lease_id)
    VALUES (
        p_receipt ->> 'request_id', p_receipt ->> 'account_id', p_receipt ->> 'project_id',
        p_receipt ->> 'key_id', p_receipt ->> 'status', p_receipt ->> 'selected_model',
        p_receipt #>> '{route,id}', p_receipt #>> '{route,kind}', p_receipt ->> 'bucket',
        coalesce((p_receipt ->> 'reserved_nanos')::bigint, 0),
        coalesce((p_receipt ->> 'charge_nanos')::bigint, 0),
        p_receipt ->> 'ledger_entry_id', (p_receipt ->> 'latency_ms')::integer, p_receipt, p_lease)
    ON CONFLICT (request_id) DO NOTHING
$$;

CREATE OR REPLACE FUNCTION tf_record(p_receipt jsonb) RETURNS void LANGUAGE sql AS $$
    SELECT tf_record_in(p_receipt, NULL)
$$;

-- Take or grow a lease in one round trip. The grant is the largest amount up to p_want that
-- fits the bucket's available balance times p_fraction_ppm / 10^6 and every budget's remaining
-- amount; below p_min nothing moves and the outcome says why ('insufficient_balance' when the
-- bucket cannot cover p_min at all, 'budget_exceeded', 'small' when only the fraction is short,
-- 'pool' for a pool bucket, which is never leased, 'stale' when the lease is gone or its budget
-- periods have turned: the process then retires it and opens a new one).
CREATE FUNCTION tf_lease_grow(
    p_id text, p_holder text, p_account text, p_bucket text, p_want bigint, p_min bigint,
    p_fraction_ppm bigint, p_ttl_s double precision, p_scopes text[], p_period_kinds text[], p_limits bigint[]
) RETURNS TABLE (outcome text, granted bigint, available_nanos bigint, lease_nanos bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_periods text[] := '{}';
    v_room bigint;
    v_budget_room bigint := 9223372036854775807;
    v_available bigint;
    v_grant bigint;
    v_lease reservations%ROWTYPE;
    v_amount bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        v_periods := v_periods || tf_period(p_period_kinds[i]);
    END LOOP;
    INSERT INTO budgets (scope, period)
    SELECT s, p FROM unnest(p_scopes, v_periods) AS t(s, p) ORDER BY 1, 2 ON CONFLICT DO NOTHING;
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        SELECT p_limits[i] - spent_nanos - reserved_nanos INTO v_room FROM budgets
        WHERE scope = p_scopes[i] AND period = v_periods[i] FOR UPDATE;
        v_budget_room := least(v_budget_room, v_room);
    END LOOP;
    SELECT balance_nanos - reserved_nanos INTO v_available FROM buckets
    WHERE account_id = p_account AND bucket = p_bucket FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'insufficient_balance'::text, 0::bigint, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM subscriptions WHERE account_id = p_account AND bucket = p_bucket) THEN
        RETURN QUERY SELECT 'pool'::text, 0::bigint, v_available, 0::bigint;
        RETURN;
    END IF;
    SELECT * INTO v_lease FROM reservations WHERE id = p_id FOR UPDATE;
    IF FOUND AND (v_lease.status <> 'open' OR v_lease.kind <> 'lease' OR v_lease.budget_periods <> v_periods) THEN
        RETURN QUERY SELECT 'stale'::text, 0::bigint, v_available, v_lease.amount_nanos;
        RETURN;
    END IF;
    IF v_available < p_min THEN
        RETURN QUERY SELECT 'insufficient_balance'::text, 0::bigint, v_available, coalesce(v_lease.amount_nanos, 0);
        RETURN;
    END IF;
    IF v_budget_room < p_min THEN
        RETURN QUERY SELECT 'budget_exceeded'::text, 0::bigint, v_available, coalesce(v_lease.amount_nanos, 0);
        RETURN;
    END IF;
    v_grant := least(p_want, floor(v_available::numeric * p_fraction_ppm / 1000000)::bigint, v_budget_room);
    IF v_grant < p_min THEN
        RETURN QUERY SELECT 'small'::text, 0::bigint, v_available, coalesce(v_lease.amount_nanos, 0);
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        UPDATE budgets SET reserved_nanos = reserved_nanos + v_grant WHERE scope = p_scopes[i] AND period = v_periods[i];
    END LOOP;
    UPDATE buckets SET reserved_nanos = reserved_nanos + v_grant WHERE account_id = p_account AND bucket = p_bucket;
    IF v_lease.id IS NULL THEN
        INSERT INTO reservations (id, request_id, account_id, bucket, amount_nanos, budget_scopes, budget_periods,
                                  expires_at, kind, holder)
        VALUES (p_id, p_id, p_account, p_bucket, v_grant, coalesce(p_scopes, '{}'), v_periods,
                now() + make_interval(secs => p_ttl_s), 'lease', p_holder);
        v_amount := v_grant;
    ELSE
        UPDATE reservations SET amount_nanos = amount_nanos + v_grant, expires_at = now() + make_interval(secs => p_ttl_s)
        WHERE id = p_id RETURNING amount_nanos INTO v_amount;
    END IF;
    RETURN QUERY SELECT 'ok'::text, v_grant, v_available - v_grant, v_amount;
END $$;

-- Settle requests carved from leases, many per transaction (group commit), set-based: one
-- statement updates each lease, budget and bucket row once with the batch's sum, writes every
-- charge entry (in item order, so each balance_after is the bucket's running balance) and every
-- usage record. A charge is posted against its lease; a zero charge only writes the usage record
-- (nothing was taken from the lease in the database). A request that already has a usage record
-- answers 'resolved' and nothing moves (a replay after a lost reply); a lease no longer open
-- answers 'resolved' for a charge; a charge beyond what the lease holds, 'charge_out_of_range'.
CREATE FUNCTION tf_lease_finish_many(p_leases text[], p_request_ids text[], p_charges bigint[], p_records jsonb[])
RETURNS TABLE (idx integer, outcome text, ledger_entry_id text, balance_after_nanos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tf_lock_for(ARRAY(SELECT DISTINCT unnest(p_leases)));  -- budget rows, then bucket rows, sorted
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
                         OR EXISTS (SELECT 1 FROM usage_records u WHERE u.request_id = i.request_id) THEN 'resolved'
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
        WHERE x.rec IS NOT NULL
        ON CONFLICT (request_id) DO NOTHING
    )
    SELECT j.idx, j.outcome, e.id, r.balance_after
    FROM judged j LEFT JOIN running r ON r.idx = j.idx LEFT JOIN entries e ON e.request_id = j.request_id
         AND j.outcome = 'ok'
    ORDER BY j.idx;
END $$;

-- The same settlement item by item, for small batches: its fixed cost per call is a third of the
-- set-based statement's (PostgreSQL CPU per settlement, ledger bench: 0.78 ms at one item per batch
-- against 1.7 ms; at ~16 items the set-based one costs 0.3 ms against 0.6 ms), so the store sends
-- batches of up to 3 items here and larger ones to tf_lease_finish_many. Same answers, same effects
-- (tests/test_leases.py runs one batch through both).
CREATE FUNCTION tf_lease_finish_each(p_leases text[], p_request_ids text[], p_charges bigint[], p_records jsonb[])
RETURNS TABLE (idx integer, outcome text, ledger_entry_id text, balance_after_nanos bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r reservations%ROWTYPE;
    v_balance bigint;
    v_entry text;
BEGIN
    PERFORM tf_lock_for(ARRAY(SELECT DISTINCT unnest(p_leases)));
    FOR i IN 1 .. coalesce(array_length(p_leases, 1), 0) LOOP
        IF EXISTS (SELECT 1 FROM usage_records u WHERE u.request_id = p_request_ids[i]) THEN
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
            PERFORM tf_record_in(p_records[i] || jsonb_build_object(
                'ledger_entry_id', v_entry, 'balance_after_nanos', v_balance, 'charge_nanos', p_charges[i]),
                CASE WHEN p_charges[i] > 0 THEN p_leases[i] END);
        END IF;
        RETURN QUERY SELECT i, 'ok'::text, v_entry, v_balance;
    END LOOP;
END $$;


-- Give unused lease money back: each lease shrinks by its amount (never below zero); with
-- p_close a lease that reaches zero is closed ('voided'). Answers each lease's amount left
-- (NULL for a lease no longer open: the sweeper took it).
CREATE FUNCTION tf_lease_return(p_ids text[], p_amounts bigint[], p_close boolean)
RETURNS TABLE (id text, lease_nanos bigint) LANGUAGE plpgsql AS $$
DECLARE
    r reservations%ROWTYPE;
    v_give bigint;
BEGIN
    PERFORM tf_lock_for(p_ids);
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        SELECT * INTO r FROM reservations x WHERE x.id = p_ids[i] AND x.status = 'open' AND x.kind = 'lease' FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT p_ids[i], NULL::bigint;
            CONTINUE;
        END IF;
        v_give := least(greatest(p_amounts[i], 0), r.amount_nanos);
        FOR j IN 1 .. coalesce(array_length(r.budget_scopes, 1), 0) LOOP
            UPDATE budgets SET reserved_nanos = reserved_nanos - v_give
            WHERE scope = r.budget_scopes[j] AND period = r.budget_periods[j];
        END LOOP;
        UPDATE buckets SET reserved_nanos = reserved_nanos - v_give WHERE account_id = r.account_id AND bucket = r.bucket;
        UPDATE reservations x SET amount_nanos = x.amount_nanos - v_give,
               status = CASE WHEN p_close AND x.amount_nanos = v_give THEN 'voided' ELSE 'open' END,
               resolved_at = CASE WHEN p_close AND x.amount_nanos = v_give THEN now() END
        WHERE x.id = p_ids[i];
        RETURN QUERY SELECT p_ids[i], r.amount_nanos - v_give;
    END LOOP;
END $$;

-- A charge whose lease is no longer open (its process was cut off from the database for longer than
-- the lease TTL, and a sweeper voided it): the money went back to the bucket, so post the charge
-- from the bucket's available balance if it is still there (and every budget has room), counted
-- against the lapsed lease (charged_nanos) so its books still add up. Otherwise the usage record is
-- written with no charge ('unbilled'): the request goes unbilled, and says so. 'resolved' if the
-- request already has a usage record.
CREATE FUNCTION tf_lease_charge_late(p_lease text, p_request_id text, p_charge bigint, p_record jsonb,
                                     p_limits bigint[])
RETURNS TABLE (outcome text, ledger_entry_id text, balance_after_nanos bigint) LANGUAGE plpgsql AS $$
DECLARE
    r reservations%ROWTYPE;
    v_room bigint := 9223372036854775807;
    v_balance bigint;
    v_available bigint;
    v_entry text;
BEGIN
    PERFORM 1 FROM budgets g
    JOIN (SELECT l.budget_scopes, l.budget_periods FROM reservations l WHERE l.id = p_lease) x
      ON (g.scope, g.period) IN (SELECT * FROM unnest(x.budget_scopes, x.budget_periods))
    ORDER BY g.scope, g.period FOR UPDATE OF g;
    SELECT * INTO r FROM reservations WHERE id = p_lease AND kind = 'lease';
    IF NOT FOUND OR EXISTS (SELECT 1 FROM usage_records u WHERE u.request_id = p_request_id) THEN
        RETURN QUERY SELECT 'resolved'::text, NULL::text, NULL::bigint;
        RETURN;
    END IF;
    SELECT balance_nanos, balance_nanos - reserved_nanos INTO v_balance, v_available FROM buckets
    WHERE account_id = r.account_id AND bucket = r.bucket FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(r.budget_scopes, 1), 0) LOOP
        SELECT least(v_room, p_limits[i] - spent_nanos - reserved_nanos) INTO v_room FROM budgets
        WHERE scope = r.budget_scopes[i] AND period = r.budget_periods[i];
    END LOOP;
    IF r.status = 'open' OR p_charge <= 0 OR v_available < p_charge OR v_room < p_charge THEN
        PERFORM tf_record_in(p_record || jsonb_build_object(
            'ledger_entry_id', NULL, 'balance_after_nanos', v_balance, 'charge_nanos', 0), NULL);
        RETURN QUERY SELECT 'unbilled'::text, NULL::text, v_balance;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(r.budget_scopes, 1), 0) LOOP
        UPDATE budgets SET spent_nanos = spent_nanos + p_charge
        WHERE scope = r.budget_scopes[i] AND period = r.budget_periods[i];
    END LOOP;
    UPDATE buckets SET balance_nanos = balance_nanos - p_charge WHERE account_id = r.account_id AND bucket = r.bucket
    RETURNING balance_nanos INTO v_balance;
    UPDATE reservations SET charged_nanos = charged_nanos + p_charge WHERE id = p_lease;
    INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note)
    VALUES (r.account_id, r.bucket, 'charge', -p_charge, v_balance, p_request_id, p_record ->> 'selected_model')
    RETURNING id INTO v_entry;
    PERFORM tf_record_in(p_record || jsonb_build_object(
        'ledger_entry_id', v_entry, 'balance_after_nanos', v_balance, 'charge_nanos', p_charge), p_lease);
    RETURN QUERY SELECT 'ok'::text, v_entry, v_balance;
END $$;
