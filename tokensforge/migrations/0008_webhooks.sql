-- Webhooks (SPEC §2 "Webhooks"): alerts written to an outbox in the same transaction as the
-- money change that caused them, delivered later by every gateway process (tokensforge/webhooks.py).
--
-- The events come from triggers on the tables the money functions write, so no settlement,
-- grant or expiry SQL changes:
--   * ledger_entries (AFTER INSERT, once per statement, over its transition table): a `grant`
--     is `pool.granted`, an `expiry` is `pool.expired`; any entry on a bucket a webhook watches
--     (`thresholds`) re-checks that bucket's available amount: below the threshold while armed
--     → `balance.low` (and disarmed), at or above it → armed again (a top-up re-arms it);
--   * budgets (AFTER UPDATE of spent_nanos, per row): spend crossing 80 % or 100 % of the
--     key's or project's `budget_nanos` → `budget.threshold`.
-- With no webhook for the account (the usual case) a trigger costs one index probe per
-- statement (ledger) or per budget row; nothing else is read.
--
-- Each event is written once per subscribed webhook, so one webhook's events are delivered in
-- `seq` order. Locks: the alert-state rows are taken after the bucket rows (held by the
-- money statement that fired the trigger), so the global lock order stands.

CREATE TABLE webhooks (
    id               text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    url              text NOT NULL,
    events           text[] NOT NULL CHECK (cardinality(events) > 0 AND events <@ ARRAY[
                         'balance.low', 'budget.threshold', 'pool.granted', 'pool.expired']),
    thresholds       jsonb NOT NULL DEFAULT '{}',           -- bucket → nanos, for balance.low
    secret_salt      text NOT NULL,                         -- the signing secret is HMAC(server key, id:salt): never stored
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,
    -- delivery state: the next attempt's time (backoff) and the process that holds it
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by       text,
    claim_until      timestamptz
);
CREATE INDEX webhooks_by_account ON webhooks (account_id) WHERE deleted_at IS NULL;

CREATE TABLE webhook_events (
    seq           bigserial PRIMARY KEY,
    id            text NOT NULL UNIQUE,                     -- evt_…, one per (event, webhook): receivers de-duplicate by it
    webhook_id    text NOT NULL REFERENCES webhooks (id),
    account_id    text NOT NULL,
    type          text NOT NULL,
    data          jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts      integer NOT NULL DEFAULT 0,
    delivered_at  timestamptz
);
CREATE INDEX webhook_events_pending ON webhook_events (webhook_id, seq) WHERE status = 'pending';
CREATE INDEX webhook_events_by_webhook ON webhook_events (webhook_id, seq DESC);

CREATE TABLE webhook_deliveries (
    seq          bigserial PRIMARY KEY,
    webhook_id   text NOT NULL REFERENCES webhooks (id),
    event_id     text NOT NULL,
    attempt      integer NOT NULL,
    status_code  integer,                                  -- NULL: no answer (refused, timeout)
    error        text,
    duration_ms  integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, seq DESC);

-- balance.low is armed per (webhook, bucket): it fires once per fall below the threshold.
CREATE TABLE webhook_alert_state (
    webhook_id  text NOT NULL REFERENCES webhooks (id),
    bucket      text NOT NULL,
    armed       boolean NOT NULL,
    PRIMARY KEY (webhook_id, bucket)
);

-- One event for every live webhook of the account subscribed to its type.
CREATE FUNCTION tf_webhook_emit(p_account text, p_type text, p_data jsonb, p_only text DEFAULT NULL)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO webhook_events (id, webhook_id, account_id, type, data)
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), w.id, p_account, p_type, p_data
    FROM webhooks w
    WHERE w.account_id = p_account AND w.deleted_at IS NULL AND p_type = ANY (w.events)
      AND (p_only IS NULL OR w.id = p_only)
    ORDER BY w.id
$$;

CREATE FUNCTION tf_webhook_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    e record;
    w record;
    v_available bigint;
    v_threshold bigint;
