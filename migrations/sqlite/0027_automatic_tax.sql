-- Stripe Tax, a project setting: subscriptions and one-off invoices are made with
-- `automatic_tax[enabled]=true`, and the payment-method setup link asks for the billing address
-- (the customer's tax location).
ALTER TABLE payment_collection ADD COLUMN automatic_tax BOOLEAN NOT NULL DEFAULT FALSE;
