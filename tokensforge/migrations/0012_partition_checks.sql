-- A monthly partition keeps no CHECK of its own range once attached (issue #17).
--
-- tf_history_partition (0010) adds a CHECK matching the month's bounds before ATTACH PARTITION, so the
-- attach can skip scanning the new table (the PostgreSQL manual's advice for attaching), and left it
-- there. The partition bound already guarantees the same thing, and PostgreSQL evaluates (and, per
-- statement, prepares) every CHECK of the table it inserts into: perf put CHECK constraints at ~9 % of a
-- settling backend's CPU, these the redundant part (benchmarks/ledger_bench.py --settle-profile). As the
-- manual also advises, the CHECK is dropped once the partition is attached, here for the partitions that
-- exist and from now on by tf_history_partition itself.

CREATE OR REPLACE FUNCTION tf_history_partition(p_table text, p_month timestamptz) RETURNS boolean
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
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', v_name, v_name || '_range');
    RETURN true;
END $$;

DO $$
DECLARE
    v_check record;
BEGIN
    FOR v_check IN
        SELECT c.conrelid::regclass AS rel, c.conname
        FROM pg_constraint c JOIN pg_inherits i ON i.inhrelid = c.conrelid
        WHERE c.contype = 'c' AND c.conname = c.conrelid::regclass::text || '_range'
          AND i.inhparent IN ('usage_records'::regclass, 'ledger_entries'::regclass)
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_check.rel, v_check.conname);
    END LOOP;
END $$;