BEGIN
    -- the usual case: no webhook for any account in this statement
    IF NOT EXISTS (SELECT 1 FROM webhooks wh
                   WHERE wh.deleted_at IS NULL
                     AND wh.account_id IN (SELECT DISTINCT n.account_id FROM new_entries n)) THEN
        RETURN NULL;
    END IF;
    FOR e IN SELECT n.* FROM new_entries n
             WHERE EXISTS (SELECT 1 FROM webhooks wh WHERE wh.account_id = n.account_id AND wh.deleted_at IS NULL)
             ORDER BY n.seq LOOP
        IF e.kind IN ('grant', 'expiry') THEN
            PERFORM tf_webhook_emit(e.account_id, CASE e.kind WHEN 'grant' THEN 'pool.granted' ELSE 'pool.expired' END,
                jsonb_build_object('bucket', e.bucket, 'amount_nanos', e.amount_nanos,
                                   'balance_after_nanos', e.balance_after_nanos, 'ledger_entry_id', e.id,
                                   'period_end', e.pool_period_end));
        END IF;
        FOR w IN SELECT wh.id, (wh.thresholds ->> e.bucket)::bigint AS threshold FROM webhooks wh
                 WHERE wh.account_id = e.account_id AND wh.deleted_at IS NULL AND 'balance.low' = ANY (wh.events)
                   AND wh.thresholds ? e.bucket ORDER BY wh.id LOOP
            IF v_available IS NULL THEN  -- what the account can spend: leased money counts (store.py balances)
                SELECT b.balance_nanos - b.reserved_nanos + coalesce(
                           (SELECT sum(r.amount_nanos) FROM reservations r
                            WHERE r.account_id = e.account_id AND r.bucket = e.bucket
                              AND r.status = 'open' AND r.kind = 'lease'), 0)
                INTO v_available FROM buckets b WHERE b.account_id = e.account_id AND b.bucket = e.bucket;
            END IF;
            v_threshold := w.threshold;
            IF v_available < v_threshold THEN
                INSERT INTO webhook_alert_state AS s (webhook_id, bucket, armed) VALUES (w.id, e.bucket, false)
                ON CONFLICT (webhook_id, bucket) DO UPDATE SET armed = false WHERE s.armed;
                IF FOUND THEN
                    PERFORM tf_webhook_emit(e.account_id, 'balance.low',
                        jsonb_build_object('bucket', e.bucket, 'available_nanos', v_available,
                                           'threshold_nanos', v_threshold, 'balance_after_nanos',
                                           e.balance_after_nanos, 'ledger_entry_id', e.id), w.id);
                END IF;
            ELSE
                INSERT INTO webhook_alert_state AS s (webhook_id, bucket, armed) VALUES (w.id, e.bucket, true)
                ON CONFLICT (webhook_id, bucket) DO UPDATE SET armed = true WHERE NOT s.armed;
            END IF;
        END LOOP;
        v_available := NULL;
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_webhook_events AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION tf_webhook_ledger();

CREATE FUNCTION tf_webhook_budget() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
    v_limit numeric;
    v_level integer;
    v_kind text := split_part(NEW.scope, ':', 1);
    v_id text := substr(NEW.scope, length(split_part(NEW.scope, ':', 1)) + 2);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhooks WHERE deleted_at IS NULL AND 'budget.threshold' = ANY (events)) THEN
        RETURN NULL;
    END IF;
    IF v_kind = 'key' THEN
        SELECT account_id, (policy ->> 'budget_nanos')::numeric INTO v_account, v_limit FROM api_keys WHERE id = v_id;
    ELSIF v_kind = 'project' THEN
        SELECT account_id, (policy ->> 'budget_nanos')::numeric INTO v_account, v_limit FROM projects WHERE id = v_id;
    END IF;
    IF v_account IS NULL OR v_limit IS NULL OR v_limit <= 0 THEN
        RETURN NULL;
    END IF;
    FOREACH v_level IN ARRAY ARRAY[80, 100] LOOP
        IF OLD.spent_nanos * 100 < v_limit * v_level AND NEW.spent_nanos * 100 >= v_limit * v_level THEN
            PERFORM tf_webhook_emit(v_account, 'budget.threshold', jsonb_build_object(
                'scope', v_kind, v_kind || '_id', v_id, 'period', NEW.period, 'percent', v_level,
                'budget_nanos', v_limit::bigint, 'spent_nanos', NEW.spent_nanos));
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER budgets_webhook_events AFTER UPDATE OF spent_nanos ON budgets
    FOR EACH ROW WHEN (NEW.spent_nanos > OLD.spent_nanos) EXECUTE FUNCTION tf_webhook_budget();

