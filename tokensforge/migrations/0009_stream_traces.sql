-- No lost traces (SPEC §5.9, issue #16): a stream carved from a lease leaves a row when it starts.
--
-- A request carved from a lease has no reservation row of its own (0005_leases.sql): until it
-- settled, nothing in the database named it, so a gateway killed mid-stream left a client holding an
-- x-request-id that had no usage record. Now the gateway writes a *trace* for each such stream
-- (its receipt as it stood when the stream opened, and the lease it is carved from), batched like
-- settlements and written while the upstream call is under way, so it costs the request no round
-- trip of its own. The stream's settlement writes the usage record as before; the trace is then
-- redundant and the sweeper deletes it. If the lease ends without the request settling (its holder
-- died and a sweeper expired the lease, or its holder closed it) and a grace period passes with no
-- settlement, the sweeper writes the usage record: `failed`, error `gateway_lost`, charged 0.
-- Nothing moves money here: a trace is never a hold, and the lease's money goes back by tf_expire.

CREATE TABLE stream_traces (
    request_id  text PRIMARY KEY,
    lease_id    text NOT NULL,
    receipt     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stream_traces_lease ON stream_traces (lease_id);

-- Many traces in one statement (group commit). A request that already has a usage record (its
-- settlement overtook its trace) gets none; a second trace of the same request (the walk moved to a
-- fallback route carved from another lease) replaces the first.
CREATE FUNCTION tf_trace_many(p_leases text[], p_receipts jsonb[]) RETURNS integer LANGUAGE sql AS $$
    WITH written AS (
        INSERT INTO stream_traces (request_id, lease_id, receipt)
        SELECT t.rec ->> 'request_id', t.lease_id, t.rec
        FROM unnest(p_leases, p_receipts) AS t(lease_id, rec)
        WHERE NOT EXISTS (SELECT 1 FROM usage_records u WHERE u.request_id = t.rec ->> 'request_id')
        ON CONFLICT (request_id) DO UPDATE SET lease_id = excluded.lease_id, receipt = excluded.receipt
        RETURNING 1
    )
    SELECT count(*)::integer FROM written
$$;

-- The sweeper's pass: forget traces whose request settled; close those whose lease ended more than
-- p_grace_s ago without them (expired by a sweeper: its holder stopped renewing it; or closed by its
-- holder) with a usage record charged 0. The grace leaves room for a settlement still being retried
-- by a live gateway (a late charge, tf_lease_charge_late), which then wins. SKIP LOCKED lets every
-- process sweep in parallel. Answers how many records it wrote.
CREATE FUNCTION tf_close_lost(p_grace_s double precision, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer := 0;
    v_trace record;
BEGIN
    DELETE FROM stream_traces t
    WHERE t.request_id IN (SELECT s.request_id FROM stream_traces s
                           JOIN usage_records u ON u.request_id = s.request_id
                           ORDER BY s.request_id LIMIT p_limit FOR UPDATE OF s SKIP LOCKED);
    FOR v_trace IN
        SELECT t.request_id, t.receipt FROM stream_traces t
        LEFT JOIN reservations r ON r.id = t.lease_id
        WHERE r.status IS DISTINCT FROM 'open'
          AND coalesce(r.resolved_at, t.created_at) < now() - make_interval(secs => p_grace_s)
        ORDER BY t.created_at LIMIT p_limit FOR UPDATE OF t SKIP LOCKED
    LOOP
        DELETE FROM stream_traces WHERE request_id = v_trace.request_id;
        PERFORM tf_record_in(v_trace.receipt || jsonb_build_object(
            'status', 'failed', 'charge_nanos', 0, 'charge_usd', '0.000000000', 'price_nanos', 0,
            'cost_lines', '[]'::jsonb, 'ledger_entry_id', NULL, 'balance_after_nanos', NULL,
            'error', jsonb_build_object(
                'code', 'gateway_lost',
                'message', 'the gateway process serving this request stopped mid-stream; nothing was charged')),
            NULL);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END $$;
