-- A card an end-customer saved through a payment-method setup link (Checkout in setup mode) is
-- attached to its Stripe customer but is not the default for invoices, which charging
-- automatically uses. Each completed setup session Stripe reports (`checkout.session.completed`)
-- is recorded here; the jobs read its SetupIntent's payment method and make it the customer's
-- default (`invoice_settings[default_payment_method]`), once.
CREATE TABLE saved_payment_methods (
    project_id          TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    checkout_session    TEXT NOT NULL,
    stripe_customer_id  TEXT NOT NULL,
    setup_intent        TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    attempts            BIGINT NOT NULL DEFAULT 0,
    next_attempt_at     BIGINT NOT NULL,
    last_error          TEXT,
    payment_method      TEXT,
    created_at          BIGINT NOT NULL,
    PRIMARY KEY (project_id, checkout_session)
);
CREATE INDEX saved_payment_methods_due ON saved_payment_methods (status, next_attempt_at);
