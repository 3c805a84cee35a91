-- Responses API conversations: what a follow-up turn (previous_response_id) needs, per account,
-- kept for a retention period (OpenAI keeps stored responses 30 days by default).
CREATE TABLE stored_responses (
    id          text PRIMARY KEY,                 -- resp_<request hex>
    account_id  text NOT NULL REFERENCES accounts (id),
    history     jsonb NOT NULL,                   -- Responses input items: the turn and its output
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX stored_responses_expiry ON stored_responses (expires_at);
