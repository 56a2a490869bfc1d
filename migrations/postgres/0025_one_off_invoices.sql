-- Usage Stripe would invoice nowhere (the customer's subscription ended, or the customer was
-- deleted in Stripe) is shown to the tenant; at its request it goes on a one-off invoice: an
-- invoice item of its amount and an invoice for it. Its usage events name the one-off in
-- `meter_batch_id` (so no meter event ever carries them), and the one-off row is the outbox
-- entry the jobs send, once, by idempotency keys derived from its id.
CREATE TABLE one_off_invoices (
    id                      TEXT PRIMARY KEY,        -- ooi_…
    project_id              TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    customer_id             TEXT REFERENCES customers (id) ON DELETE SET NULL,
    stripe_customer_id      TEXT NOT NULL,
    currency                TEXT NOT NULL,
    nanos                   BIGINT NOT NULL,         -- the billed total of its usage events
    amount_minor            BIGINT NOT NULL,         -- what the invoice item charges (half up)
    events                  BIGINT NOT NULL,
    first_at                BIGINT NOT NULL,
    last_at                 BIGINT NOT NULL,
    status                  TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    attempts                BIGINT NOT NULL DEFAULT 0,
    next_attempt_at         BIGINT NOT NULL,
    claimed_until           BIGINT NOT NULL DEFAULT 0,
    last_error              TEXT,
    stripe_invoice_item_id  TEXT,
    stripe_invoice_id       TEXT,
    requested_by            TEXT NOT NULL,
    created_at              BIGINT NOT NULL,
    sent_at                 BIGINT
);
CREATE INDEX one_off_invoices_due ON one_off_invoices (status, next_attempt_at);
CREATE INDEX one_off_invoices_project ON one_off_invoices (project_id, created_at);

-- Set when Stripe says the customer was deleted (`customer.deleted`): nothing more can be
-- invoiced to it; the tenant can have a new Stripe customer made.
ALTER TABLE customers ADD COLUMN stripe_customer_deleted_at BIGINT;
-- How many times a new Stripe customer replaced a deleted one: part of the idempotency keys
-- that make the customer and its subscription, so a replacement is not answered with the
-- deleted customer's replayed creation.
ALTER TABLE customers ADD COLUMN stripe_customer_generation BIGINT NOT NULL DEFAULT 0;
