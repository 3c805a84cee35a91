-- Research reports (SPEC §7) are kept: the report row is written when a run starts
-- (status 'running') and updated as each section completes, so a run whose client
-- leaves is still stored ('interrupted') with what it cost so far. Money never moves
-- here: each section is its own request with its usage record and ledger entry; a
-- section row holds a copy of that receipt, and the report's total is the sum of
-- its sections' charges (research_store.finish recomputes it from usage_records).

CREATE TABLE research_reports (
    seq                   bigserial UNIQUE,     -- list order and cursor
    id                    text PRIMARY KEY,
    account_id            text NOT NULL REFERENCES accounts (id),
    project_id            text,
    key_id                text,
    request_id            text NOT NULL,        -- the POST's request id; section n is request "<id>_s<n>"
    topic                 text NOT NULL,
    model                 text NOT NULL,
    route_id              text NOT NULL,
    route_kind            text NOT NULL,
    bucket                text NOT NULL,
    status                text NOT NULL DEFAULT 'running'
                          CHECK (status IN ('running', 'completed', 'stopped_at_cap', 'failed', 'interrupted')),
    context               text,                 -- the user's own notes, given to every section
    outline               jsonb NOT NULL,       -- the section titles planned
    max_charge_nanos      bigint NOT NULL CHECK (max_charge_nanos > 0),
    total_charge_nanos    bigint NOT NULL DEFAULT 0 CHECK (total_charge_nanos >= 0),
    balance_before_nanos  bigint,
    balance_after_nanos   bigint,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX research_reports_by_account ON research_reports (account_id, seq DESC);

CREATE TABLE research_sections (
    report_id     text NOT NULL REFERENCES research_reports (id),
    position      integer NOT NULL CHECK (position >= 0),
    title         text NOT NULL,
    request_id    text NOT NULL UNIQUE,
    content       text,                         -- null: the section failed or its answer was lost
    charge_nanos  bigint NOT NULL DEFAULT 0 CHECK (charge_nanos >= 0),
    receipt       jsonb,                        -- the section request's receipt, as the client saw it
    error         jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (report_id, position)
);
