-- Payment collection (issue 21): how the subscriptions provisioning makes collect payment.
-- 'send_invoice': Stripe emails each invoice, due after days_until_due, with its hosted
-- payment page; 'charge_automatically': Stripe charges the customer's default payment method
-- (collected through a Checkout setup session or the customer portal). A project without a
-- row sends invoices, due in 30 days.
CREATE TABLE payment_collection (
    project_id        TEXT PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    collection_method TEXT NOT NULL CHECK (collection_method IN ('send_invoice', 'charge_automatically')),
    days_until_due    BIGINT NOT NULL DEFAULT 30,
    updated_at        BIGINT NOT NULL
);
