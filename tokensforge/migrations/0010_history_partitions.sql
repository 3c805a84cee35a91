-- History that grows: usage_records and ledger_entries partitioned by calendar month (UTC) of
-- created_at (native declarative partitioning), the indexes the views need, and what retention
-- (archive a closed month to a file, then detach and drop it) records.
--
-- A unique index on a partitioned table must contain the partition key, so the three global
-- uniqueness rules the money relies on move to small non-partitioned guard tables, filled by
-- BEFORE INSERT triggers in the inserting transaction (the same commit, the same locks):
--   ledger_charge_requests  PK (request_id)                         a request is charged at most once
--   ledger_pool_grants      PK (account_id, bucket, pool_period_end) a pool period is granted at most once
--   usage_request_ids       PK (request_id)                         one usage record per request
-- The first two keep their constraint names (ledger_one_charge_per_request,
-- ledger_one_grant_per_period): a second charge still fails with a unique violation. A second
-- usage record for a request is skipped, as `ON CONFLICT (request_id) DO NOTHING` did; the writers'
-- conflict targets are rewritten below to a bare `ON CONFLICT DO NOTHING`.
-- Guard rows of archived months are deleted with their partitions (a request id of an archived
-- month can no longer settle: its reservation or lease was resolved months before).
--
-- Two foreign keys cannot reference a partitioned table without the partition key and are
-- dropped: usage_records.ledger_entry_id → ledger_entries.id and topups.ledger_seq →
-- ledger_entries.seq (both are written by the same functions in one transaction, and
-- tests/invariants.py checks every charge against its record).

-- 1. Partition helpers ---------------------------------------------------------------------------

