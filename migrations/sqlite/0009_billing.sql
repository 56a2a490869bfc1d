-- Stripe billing, second part: what provisioning made on the tenant's Stripe account (a meter,
-- a product, a metered price; a Stripe customer and a subscription per end-customer), the
-- outbox of meter events (each batch of settled usage is one meter event whose identifier is
-- the batch id, fixed before the first attempt), and the reconciliation against Stripe's meter
-- event summaries.

ALTER TABLE stripe_connections ADD COLUMN meter_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN meter_event_name TEXT;
ALTER TABLE stripe_connections ADD COLUMN product_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN price_id TEXT;
ALTER TABLE stripe_connections ADD COLUMN provision_error TEXT;
ALTER TABLE stripe_connections ADD COLUMN provision_attempts BIGINT NOT NULL DEFAULT 0;
-- When provisioning may run next (a lease while it runs, a backoff after a failure).
ALTER TABLE stripe_connections ADD COLUMN provision_next_at BIGINT NOT NULL DEFAULT 0;
-- The last meter error report Stripe sent (events it accepted, then could not count).
ALTER TABLE stripe_connections ADD COLUMN meter_error TEXT;
ALTER TABLE stripe_connections ADD COLUMN meter_error_at BIGINT;
-- A Connect account is billed by one project (its events are routed by account).
CREATE UNIQUE INDEX stripe_connections_account ON stripe_connections (account_id) WHERE mode = 'connect';

ALTER TABLE customers ADD COLUMN stripe_subscription_id TEXT;
ALTER TABLE customers ADD COLUMN stripe_subscription_status TEXT;
ALTER TABLE customers ADD COLUMN stripe_subscription_state_at BIGINT;
ALTER TABLE customers ADD COLUMN stripe_provision_error TEXT;
ALTER TABLE customers ADD COLUMN stripe_provision_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE customers ADD COLUMN stripe_provision_next_at BIGINT NOT NULL DEFAULT 0;

CREATE TABLE meter_batches (
    id                  TEXT PRIMARY KEY,        -- mtb_…: the meter event's identifier and Idempotency-Key
    project_id          TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    customer_id         TEXT REFERENCES customers (id) ON DELETE SET NULL,
    stripe_customer_id  TEXT NOT NULL,
    event_name          TEXT NOT NULL,
    value_nanos         BIGINT NOT NULL,         -- the billed total of its usage events
    events              BIGINT NOT NULL,
    first_at            BIGINT NOT NULL,         -- its usage events' times (Unix ms)
    last_at             BIGINT NOT NULL,         -- the meter event's timestamp
    status              TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts            BIGINT NOT NULL DEFAULT 0,
    next_attempt_at     BIGINT NOT NULL,
    claimed_until       BIGINT NOT NULL DEFAULT 0,
    last_error          TEXT,
    created_at          BIGINT NOT NULL,
    delivered_at        BIGINT
);
CREATE INDEX meter_batches_due ON meter_batches (status, next_attempt_at);
CREATE INDEX meter_batches_project ON meter_batches (project_id, status, created_at);
CREATE INDEX meter_batches_customer ON meter_batches (customer_id, last_at);

ALTER TABLE usage_events ADD COLUMN meter_batch_id TEXT;
-- The outbox: settled, billable usage not yet in a batch.
CREATE INDEX usage_events_unbatched ON usage_events (project_id, customer_id, created_at)
    WHERE meter_batch_id IS NULL AND status = 'settled' AND billed_nanos > 0;
CREATE INDEX usage_events_batch ON usage_events (meter_batch_id) WHERE meter_batch_id IS NOT NULL;

-- Per customer and calendar month (UTC): what Tollgate delivered against what Stripe's meter
-- event summaries count, as of the last check.
CREATE TABLE billing_reconciliations (
    customer_id        TEXT NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    period_start       BIGINT NOT NULL,          -- Unix ms
    project_id         TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    checked_through    BIGINT NOT NULL,          -- the summary's end (Unix ms, a whole minute)
    delivered_nanos    BIGINT NOT NULL,
    stripe_nanos       BIGINT,
    pending_nanos      BIGINT NOT NULL,
    drift_nanos        BIGINT,                   -- Stripe's count minus Tollgate's delivered total
    error              TEXT,
    checked_at         BIGINT NOT NULL,
    PRIMARY KEY (customer_id, period_start)
);
CREATE INDEX billing_reconciliations_project ON billing_reconciliations (project_id, period_start);
