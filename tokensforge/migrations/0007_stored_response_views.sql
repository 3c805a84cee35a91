-- Responses storage (SPEC §2: GET / DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items).
-- Beside the canonical history a previous_response_id follow-up needs (0002), a stored response keeps:
--   response              the Response object exactly as the client received it (unary body, or the
--                         `response` of a stream's terminal event), receipt included. `json`, not jsonb:
--                         json keeps the text verbatim (key order too) and is served without re-encoding.
--                         NULL for rows stored before this migration: they serve follow-ups only.
--   upstream_response_id  the upstream's own id when the turn was forwarded natively to a channel that
--   channel_id            speaks the Responses API, so a follow-up on the same channel can chain there.
-- Deleting a stored response deletes these rows only: usage records, receipts and ledger entries live in
-- their own append-only tables and are never touched.
ALTER TABLE stored_responses
    ADD COLUMN response             json,
    ADD COLUMN upstream_response_id text,
    ADD COLUMN channel_id           text;

-- The client's input items of one response, in the order sent, each with an id (its own, or one the
-- gateway gave it). Pages are read by seq (never OFFSET); a cursor is an item id, unique per response.
CREATE TABLE stored_response_items (
    response_id text    NOT NULL REFERENCES stored_responses (id) ON DELETE CASCADE,
    seq         integer NOT NULL CHECK (seq >= 0),
    item_id     text    NOT NULL,
    item        json    NOT NULL,
    PRIMARY KEY (response_id, seq),
    UNIQUE (response_id, item_id)
);
