-- Every delivered call lands on an invoice (issue 21). Stripe invoices a meter's usage only
-- inside a subscription's periods, and an ended period only until its invoice is finalized.
-- When the customer's subscription began (Stripe's `start_date`, Unix seconds): usage from
-- before it is stamped at the start, so the first invoice carries it.
ALTER TABLE customers ADD COLUMN stripe_subscription_started_at BIGINT;
-- The timestamp a batch's meter event carries (Unix seconds), set when it is first claimed
-- and kept while it is inside the late-usage window (TOLLGATE_STRIPE_LATE_USAGE_SECONDS): its
-- usage time, but never before the subscription began, nor older than that window.
ALTER TABLE meter_batches ADD COLUMN meter_timestamp BIGINT;

-- Invoice reconciliation: a finalized invoice's metered line (Tollgate's price) against what
-- Tollgate delivered for that customer with a timestamp inside the invoice's period. Stripe
-- rounds each line half up once; the quantity must match exactly.
ALTER TABLE stripe_invoices ADD COLUMN period_start BIGINT;
ALTER TABLE stripe_invoices ADD COLUMN period_end BIGINT;
ALTER TABLE stripe_invoices ADD COLUMN metered_quantity BIGINT;
ALTER TABLE stripe_invoices ADD COLUMN metered_amount BIGINT;
ALTER TABLE stripe_invoices ADD COLUMN expected_quantity BIGINT;
ALTER TABLE stripe_invoices ADD COLUMN expected_amount BIGINT;