-- Claim up to p_limit webhooks whose oldest pending event is due, for p_claim_s seconds, skipping
-- those another process holds (row locks, SKIP LOCKED) or has claimed (claim_until): each webhook
-- is delivered by one process at a time, one event after the other.
CREATE FUNCTION tf_webhook_claim(p_holder text, p_limit integer, p_claim_s double precision)
RETURNS TABLE (id text, url text, secret_salt text) LANGUAGE sql AS $$
    WITH due AS (
        SELECT w.id FROM webhooks w
        WHERE w.deleted_at IS NULL AND w.next_attempt_at <= now()
          AND (w.claim_until IS NULL OR w.claim_until < now())
          AND EXISTS (SELECT 1 FROM webhook_events e WHERE e.webhook_id = w.id AND e.status = 'pending')
        ORDER BY w.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE webhooks w SET claimed_by = p_holder, claim_until = now() + make_interval(secs => p_claim_s)
    FROM due WHERE w.id = due.id
    RETURNING w.id, w.url, w.secret_salt
$$;

-- The outcome of one delivery attempt of the webhook's oldest pending event: the attempt is logged;
-- on success the event is delivered and the next one is due at once; on failure the webhook waits
-- p_retry_s, and an event older than p_give_up_s is marked failed (the next one goes). The claim is
-- released either way, unless another process took it over meanwhile (then only the log is written).
CREATE FUNCTION tf_webhook_attempted(p_holder text, p_webhook text, p_event text, p_status integer,
                                     p_error text, p_duration_ms integer, p_ok boolean, p_retry_s double precision,
                                     p_give_up_s double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_attempts integer;
    v_created timestamptz;
    v_outcome text;
BEGIN
    UPDATE webhook_events SET attempts = attempts + 1,
           status = CASE WHEN p_ok THEN 'delivered' ELSE status END,
           delivered_at = CASE WHEN p_ok THEN now() END
    WHERE id = p_event AND webhook_id = p_webhook AND status = 'pending'
    RETURNING attempts, created_at INTO v_attempts, v_created;
    IF NOT FOUND THEN  -- delivered by someone else meanwhile (a claim that ran out), or cancelled
        SELECT attempts + 1 INTO v_attempts FROM webhook_events WHERE id = p_event;
        v_outcome := 'stale';
    ELSIF p_ok THEN
        v_outcome := 'delivered';
    ELSIF v_created < now() - make_interval(secs => p_give_up_s) THEN
        UPDATE webhook_events SET status = 'failed' WHERE id = p_event;
        v_outcome := 'failed';
    ELSE
        v_outcome := 'retry';
    END IF;
    INSERT INTO webhook_deliveries (webhook_id, event_id, attempt, status_code, error, duration_ms)
    VALUES (p_webhook, p_event, coalesce(v_attempts, 1), p_status, p_error, p_duration_ms);
    UPDATE webhooks SET claimed_by = NULL, claim_until = NULL,
           next_attempt_at = CASE WHEN v_outcome = 'retry' THEN now() + make_interval(secs => p_retry_s)
                                  ELSE now() END
    WHERE id = p_webhook AND claimed_by = p_holder;
    RETURN v_outcome;
END $$;