-- The first instant of the UTC month holding p_t.
CREATE FUNCTION tf_month_start(p_t timestamptz) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT date_trunc('month', p_t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
$$;

-- Create (if missing) p_table's partition for the UTC month holding p_month: a standalone table
-- then ATTACH, which takes only SHARE UPDATE EXCLUSIVE on the parent (inserts and reads go on).
-- Returns true if it created one.
CREATE FUNCTION tf_history_partition(p_table text, p_month timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_from timestamptz := tf_month_start(p_month);
    v_to timestamptz := tf_month_start(tf_month_start(p_month) + interval '40 days');
    v_name text := p_table || '_p' || to_char(v_from AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(v_name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED'
                   ' INCLUDING STORAGE)', v_name, p_table);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (created_at >= %L AND created_at < %L)',
                   v_name, v_name || '_range', v_from, v_to);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', p_table, v_name, v_from, v_to);
    RETURN true;
END $$;

-- Partitions of both tables for the current month and p_ahead months after it (the sweeper calls
-- this; lock_timeout keeps a busy moment from queueing anyone behind it — the next pass retries).
CREATE FUNCTION tf_history_ensure_partitions(p_ahead integer DEFAULT 2) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_made integer := 0;
    v_table text;
BEGIN
    FOR i IN 0 .. p_ahead LOOP
        FOREACH v_table IN ARRAY ARRAY['usage_records', 'ledger_entries'] LOOP
            IF tf_history_partition(v_table, tf_month_start(now()) + make_interval(months => i) + interval '1 day') THEN
                v_made := v_made + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN v_made;
END $$;

-- 2. Guards (global uniqueness) ------------------------------------------------------------------

CREATE FUNCTION tf_usage_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_request_ids (request_id, created_at) VALUES (NEW.request_id, NEW.created_at)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;  -- this request has its record already: skipped, as ON CONFLICT DO NOTHING would
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION tf_ledger_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'charge' THEN
        INSERT INTO ledger_charge_requests (request_id, created_at) VALUES (NEW.request_id, NEW.created_at);
    ELSIF NEW.kind = 'grant' THEN
        INSERT INTO ledger_pool_grants (account_id, bucket, pool_period_end, created_at)
        VALUES (NEW.account_id, NEW.bucket, NEW.pool_period_end, NEW.created_at);
    END IF;
    RETURN NEW;
END $$;

-- 3. Convert both tables (existing rows copied into monthly partitions) ---------------------------

CREATE FUNCTION tf_history_convert(p_table text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_old text := p_table || '_unpartitioned';
    v_seq text := pg_get_serial_sequence(p_table, 'seq');
    v_cols text;
    v_first timestamptz;
    v_month timestamptz;
    v_fk record;
BEGIN
    -- foreign keys that point at the table cannot point at a partitioned one
    FOR v_fk IN SELECT conrelid::regclass AS rel, conname FROM pg_constraint
                WHERE contype = 'f' AND confrelid = p_table::regclass AND conrelid <> p_table::regclass LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_fk.rel, v_fk.conname);
    END LOOP;
    FOR v_fk IN SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = p_table::regclass LOOP
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', p_table, v_fk.conname);
    END LOOP;
    EXECUTE format('ALTER SEQUENCE %s OWNED BY NONE', v_seq);
    EXECUTE format('ALTER TABLE %I RENAME TO %I', p_table, v_old);
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED'
                   ' INCLUDING STORAGE) PARTITION BY RANGE (created_at)', p_table, v_old);
    EXECUTE format('ALTER SEQUENCE %s OWNED BY %I.seq', v_seq, p_table);
    EXECUTE format('SELECT min(created_at) FROM %I', v_old) INTO v_first;
    v_month := tf_month_start(least(coalesce(v_first, now()), now()));
    WHILE v_month <= tf_month_start(now()) + interval '2 months' LOOP
        PERFORM tf_history_partition(p_table, v_month + interval '1 day');
        v_month := tf_month_start(v_month + interval '40 days');
    END LOOP;
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO v_cols FROM pg_attribute
    WHERE attrelid = v_old::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    EXECUTE format('INSERT INTO %I (%s) SELECT %s FROM %I ORDER BY seq', p_table, v_cols, v_cols, v_old);
    EXECUTE format('DROP TABLE %I', v_old);
END $$;

SELECT tf_history_convert('ledger_entries');
SELECT tf_history_convert('usage_records');
DROP FUNCTION tf_history_convert(text);

CREATE TABLE usage_request_ids (
    request_id  text PRIMARY KEY,
    created_at  timestamptz NOT NULL
);
CREATE INDEX usage_request_ids_time ON usage_request_ids USING brin (created_at);

CREATE TABLE ledger_charge_requests (
    request_id  text NOT NULL,
    created_at  timestamptz NOT NULL,
    CONSTRAINT ledger_one_charge_per_request PRIMARY KEY (request_id)
);
CREATE INDEX ledger_charge_requests_time ON ledger_charge_requests USING brin (created_at);

CREATE TABLE ledger_pool_grants (
    account_id       text NOT NULL,
    bucket           text NOT NULL,
    pool_period_end  timestamptz NOT NULL,
    created_at       timestamptz NOT NULL,
    CONSTRAINT ledger_one_grant_per_period PRIMARY KEY (account_id, bucket, pool_period_end)
);

INSERT INTO usage_request_ids (request_id, created_at) SELECT request_id, created_at FROM usage_records;
INSERT INTO ledger_charge_requests (request_id, created_at)
SELECT request_id, created_at FROM ledger_entries WHERE kind = 'charge';
INSERT INTO ledger_pool_grants (account_id, bucket, pool_period_end, created_at)
SELECT account_id, bucket, pool_period_end, created_at FROM ledger_entries WHERE kind = 'grant';

-- 4. Indexes (created on the parent: every partition, present and future, gets them) -------------

ALTER TABLE ledger_entries ADD PRIMARY KEY (seq, created_at);
CREATE INDEX ledger_entries_id ON ledger_entries (id);
CREATE INDEX ledger_by_account ON ledger_entries (account_id, seq DESC);
CREATE INDEX ledger_by_account_bucket ON ledger_entries (account_id, bucket, seq DESC);
CREATE INDEX ledger_charge_by_request ON ledger_entries (request_id) WHERE kind = 'charge';
CREATE INDEX ledger_by_pool_period ON ledger_entries (account_id, bucket, pool_period_end)
    WHERE pool_period_end IS NOT NULL;

ALTER TABLE usage_records ADD PRIMARY KEY (request_id, created_at);
CREATE INDEX usage_by_account ON usage_records (account_id, seq DESC);
-- the spend summary reads only this index (index-only scans once autovacuum has set the visibility map)
CREATE INDEX usage_by_account_time ON usage_records (account_id, created_at)
    INCLUDE (bucket, charge_nanos, model, route_id, route_kind);
-- one per /v1/usage filter: a filter that matches few rows (or none) reads only those
CREATE INDEX usage_by_account_status ON usage_records (account_id, status, seq DESC);
CREATE INDEX usage_by_account_bucket ON usage_records (account_id, bucket, seq DESC);
CREATE INDEX usage_by_account_model ON usage_records (account_id, model, seq DESC);
CREATE INDEX usage_by_account_route_kind ON usage_records (account_id, route_kind, seq DESC);

-- 5. Triggers -------------------------------------------------------------------------------------

CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION tf_ledger_append_only();
CREATE TRIGGER ledger_once BEFORE INSERT ON ledger_entries
    FOR EACH ROW WHEN (NEW.kind IN ('charge', 'grant')) EXECUTE FUNCTION tf_ledger_once();
CREATE TRIGGER usage_once BEFORE INSERT ON usage_records
    FOR EACH ROW EXECUTE FUNCTION tf_usage_once();
-- 0008's webhook outbox trigger went with the old table: it follows the new one (a statement trigger with
-- a transition table sees the rows of every partition)
CREATE TRIGGER ledger_webhook_events AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION tf_webhook_ledger();

