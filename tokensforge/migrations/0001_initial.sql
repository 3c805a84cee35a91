-- Tokens Forge schema v1: accounts, keys, buckets, reservations, ledger, usage.
-- Money is bigint nano-USD. The database enforces what it can; the functions
-- below are the only writers of money rows, each one round trip, each atomic.

CREATE TABLE accounts (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id          text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id),
    name        text NOT NULL,
    policy      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id),
    project_id  text REFERENCES projects (id),
    name        text NOT NULL,
    policy      jsonb NOT NULL DEFAULT '{}',
    key_hash    bytea NOT NULL UNIQUE,          -- sha256 of the plaintext; the plaintext is never stored
    key_prefix  text NOT NULL,                  -- non-secret, for display ("tf-AbC1…")
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE buckets (
    account_id      text NOT NULL REFERENCES accounts (id),
    bucket          text NOT NULL,
    balance_nanos   bigint NOT NULL DEFAULT 0,
    reserved_nanos  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, bucket),
    CONSTRAINT reserved_non_negative CHECK (reserved_nanos >= 0),
    CONSTRAINT available_non_negative CHECK (balance_nanos - reserved_nanos >= 0)
);

-- Spend per budget scope ("key:<id>" or "project:<id>") and period ("total", "2026-11", "2026-11-28").
CREATE TABLE budgets (
    scope           text NOT NULL,
    period          text NOT NULL,
    spent_nanos     bigint NOT NULL DEFAULT 0 CHECK (spent_nanos >= 0),
    reserved_nanos  bigint NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    PRIMARY KEY (scope, period)
);

CREATE TABLE reservations (
    id              text PRIMARY KEY,           -- the request id, or "<request id>/2" after a cross-route fallback
    request_id      text NOT NULL,
    account_id      text NOT NULL,
    bucket          text NOT NULL,
    amount_nanos    bigint NOT NULL CHECK (amount_nanos >= 0),
    budget_scopes   text[] NOT NULL DEFAULT '{}',
    budget_periods  text[] NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled', 'voided', 'expired')),
    receipt         jsonb,                      -- what the sweeper records if the gateway died
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    FOREIGN KEY (account_id, bucket) REFERENCES buckets (account_id, bucket)
);
CREATE INDEX reservations_open_expiry ON reservations (expires_at) WHERE status = 'open';

CREATE TABLE ledger_entries (
    seq                  bigserial PRIMARY KEY,
    id                   text GENERATED ALWAYS AS ('le_' || seq::text) STORED UNIQUE,
    account_id           text NOT NULL,
    bucket               text NOT NULL,
    kind                 text NOT NULL CHECK (kind IN ('topup', 'charge', 'refund', 'adjustment')),
    amount_nanos         bigint NOT NULL CHECK (amount_nanos <> 0),
    balance_after_nanos  bigint NOT NULL,
    request_id           text,
    idempotency_key      text,
    note                 text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (account_id, bucket) REFERENCES buckets (account_id, bucket),
    CHECK (kind <> 'charge' OR (amount_nanos < 0 AND request_id IS NOT NULL)),
    CHECK (kind <> 'topup' OR amount_nanos > 0)
);
CREATE UNIQUE INDEX ledger_one_charge_per_request ON ledger_entries (request_id) WHERE kind = 'charge';
CREATE INDEX ledger_by_account ON ledger_entries (account_id, seq DESC);

CREATE FUNCTION tf_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only; post a correcting entry instead';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION tf_ledger_append_only();

CREATE TABLE topups (
    account_id       text NOT NULL REFERENCES accounts (id),
    idempotency_key  text NOT NULL,
    bucket           text NOT NULL,
    amount_nanos     bigint NOT NULL CHECK (amount_nanos > 0),
    ledger_seq       bigint REFERENCES ledger_entries (seq),
    PRIMARY KEY (account_id, idempotency_key)
);

CREATE TABLE usage_records (
    seq                  bigserial UNIQUE,
    request_id           text PRIMARY KEY,
    account_id           text NOT NULL,
    project_id           text,
    key_id               text,
    status               text NOT NULL CHECK (status IN ('succeeded', 'failed', 'client_cancelled')),
    model                text,
    route_id             text,
    route_kind           text,
    bucket               text,
    reserved_nanos       bigint NOT NULL DEFAULT 0,
    charge_nanos         bigint NOT NULL DEFAULT 0 CHECK (charge_nanos >= 0),
    ledger_entry_id      text REFERENCES ledger_entries (id),
    latency_ms           integer,
    receipt              jsonb NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((charge_nanos = 0) = (ledger_entry_id IS NULL))
);
CREATE INDEX usage_by_account ON usage_records (account_id, seq DESC);

