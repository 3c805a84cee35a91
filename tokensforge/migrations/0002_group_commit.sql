-- Group commit: settle or void many reservations in one transaction and one round trip.
--
-- Lock order everywhere is budget rows (by scope, period), then bucket rows (by
-- account, bucket): tf_reserve takes a key's budget, its project's budget, then
-- the bucket; a batch pre-locks all its budget rows in sorted order, then all
-- its bucket rows in sorted order. No two transactions can wait on each other
-- in a cycle.

CREATE FUNCTION tf_finish_item(p_id text, p_charge bigint, p_final_status text, p_record jsonb)
RETURNS TABLE (outcome text, ledger_entry_id text, balance_after_nanos bigint) LANGUAGE plpgsql AS $$
DECLARE
    r reservations%ROWTYPE;
    v_balance bigint;
    v_entry text;
BEGIN
    UPDATE reservations SET status = p_final_status, resolved_at = now()
    WHERE id = p_id AND status = 'open' AND p_charge BETWEEN 0 AND amount_nanos RETURNING * INTO r;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM reservations WHERE id = p_id AND status = 'open') THEN
            RETURN QUERY SELECT 'charge_out_of_range'::text, NULL::text, NULL::bigint;
        ELSE
            RETURN QUERY SELECT 'resolved'::text, NULL::text, NULL::bigint;
        END IF;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(r.budget_scopes, 1), 0) LOOP
        UPDATE budgets SET reserved_nanos = reserved_nanos - r.amount_nanos, spent_nanos = spent_nanos + p_charge
        WHERE scope = r.budget_scopes[i] AND period = r.budget_periods[i];
    END LOOP;
    UPDATE buckets SET balance_nanos = balance_nanos - p_charge, reserved_nanos = reserved_nanos - r.amount_nanos
    WHERE account_id = r.account_id AND bucket = r.bucket
    RETURNING buckets.balance_nanos INTO v_balance;
    IF p_charge > 0 THEN
        INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note)
        VALUES (r.account_id, r.bucket, 'charge', -p_charge, v_balance, r.request_id, p_record ->> 'selected_model')
        RETURNING id INTO v_entry;
    END IF;
    IF p_record IS NOT NULL THEN
        PERFORM tf_record(p_record || jsonb_build_object(
            'ledger_entry_id', v_entry, 'balance_after_nanos', v_balance, 'charge_nanos', p_charge));
    END IF;
    RETURN QUERY SELECT 'ok'::text, v_entry, v_balance;
END $$;

CREATE FUNCTION tf_lock_for(p_ids text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM budgets b
    JOIN (SELECT DISTINCT s.scope, s.period FROM reservations r,
          unnest(r.budget_scopes, r.budget_periods) AS s(scope, period)
          WHERE r.id = ANY (p_ids) AND r.status = 'open') x ON b.scope = x.scope AND b.period = x.period
    ORDER BY b.scope, b.period FOR UPDATE OF b;
    PERFORM 1 FROM buckets k
    JOIN (SELECT DISTINCT account_id, bucket FROM reservations WHERE id = ANY (p_ids) AND status = 'open') x
      ON k.account_id = x.account_id AND k.bucket = x.bucket
    ORDER BY k.account_id, k.bucket FOR UPDATE OF k;
END $$;

CREATE FUNCTION tf_finish_many(p_ids text[], p_charges bigint[], p_statuses text[], p_records jsonb[])
RETURNS TABLE (idx integer, outcome text, ledger_entry_id text, balance_after_nanos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tf_lock_for(p_ids);
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        RETURN QUERY SELECT i, f.outcome, f.ledger_entry_id, f.balance_after_nanos
                     FROM tf_finish_item(p_ids[i], p_charges[i], p_statuses[i], p_records[i]) f;
    END LOOP;
END $$;

-- The single-item form keeps its contract: a reservation that is not open raises TF001.
CREATE OR REPLACE FUNCTION tf_finish(
    p_id text, p_charge bigint, p_final_status text, p_record jsonb
) RETURNS TABLE (ledger_entry_id text, balance_after_nanos bigint) LANGUAGE plpgsql AS $$
DECLARE
    f record;
BEGIN
    SELECT * INTO f FROM tf_finish_item(p_id, p_charge, p_final_status, p_record);
    IF f.outcome = 'resolved' THEN
        RAISE EXCEPTION 'reservation % is not open', p_id USING ERRCODE = 'TF001';
    ELSIF f.outcome = 'charge_out_of_range' THEN
        RAISE EXCEPTION 'charge % outside reservation %', p_charge, p_id USING ERRCODE = 'TF002';
    END IF;
    RETURN QUERY SELECT f.ledger_entry_id, f.balance_after_nanos;
END $$;

-- The sweeper: claim overdue reservations (skipping ones a live gateway is settling) and void
-- them in the same lock order as everyone else.
CREATE OR REPLACE FUNCTION tf_expire(p_limit integer) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_ids text[];
    v_records jsonb[];
BEGIN
    SELECT array_agg(id), array_agg(CASE WHEN receipt IS NULL THEN NULL ELSE receipt || jsonb_build_object(
               'status', 'failed', 'charge_usd', '0.000000000',
               'error', 'reservation expired: the gateway serving it stopped') END)
    INTO v_ids, v_records
    FROM (SELECT id, receipt FROM reservations WHERE status = 'open' AND expires_at < now()
          ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED) due;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM * FROM tf_finish_many(v_ids, array_fill(0::bigint, ARRAY[cardinality(v_ids)]),
                                  array_fill('expired'::text, ARRAY[cardinality(v_ids)]), v_records);
    RETURN cardinality(v_ids);
END $$;