-- 6. Writers: `ON CONFLICT (request_id)` needs a unique index the partitioned table cannot have;
-- every function that uses it (whatever migration made it) is recreated with a bare ON CONFLICT,
-- which the usage_once trigger honours. A DO UPDATE cannot be rewritten this way: refuse it.
DO $$
DECLARE
    f record;
    v_def text;
BEGIN
    -- only inserts into the partitioned tables: other tables (stream_traces…) keep their own unique keys
    FOR f IN SELECT p.oid, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = current_schema()
               AND p.prosrc ~* 'insert\s+into\s+(usage_records|ledger_entries)\M[^;]*?on\s+conflict\s*\(\s*request_id\s*\)' LOOP
        v_def := pg_get_functiondef(f.oid);
        IF v_def ~* 'insert\s+into\s+(usage_records|ledger_entries)\M[^;]*?on\s+conflict\s*\(\s*request_id\s*\)\s*do\s+update' THEN
            RAISE EXCEPTION 'function % upserts by request_id: rewrite it for partitioned history', f.proname;
        END IF;
        EXECUTE regexp_replace(v_def,
            '(insert\s+into\s+(usage_records|ledger_entries)\M[^;]*?)on\s+conflict\s*\(\s*request_id\s*\)',
            '\1ON CONFLICT', 'gi');
    END LOOP;
END $$;

-- 7. Retention: what each archived month held -----------------------------------------------------

-- One row per archived (table, month): the file, its SHA-256 and its rows; the ledger's row carries
-- per-bucket totals {"<account>\t<bucket>": {"entries": n, "amount_nanos": n}} so that
-- balance = Σ archived totals + Σ live entries stays checkable (tf_ledger_bucket_totals).
CREATE TABLE history_archives (
    table_name    text NOT NULL CHECK (table_name IN ('usage_records', 'ledger_entries')),
    month         date NOT NULL,
    file          text NOT NULL,
    sha256        text NOT NULL,
    rows          bigint NOT NULL CHECK (rows >= 0),
    bucket_totals jsonb NOT NULL DEFAULT '{}',
    archived_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, month)
);