-- Budget period key from the database clock (UTC), so every gateway agrees.
CREATE FUNCTION tf_period(kind text) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE kind
        WHEN 'day' THEN to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')
        WHEN 'month' THEN to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')
        ELSE 'total' END
$$;

-- Top-up, idempotent per (account, key): the topups row is the lock, so twenty
-- concurrent calls with one key credit once and all return the same entry.
CREATE FUNCTION tf_topup(p_account text, p_bucket text, p_amount bigint, p_key text, p_note text)
RETURNS TABLE (outcome text, entry_seq bigint) LANGUAGE plpgsql AS $$
DECLARE
    v_prior topups%ROWTYPE;
    v_balance bigint;
    v_seq bigint;
BEGIN
    INSERT INTO topups (account_id, idempotency_key, bucket, amount_nanos)
    VALUES (p_account, p_key, p_bucket, p_amount)
    ON CONFLICT (account_id, idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        SELECT * INTO v_prior FROM topups WHERE account_id = p_account AND idempotency_key = p_key;
        IF v_prior.bucket <> p_bucket OR v_prior.amount_nanos <> p_amount THEN
            RETURN QUERY SELECT 'conflict'::text, v_prior.ledger_seq;
        ELSE
            RETURN QUERY SELECT 'replayed'::text, v_prior.ledger_seq;
        END IF;
        RETURN;
    END IF;
    INSERT INTO buckets AS b (account_id, bucket, balance_nanos) VALUES (p_account, p_bucket, p_amount)
    ON CONFLICT (account_id, bucket) DO UPDATE SET balance_nanos = b.balance_nanos + EXCLUDED.balance_nanos
    RETURNING b.balance_nanos INTO v_balance;
    INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, idempotency_key, note)
    VALUES (p_account, p_bucket, 'topup', p_amount, v_balance, p_key, p_note)
    RETURNING seq INTO v_seq;
    UPDATE topups SET ledger_seq = v_seq WHERE account_id = p_account AND idempotency_key = p_key;
    RETURN QUERY SELECT 'created'::text, v_seq;
END $$;

-- Reserve: a pending transfer. Budget rows are locked before the bucket row
-- (the same order settle uses), and nothing changes unless everything fits.
CREATE FUNCTION tf_reserve(
    p_id text, p_request_id text, p_account text, p_bucket text, p_amount bigint, p_ttl_s double precision,
    p_scopes text[], p_period_kinds text[], p_limits bigint[], p_receipt jsonb
) RETURNS TABLE (outcome text, available_nanos bigint, budget_scope text, budget_remaining_nanos bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_periods text[] := '{}';
    v_period text;
    v_used bigint;
    v_available bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM reservations WHERE id = p_id) THEN
        RETURN QUERY SELECT 'duplicate'::text, NULL::bigint, NULL::text, NULL::bigint;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        v_period := tf_period(p_period_kinds[i]);
        v_periods := v_periods || v_period;
        INSERT INTO budgets (scope, period) VALUES (p_scopes[i], v_period) ON CONFLICT DO NOTHING;
        SELECT spent_nanos + reserved_nanos INTO v_used FROM budgets
        WHERE scope = p_scopes[i] AND period = v_period FOR UPDATE;
        IF v_used + p_amount > p_limits[i] THEN
            RETURN QUERY SELECT 'budget_exceeded'::text, NULL::bigint, p_scopes[i], greatest(p_limits[i] - v_used, 0);
            RETURN;
        END IF;
    END LOOP;
    UPDATE buckets SET reserved_nanos = reserved_nanos + p_amount
    WHERE account_id = p_account AND bucket = p_bucket AND balance_nanos - reserved_nanos >= p_amount
    RETURNING balance_nanos - reserved_nanos INTO v_available;
    IF NOT FOUND THEN
        SELECT balance_nanos - reserved_nanos INTO v_available FROM buckets
        WHERE account_id = p_account AND bucket = p_bucket;
        RETURN QUERY SELECT 'insufficient_balance'::text, coalesce(v_available, 0), NULL::text, NULL::bigint;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_scopes, 1), 0) LOOP
        UPDATE budgets SET reserved_nanos = reserved_nanos + p_amount
        WHERE scope = p_scopes[i] AND period = v_periods[i];
    END LOOP;
    INSERT INTO reservations (id, request_id, account_id, bucket, amount_nanos, budget_scopes, budget_periods, receipt, expires_at)
    VALUES (p_id, p_request_id, p_account, p_bucket, p_amount, coalesce(p_scopes, '{}'), v_periods, p_receipt,
            now() + make_interval(secs => p_ttl_s));
    RETURN QUERY SELECT 'ok'::text, v_available, NULL::text, NULL::bigint;
