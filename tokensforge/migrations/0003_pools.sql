-- Pools (SPEC §1 "pool", §5.8): buckets funded by a schedule instead of top-ups.
--
-- A subscription grants `allowance_nanos` into its pool bucket at each period start (ledger
-- entry `grant`) and lapses the unused remainder at period end (ledger entry `expiry`,
-- negative). The free research allowance is the same mechanism: every account's
-- `research-free` bucket has an implicit subscription (plan NULL) whose allowance is the
-- catalog's `[research] free_daily_allowance_usd`, kept in pool_settings by the gateways.
--
-- The database runs the schedule, from its own clock (tf_now(), shiftable for tests):
--   * exactly once with any number of gateways: a period advances only under the
--     subscription's row lock, and the ledger allows one grant per (account, bucket, period);
--   * across a gap: tf_pool_catch_up walks every missed period in order (grant, then lapse);
--   * the reserve path catches the pool up first (tf_reserve_many, under the same row
--     lock), so an allowance whose period has ended is never spent.
--
-- Reservations that straddle a period boundary settle against the period that held them:
--   * a reservation on a pool records the period it was made in (reservations.pool_period_end);
--   * at period end only `balance − reserved` lapses: held money stays in the bucket;
--   * when a hold from an ended period settles (or is voided, or expires), its charge is
--     posted as usual and the remainder it releases lapses at once (an `expiry` entry in the
--     same transaction, tagged with the old period), so the new period's grant is never
--     eaten by old holds and the old period's money never becomes spendable again.
-- Every grant, expiry and pool charge carries pool_period_end, so for each ended period
-- Σ grant + Σ expiry + Σ charge = 0 once its holds are resolved (tests/invariants.py).
--
-- Lock order (extends 0001's): budget rows, then subscription rows (by account, bucket),
-- then bucket rows (by account, bucket). Nothing waits for a subscription lock while holding
-- a bucket lock (the tick takes its subscriptions with SKIP LOCKED, so it never waits on one).

CREATE TABLE tf_clock (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    offset_interval  interval NOT NULL DEFAULT interval '0'
);
INSERT INTO tf_clock DEFAULT VALUES;

-- The clock pools use: the database's transaction time plus a test-controlled offset.
CREATE FUNCTION tf_now() RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT now() + coalesce((SELECT offset_interval FROM tf_clock), interval '0')
$$;

CREATE TABLE pool_settings (
    id                    boolean PRIMARY KEY DEFAULT true CHECK (id),
    free_allowance_nanos  bigint NOT NULL DEFAULT 0 CHECK (free_allowance_nanos >= 0)
);
INSERT INTO pool_settings DEFAULT VALUES;

CREATE TABLE subscriptions (
    id               text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    bucket           text NOT NULL,
    plan             text,                    -- NULL: the free research allowance
    allowance_nanos  bigint CHECK (allowance_nanos > 0),  -- NULL: pool_settings.free_allowance_nanos
    period           text NOT NULL CHECK (period IN ('day', 'month')),
    -- period n is [starts_at + n periods, starts_at + n+1 periods), computed in UTC from the
    -- anchor (never by adding to the previous end: Jan 31 + 1 month + 1 month is Mar 31, not Mar 28)
    starts_at        timestamptz NOT NULL,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'cancelled', 'ended')),
    ends_at          timestamptz,             -- set by cancel: the end of the period it was cancelled in
    periods          integer NOT NULL DEFAULT 0 CHECK (periods >= 0),  -- periods granted so far
    period_start     timestamptz,             -- the period the pool's balance belongs to
    period_end       timestamptz,
    period_allowance_nanos bigint,            -- what that period was granted
    due_at           timestamptz,             -- next grant or lapse; NULL once ended
    cancelled_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT tf_now(),
    FOREIGN KEY (account_id, bucket) REFERENCES buckets (account_id, bucket),
    CHECK ((plan IS NULL) = (allowance_nanos IS NULL)),
    CHECK ((status = 'ended') = (due_at IS NULL))
);
CREATE UNIQUE INDEX subscriptions_one_live_per_pool ON subscriptions (account_id, bucket) WHERE status <> 'ended';
CREATE INDEX subscriptions_due ON subscriptions (due_at) WHERE status <> 'ended';
CREATE INDEX subscriptions_by_account ON subscriptions (account_id, created_at);

