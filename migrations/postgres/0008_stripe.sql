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
    -- Block a customer's proxy access while an invoice of theirs has a failed payment.
    block_on_payment_failure  BOOLEAN NOT NULL DEFAULT TRUE,
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

-- The Stripe customer that bills each end-customer (made by provisioning, or given by the tenant).
ALTER TABLE customers ADD COLUMN stripe_customer_id TEXT;
-- Set when billing blocked the customer (a failed payment), so that payment lifts only that
-- block and never one a person set.
ALTER TABLE customers ADD COLUMN billing_hold BOOLEAN NOT NULL DEFAULT FALSE;
CREATE UNIQUE INDEX customers_stripe_customer ON customers (project_id, stripe_customer_id);

-- Invoices as the latest snapshot Stripe sent. Events may repeat and arrive out of order: a
-- snapshot replaces the stored one only if its status is further along (draft < open <
-- uncollectible < paid = void) or, at the same stage, newer.
CREATE TABLE stripe_invoices (
    id                  TEXT PRIMARY KEY,      -- in_…
    project_id          TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    stripe_customer_id  TEXT NOT NULL,
    customer_id         TEXT REFERENCES customers (id) ON DELETE SET NULL,
    number              TEXT,
    status              TEXT NOT NULL,
    status_rank         BIGINT NOT NULL,
    payment_failed      BOOLEAN NOT NULL,      -- the last payment attempt failed and it is unpaid
    currency            TEXT NOT NULL,
    amount_due          BIGINT NOT NULL,       -- in the currency's smallest unit, as Stripe counts
    amount_paid         BIGINT NOT NULL,
    hosted_invoice_url  TEXT,
    state_at            BIGINT NOT NULL,       -- the event time (Unix seconds) of the snapshot held
    updated_at          BIGINT NOT NULL
);
CREATE INDEX stripe_invoices_project ON stripe_invoices (project_id, state_at);
CREATE INDEX stripe_invoices_customer ON stripe_invoices (customer_id);
