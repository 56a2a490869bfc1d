-- Stripe billing, first part: each project's connection to its Stripe account, and the
-- webhook events Stripe sends, stored once by id before they are acknowledged and then
-- processed by a job.

CREATE TABLE stripe_connections (
    project_id             TEXT PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    -- 'key': a (restricted) secret key the tenant pasted; 'connect': the operator's platform
    -- key, calls made on the tenant's account with the Stripe-Account header.
    mode                   TEXT NOT NULL CHECK (mode IN ('key', 'connect')),
    account_id             TEXT,                 -- acct_…, for 'connect'
    secret_key_sealed      TEXT,                 -- for 'key', encrypted with the master key
    key_hint               TEXT,                 -- the key's prefix and last four characters
    webhook_secret_sealed  TEXT NOT NULL,        -- whsec_…, encrypted
    livemode               BOOLEAN NOT NULL,
    last_check_at          BIGINT,
    last_check_error       TEXT,
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL
);

CREATE TABLE stripe_events (
    id             TEXT PRIMARY KEY,             -- Stripe's evt_… id: a repeated delivery is stored once
    project_id     TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    type           TEXT NOT NULL,
    livemode       BOOLEAN NOT NULL,
    created        BIGINT NOT NULL,              -- Stripe's creation time (Unix seconds)
    payload        TEXT NOT NULL,
    received_at    BIGINT NOT NULL,
    processed_at   BIGINT,
    attempts       BIGINT NOT NULL DEFAULT 0,
    last_error     TEXT
);
CREATE INDEX stripe_events_unprocessed ON stripe_events (processed_at, received_at);
CREATE INDEX stripe_events_project_time ON stripe_events (project_id, received_at);
