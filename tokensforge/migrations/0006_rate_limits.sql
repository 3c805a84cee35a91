-- Shared rate budgets (rpm, tpm) for every gateway process: one row per limited scope
-- ("key:<id>", "project:<id>") holds what its current one-minute window has handed out.
-- A process takes a *rate lease* (a few request and token permits) in one call of
-- tf_rate_take, spends it in memory, and gives back what it did not use (tf_rate_give).
-- Check and update happen under the row's lock in one statement's transaction, so the
-- permits handed out in a window never sum to more than the limit, however many
-- processes ask at once. Windows are fixed and anchored at the scope's first take after
-- the previous window ended; times come from the database clock.

CREATE TABLE rate_windows (
    scope             text PRIMARY KEY,
    window_start      timestamptz NOT NULL,
    requests_granted  bigint NOT NULL DEFAULT 0 CHECK (requests_granted >= 0),
    tokens_granted    bigint NOT NULL DEFAULT 0 CHECK (tokens_granted >= 0)
);

-- Take permits for one request of p_need_tokens tokens, plus some to keep: all of the
-- request's need or nothing, then up to a grant size that shrinks as the window fills:
-- an eighth of what is left, at most a twentieth of the limit, at least the need.
-- A NULL limit is not counted (its permits come back as 0 and are not checked).
-- Returns the window's id (its start, in ms since the epoch), the ms left in it, what was
-- granted and what is left for others after this grant.
CREATE FUNCTION tf_rate_take(p_scope text, p_rpm bigint, p_tpm bigint, p_need_requests bigint,
                             p_need_tokens bigint,
                             OUT window_id bigint, OUT window_left_ms integer,
                             OUT requests bigint, OUT tokens bigint,
                             OUT requests_left bigint, OUT tokens_left bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz := clock_timestamp();
    v_row     rate_windows%ROWTYPE;
    v_left_r  bigint;
    v_left_t  bigint;
BEGIN
    INSERT INTO rate_windows AS w (scope, window_start) VALUES (p_scope, v_now)
    ON CONFLICT (scope) DO UPDATE
        SET window_start = EXCLUDED.window_start, requests_granted = 0, tokens_granted = 0
        WHERE w.window_start <= v_now - interval '1 minute'
    RETURNING * INTO v_row;
    IF v_row.scope IS NULL THEN  -- the window is still open; ON CONFLICT has locked the row
        SELECT * INTO v_row FROM rate_windows WHERE scope = p_scope FOR UPDATE;
    END IF;
    window_id := (extract(epoch FROM v_row.window_start) * 1000)::bigint;
    window_left_ms := GREATEST(0, ceil(extract(epoch FROM v_row.window_start + interval '1 minute' - v_now)
                                       * 1000))::integer;
    v_left_r := CASE WHEN p_rpm IS NULL THEN NULL ELSE GREATEST(0, p_rpm - v_row.requests_granted) END;
    v_left_t := CASE WHEN p_tpm IS NULL THEN NULL ELSE GREATEST(0, p_tpm - v_row.tokens_granted) END;
    requests := 0;
    tokens := 0;
    IF (v_left_r IS NULL OR v_left_r >= p_need_requests) AND (v_left_t IS NULL OR v_left_t >= p_need_tokens) THEN
        IF v_left_r IS NOT NULL THEN
            requests := LEAST(v_left_r, GREATEST(p_need_requests, LEAST(v_left_r / 8, p_rpm / 20)));
        END IF;
        IF v_left_t IS NOT NULL THEN
            tokens := LEAST(v_left_t, GREATEST(p_need_tokens, LEAST(v_left_t / 8, p_tpm / 20)));
        END IF;
        UPDATE rate_windows SET requests_granted = requests_granted + requests,
                                tokens_granted = tokens_granted + tokens
         WHERE scope = p_scope;
    END IF;
    requests_left := v_left_r - requests;
    tokens_left := v_left_t - tokens;
END;
$$;

-- Give back unused permits of a window (a process idle on the scope, or shutting down).
-- Permits of a window that has since ended are worth nothing and are dropped.
CREATE FUNCTION tf_rate_give(p_scopes text[], p_window_ids bigint[], p_requests bigint[], p_tokens bigint[])
RETURNS void LANGUAGE sql AS $$
    SELECT 1 FROM rate_windows WHERE scope = ANY (p_scopes) ORDER BY scope FOR UPDATE;  -- one lock order
    UPDATE rate_windows w
       SET requests_granted = GREATEST(0, w.requests_granted - g.requests),
           tokens_granted = GREATEST(0, w.tokens_granted - g.tokens)
      FROM unnest(p_scopes, p_window_ids, p_requests, p_tokens) AS g(scope, window_id, requests, tokens)
     WHERE w.scope = g.scope
       AND (extract(epoch FROM w.window_start) * 1000)::bigint = g.window_id;
$$;
