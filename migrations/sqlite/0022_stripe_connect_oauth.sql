-- Stripe Connect onboarding through Stripe's OAuth: each `state` handed to Stripe has a nonce
-- stored here until its callback consumes it (once), so a state cannot be replayed.
CREATE TABLE stripe_connect_states (
    nonce       TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX stripe_connect_states_expiry ON stripe_connect_states (expires_at);

-- What "Test connection" found when it passed: the account and mode reached, the calls allowed.
ALTER TABLE stripe_connections ADD COLUMN last_check_detail TEXT;