END $$;

-- Group commit for reservations: many in one transaction and one round trip, each
-- item all-or-nothing, in the global lock order (budget rows, then bucket rows).
-- p_budgets is a JSON array with one array of {scope, period, limit} per item.
CREATE FUNCTION tf_reserve_many(
    p_ids text[], p_request_ids text[], p_accounts text[], p_buckets text[], p_amounts bigint[],
    p_ttl_s double precision, p_budgets jsonb, p_receipts jsonb[]
) RETURNS TABLE (idx integer, outcome text, available_nanos bigint, budget_scope text, budget_remaining_nanos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO budgets (scope, period)
    SELECT DISTINCT x ->> 'scope', tf_period(x ->> 'period')
    FROM jsonb_array_elements(p_budgets) AS b(items), jsonb_array_elements(b.items) AS x
    ORDER BY 1, 2 ON CONFLICT DO NOTHING;
    PERFORM 1 FROM budgets g
    JOIN (SELECT DISTINCT x ->> 'scope' AS scope, tf_period(x ->> 'period') AS period
          FROM jsonb_array_elements(p_budgets) AS b(items), jsonb_array_elements(b.items) AS x) w
      ON g.scope = w.scope AND g.period = w.period
    ORDER BY g.scope, g.period FOR UPDATE OF g;
    PERFORM 1 FROM buckets k
    JOIN (SELECT DISTINCT t.a, t.bk FROM unnest(p_accounts, p_buckets) AS t(a, bk)) w
      ON k.account_id = w.a AND k.bucket = w.bk
    ORDER BY k.account_id, k.bucket FOR UPDATE OF k;
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        RETURN QUERY SELECT i, r.* FROM tf_reserve(
            p_ids[i], p_request_ids[i], p_accounts[i], p_buckets[i], p_amounts[i], p_ttl_s,
            ARRAY(SELECT x ->> 'scope' FROM jsonb_array_elements(p_budgets -> (i - 1)) WITH ORDINALITY AS e(x, n) ORDER BY n),
            ARRAY(SELECT x ->> 'period' FROM jsonb_array_elements(p_budgets -> (i - 1)) WITH ORDINALITY AS e(x, n) ORDER BY n),
            ARRAY(SELECT (x ->> 'limit')::bigint FROM jsonb_array_elements(p_budgets -> (i - 1)) WITH ORDINALITY AS e(x, n)
                  ORDER BY n),
            p_receipts[i]) r;
    END LOOP;
END $$;

-- Settle or void: post at most the reserved amount, release the rest, write the
-- charge entry and the usage record, all in one transaction, exactly once (a
-- reservation no longer open answers 'resolved' and nothing moves).
--
-- Lock order everywhere is budget rows (by scope, period), then bucket rows (by
-- account, bucket): tf_reserve takes a key's budget, its project's budget, then
-- the bucket; a batch (group commit) pre-locks all its budget rows in sorted
-- order, then all its bucket rows in sorted order. No two transactions can wait
-- on each other in a cycle.
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

-- A usage record from a receipt document; the receipt is kept whole for /v1/receipts.
CREATE FUNCTION tf_record(p_receipt jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO usage_records (
        request_id, account_id, project_id, key_id, status, model, route_id, route_kind, bucket,
        reserved_nanos, charge_nanos, ledger_entry_id, latency_ms, receipt)
    VALUES (
        p_receipt ->> 'request_id', p_receipt ->> 'account_id', p_receipt ->> 'project_id',
        p_receipt ->> 'key_id', p_receipt ->> 'status', p_receipt ->> 'selected_model',
        p_receipt #>> '{route,id}', p_receipt #>> '{route,kind}', p_receipt ->> 'bucket',
        coalesce((p_receipt ->> 'reserved_nanos')::bigint, 0),
        coalesce((p_receipt ->> 'charge_nanos')::bigint, 0),
        p_receipt ->> 'ledger_entry_id', (p_receipt ->> 'latency_ms')::integer, p_receipt)
    ON CONFLICT (request_id) DO NOTHING
$$;

-- The sweeper: claim overdue reservations (skipping ones a live gateway is settling) and void
-- them in the same lock order as everyone else; their usage records say what is known.
CREATE FUNCTION tf_expire(p_limit integer) RETURNS integer LANGUAGE plpgsql AS $$
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
