-- Stripe's ids (evt_…, in_…) name objects of one Stripe account, and a tenant controls what
-- its webhook endpoint receives: keyed globally, one project could store an id first and so
-- make another project's genuine event a "repeat" (never processed) or its invoice never
-- recorded. Each is now unique within its project only (SQLite cannot change a primary
-- key in place: the tables are rebuilt).
CREATE TABLE stripe_events_new (
    id             TEXT NOT NULL,                -- Stripe's evt_… id: a repeated delivery is stored once
    project_id     TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    type           TEXT NOT NULL,
    livemode       INTEGER NOT NULL,
    created        BIGINT NOT NULL,              -- Stripe's creation time (Unix seconds)
    payload        TEXT NOT NULL,
    received_at    BIGINT NOT NULL,
    processed_at   BIGINT,
    attempts       BIGINT NOT NULL DEFAULT 0,
    last_error     TEXT,
    PRIMARY KEY (project_id, id)
);
INSERT INTO stripe_events_new (id, project_id, type, livemode, created, payload, received_at, processed_at,
        attempts, last_error)
    SELECT id, project_id, type, livemode, created, payload, received_at, processed_at, attempts, last_error
    FROM stripe_events;
DROP TABLE stripe_events;
ALTER TABLE stripe_events_new RENAME TO stripe_events;
CREATE INDEX stripe_events_unprocessed ON stripe_events (processed_at, received_at);
CREATE INDEX stripe_events_project_time ON stripe_events (project_id, received_at);

CREATE TABLE stripe_invoices_new (
    id                  TEXT NOT NULL,         -- in_…
    project_id          TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    stripe_customer_id  TEXT NOT NULL,
    customer_id         TEXT REFERENCES customers (id) ON DELETE SET NULL,
    number              TEXT,
    status              TEXT NOT NULL,
    status_rank         BIGINT NOT NULL,
    payment_failed      INTEGER NOT NULL,      -- the last payment attempt failed and it is unpaid
    currency            TEXT NOT NULL,
    amount_due          BIGINT NOT NULL,       -- in the currency's smallest unit, as Stripe counts
    amount_paid         BIGINT NOT NULL,
    hosted_invoice_url  TEXT,
    state_at            BIGINT NOT NULL,       -- the event time (Unix seconds) of the snapshot held
    updated_at          BIGINT NOT NULL,
    PRIMARY KEY (project_id, id)
);
INSERT INTO stripe_invoices_new SELECT id, project_id, stripe_customer_id, customer_id, number, status,
        status_rank, payment_failed, currency, amount_due, amount_paid, hosted_invoice_url, state_at, updated_at
    FROM stripe_invoices;
DROP TABLE stripe_invoices;
ALTER TABLE stripe_invoices_new RENAME TO stripe_invoices;
CREATE INDEX stripe_invoices_project ON stripe_invoices (project_id, state_at);
CREATE INDEX stripe_invoices_customer ON stripe_invoices (customer_id);

-- The payment state is read from the invoice itself (issue 21), not from the event that
-- carried it: how many attempts Stripe made, and when it tries next. A snapshot with fewer
-- attempts never replaces one with more, whatever the order events arrive in.
ALTER TABLE stripe_invoices ADD COLUMN attempt_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE stripe_invoices ADD COLUMN next_payment_attempt BIGINT;