-- Every bucket's ledger total across live partitions and archived months.
CREATE FUNCTION tf_ledger_bucket_totals() RETURNS TABLE (account_id text, bucket text, entries bigint,
                                                         amount_nanos numeric)
LANGUAGE sql STABLE AS $$
    SELECT account_id, bucket, sum(entries)::bigint, sum(amount_nanos) FROM (
        SELECT account_id, bucket, count(*) AS entries, sum(amount_nanos) AS amount_nanos
        FROM ledger_entries GROUP BY 1, 2
        UNION ALL
        SELECT split_part(t.key, E'\t', 1), split_part(t.key, E'\t', 2), (t.value ->> 'entries')::bigint,
               (t.value ->> 'amount_nanos')::numeric
        FROM history_archives a, jsonb_each(a.bucket_totals) t
        WHERE a.table_name = 'ledger_entries') x
    GROUP BY 1, 2
$$;

-- 8. The spend summary's rollup: charges and requests per account, UTC hour, bucket, model and route,
-- kept by the inserting transaction (an upsert per record; the rows of one account are only written
-- by transactions that already hold its bucket's row lock, so this adds no new wait). The console's
-- 24 h and 30 day charts read ≤ 720 rows per model/route instead of every record of the window.
-- Keys use '' for "none" (a primary key cannot hold NULL).
CREATE TABLE usage_hourly (
    account_id    text NOT NULL,
    hour          timestamptz NOT NULL,
    bucket        text NOT NULL,
    model         text NOT NULL,
    route_id      text NOT NULL,
    route_kind    text NOT NULL,
    charge_nanos  bigint NOT NULL CHECK (charge_nanos >= 0),
    requests      bigint NOT NULL CHECK (requests >= 0),
    PRIMARY KEY (account_id, hour, bucket, model, route_id, route_kind)
);

CREATE FUNCTION tf_usage_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_hourly AS h (account_id, hour, bucket, model, route_id, route_kind, charge_nanos, requests)
    VALUES (NEW.account_id, date_trunc('hour', NEW.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
            coalesce(NEW.bucket, ''), coalesce(NEW.model, ''), coalesce(NEW.route_id, ''),
            coalesce(NEW.route_kind, ''), NEW.charge_nanos, 1)
    ON CONFLICT (account_id, hour, bucket, model, route_id, route_kind) DO UPDATE
    SET charge_nanos = h.charge_nanos + EXCLUDED.charge_nanos, requests = h.requests + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER usage_rollup AFTER INSERT ON usage_records FOR EACH ROW EXECUTE FUNCTION tf_usage_rollup();

-- A record rewritten in place (none is today) moves its charge between rollup rows.
CREATE FUNCTION tf_usage_rollup_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE usage_hourly SET charge_nanos = charge_nanos - OLD.charge_nanos, requests = requests - 1
    WHERE account_id = OLD.account_id AND hour = date_trunc('hour', OLD.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
      AND bucket = coalesce(OLD.bucket, '') AND model = coalesce(OLD.model, '')
      AND route_id = coalesce(OLD.route_id, '') AND route_kind = coalesce(OLD.route_kind, '');
    RETURN tf_usage_rollup();
END $$;
CREATE TRIGGER usage_rollup_update AFTER UPDATE OF account_id, created_at, bucket, model, route_id, route_kind,
    charge_nanos ON usage_records FOR EACH ROW EXECUTE FUNCTION tf_usage_rollup_update();

INSERT INTO usage_hourly (account_id, hour, bucket, model, route_id, route_kind, charge_nanos, requests)
SELECT account_id, date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', coalesce(bucket, ''),
       coalesce(model, ''), coalesce(route_id, ''), coalesce(route_kind, ''), sum(charge_nanos), count(*)
FROM usage_records GROUP BY 1, 2, 3, 4, 5, 6;