ALTER TABLE ledger_entries ADD COLUMN pool_period_end timestamptz;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('topup', 'charge', 'refund', 'adjustment', 'grant', 'expiry'));
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_grant_positive
    CHECK (kind <> 'grant' OR (amount_nanos > 0 AND pool_period_end IS NOT NULL));
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_expiry_negative
    CHECK (kind <> 'expiry' OR (amount_nanos < 0 AND pool_period_end IS NOT NULL));
CREATE UNIQUE INDEX ledger_one_grant_per_period ON ledger_entries (account_id, bucket, pool_period_end)
    WHERE kind = 'grant';
CREATE INDEX ledger_by_pool_period ON ledger_entries (account_id, bucket, pool_period_end)
    WHERE pool_period_end IS NOT NULL;

ALTER TABLE reservations ADD COLUMN pool_period_end timestamptz;   -- the pool period that holds it
ALTER TABLE reservations ADD COLUMN pool_reserved_at timestamptz;  -- tf_now() when it was made

-- Every research-free bucket row gets its implicit daily subscription, anchored at UTC midnight.
CREATE FUNCTION tf_free_pool_for_bucket() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subscriptions (id, account_id, bucket, period, starts_at, due_at)
    VALUES ('sub_free_' || NEW.account_id, NEW.account_id, NEW.bucket, 'day',
            date_trunc('day', tf_now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
            date_trunc('day', tf_now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER buckets_research_free AFTER INSERT ON buckets
    FOR EACH ROW WHEN (NEW.bucket = 'research-free') EXECUTE FUNCTION tf_free_pool_for_bucket();

CREATE FUNCTION tf_period_bound(p_anchor timestamptz, p_period text, p_n integer) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT ((p_anchor AT TIME ZONE 'UTC')
            + CASE p_period WHEN 'day' THEN interval '1 day' ELSE interval '1 month' END * p_n) AT TIME ZONE 'UTC'
$$;

-- Move one money amount on a pool bucket and write its ledger entry (a grant or an expiry).
CREATE FUNCTION tf_pool_entry(p_account text, p_bucket text, p_kind text, p_amount bigint, p_period_end timestamptz,
                              p_note text, p_request_id text DEFAULT NULL) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_balance bigint;
BEGIN
    UPDATE buckets SET balance_nanos = balance_nanos + p_amount
    WHERE account_id = p_account AND bucket = p_bucket RETURNING balance_nanos INTO v_balance;
    INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note,
                                pool_period_end)
    VALUES (p_account, p_bucket, p_kind, p_amount, v_balance, p_request_id, p_note, p_period_end);
END $$;

-- Bring one subscription up to tf_now(): lapse each ended period, grant each started one, in
-- order. Takes the subscription's row lock (a caller may hold it already), then its bucket's.
CREATE FUNCTION tf_pool_catch_up(p_id text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    s subscriptions%ROWTYPE;
    v_now timestamptz := tf_now();
    v_steps integer := 0;
    v_amount bigint;
    v_start timestamptz;
    v_end timestamptz;
BEGIN
    SELECT * INTO s FROM subscriptions WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WHILE s.status <> 'ended' AND s.due_at <= v_now LOOP
        IF s.period_end IS NOT NULL THEN
            -- the period ended: what is available lapses; holds stay and lapse when they settle
            SELECT balance_nanos - reserved_nanos INTO v_amount FROM buckets
            WHERE account_id = s.account_id AND bucket = s.bucket FOR UPDATE;
            IF v_amount > 0 THEN
                PERFORM tf_pool_entry(s.account_id, s.bucket, 'expiry', -v_amount, s.period_end,
                                      'unused allowance lapsed at period end');
            END IF;
            IF s.ends_at IS NOT NULL AND s.period_end >= s.ends_at THEN
                s.status := 'ended';
                s.due_at := NULL;
                v_steps := v_steps + 1;
                EXIT;
            END IF;
        END IF;
        v_start := tf_period_bound(s.starts_at, s.period, s.periods);
        v_end := tf_period_bound(s.starts_at, s.period, s.periods + 1);
        v_amount := coalesce(s.allowance_nanos, (SELECT free_allowance_nanos FROM pool_settings));
        IF v_amount > 0 THEN
            PERFORM tf_pool_entry(s.account_id, s.bucket, 'grant', v_amount, v_end,
                                  coalesce(s.plan, 'free research allowance') || ' allowance');
        END IF;
        s.periods := s.periods + 1;
        s.period_start := v_start;
        s.period_end := v_end;
        s.period_allowance_nanos := v_amount;
        s.due_at := v_end;
        v_steps := v_steps + 1;
    END LOOP;
    IF v_steps > 0 THEN
        UPDATE subscriptions SET status = s.status, periods = s.periods, period_start = s.period_start,
               period_end = s.period_end, period_allowance_nanos = s.period_allowance_nanos, due_at = s.due_at
        WHERE id = p_id;
    END IF;
    RETURN v_steps;
END $$;

-- The background tick (every gateway process): take due subscriptions no one else is working
-- on (SKIP LOCKED) and catch each up. Also records the catalog's free research allowance.
CREATE FUNCTION tf_pool_tick(p_free_allowance bigint, p_limit integer) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_id text;
    v_count integer := 0;
BEGIN
    UPDATE pool_settings SET free_allowance_nanos = p_free_allowance
    WHERE free_allowance_nanos IS DISTINCT FROM p_free_allowance;
    FOR v_id IN SELECT id FROM subscriptions WHERE status <> 'ended' AND due_at <= tf_now()
                ORDER BY account_id, bucket LIMIT p_limit FOR UPDATE SKIP LOCKED LOOP
        PERFORM tf_pool_catch_up(v_id);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END $$;

-- Catch up the due pools among (account, bucket) pairs, as the reserve path and the views need
-- them. All their rows are locked first, in order, before any bucket row: taking a subscription
-- lock while holding a bucket lock could deadlock with a reservation batch doing the same.
CREATE FUNCTION tf_pool_catch_up_due(p_accounts text[], p_buckets text[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_ids text[];
    v_id text;
BEGIN
    SELECT array_agg(due.id ORDER BY due.account_id, due.bucket) INTO v_ids
    FROM (SELECT s.id, s.account_id, s.bucket FROM subscriptions s
          JOIN (SELECT DISTINCT t.a, t.bk FROM unnest(p_accounts, p_buckets) AS t(a, bk)) w
            ON s.account_id = w.a AND s.bucket = w.bk
          WHERE s.status <> 'ended' AND s.due_at <= tf_now()
          ORDER BY s.account_id, s.bucket FOR UPDATE OF s) due;
    FOREACH v_id IN ARRAY coalesce(v_ids, '{}') LOOP
        PERFORM tf_pool_catch_up(v_id);
    END LOOP;
END $$;

-- Cancel: the subscription ends at the end of its current period (at once if none started).
CREATE FUNCTION tf_pool_cancel(p_id text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tf_pool_catch_up(p_id);
    UPDATE subscriptions SET
        cancelled_at = tf_now(),
        status = CASE WHEN period_end IS NULL THEN 'ended' ELSE 'cancelled' END,
        ends_at = coalesce(period_end, tf_now()),
        due_at = CASE WHEN period_end IS NULL THEN NULL ELSE period_end END
    WHERE id = p_id AND status = 'active';
END $$;

-- Reserve (replaces 0001's): as before, but first catch up every due pool among the holds, in
-- the lock order budget rows → subscription rows → bucket rows, and tag each hold on a pool with
-- its period (returned to the gateway for the receipt, and kept in the sweeper's receipt).
DROP FUNCTION tf_reserve_many(text[], text[], text[], text[], bigint[], double precision, jsonb, jsonb[]);
CREATE FUNCTION tf_reserve_many(
    p_ids text[], p_request_ids text[], p_accounts text[], p_buckets text[], p_amounts bigint[],
    p_ttl_s double precision, p_budgets jsonb, p_receipts jsonb[]
) RETURNS TABLE (idx integer, outcome text, available_nanos bigint, budget_scope text, budget_remaining_nanos bigint,
                 pool_period_end timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_end timestamptz;
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
    PERFORM tf_pool_catch_up_due(p_accounts, p_buckets);
    PERFORM 1 FROM buckets k
    JOIN (SELECT DISTINCT t.a, t.bk FROM unnest(p_accounts, p_buckets) AS t(a, bk)) w
      ON k.account_id = w.a AND k.bucket = w.bk
    ORDER BY k.account_id, k.bucket FOR UPDATE OF k;
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        SELECT * INTO r FROM tf_reserve(
            p_ids[i], p_request_ids[i], p_accounts[i], p_buckets[i], p_amounts[i], p_ttl_s,
            ARRAY(SELECT x ->> 'scope' FROM jsonb_array_elements(p_budgets -> (i - 1)) WITH ORDINALITY AS e(x, n) ORDER BY n),
            ARRAY(SELECT x ->> 'period' FROM jsonb_array_elements(p_budgets -> (i - 1)) WITH ORDINALITY AS e(x, n) ORDER BY n),
            ARRAY(SELECT (x ->> 'limit')::bigint FROM jsonb_array_elements(p_budgets -> (i - 1)) WITH ORDINALITY AS e(x, n)
                  ORDER BY n),
            p_receipts[i]);
        v_end := NULL;
        IF r.outcome = 'ok' THEN
            SELECT s.period_end INTO v_end FROM subscriptions s
            WHERE s.account_id = p_accounts[i] AND s.bucket = p_buckets[i] AND s.status <> 'ended';
            IF v_end IS NOT NULL THEN
                UPDATE reservations SET pool_period_end = v_end, pool_reserved_at = tf_now(),
                       receipt = CASE WHEN receipt IS NULL THEN NULL ELSE receipt || jsonb_build_object(
                           'bucket_kind', 'pool', 'pool_period_end', v_end) END
                WHERE id = p_ids[i];
            END IF;
        END IF;
        RETURN QUERY SELECT i, r.outcome, r.available_nanos, r.budget_scope, r.budget_remaining_nanos, v_end;
    END LOOP;
END $$;

-- Settle or void (replaces 0001's): as before; a charge on a pool carries its period, and a hold
-- whose period has ended lapses what it releases at once (see the top of this file).
CREATE OR REPLACE FUNCTION tf_finish_item(p_id text, p_charge bigint, p_final_status text, p_record jsonb)
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
        INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, request_id, note,
                                    pool_period_end)
        VALUES (r.account_id, r.bucket, 'charge', -p_charge, v_balance, r.request_id, p_record ->> 'selected_model',
                r.pool_period_end)
        RETURNING id INTO v_entry;
    END IF;
    IF r.pool_period_end IS NOT NULL AND r.pool_period_end <= tf_now() AND r.amount_nanos > p_charge THEN
        PERFORM tf_pool_entry(r.account_id, r.bucket, 'expiry', p_charge - r.amount_nanos, r.pool_period_end,
                              'released hold of an ended period lapsed', r.request_id);
        IF v_entry IS NULL THEN
            v_balance := v_balance - (r.amount_nanos - p_charge);
        END IF;
    END IF;
    IF p_record IS NOT NULL THEN
        PERFORM tf_record(p_record || jsonb_build_object(
            'ledger_entry_id', v_entry, 'balance_after_nanos', v_balance, 'charge_nanos', p_charge));
    END IF;
    RETURN QUERY SELECT 'ok'::text, v_entry, v_balance;
END $$;
