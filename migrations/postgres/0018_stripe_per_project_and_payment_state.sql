-- Stripe's ids (evt_…, in_…) name objects of one Stripe account, and a tenant controls what
-- its webhook endpoint receives: keyed globally, one project could store an id first and so
-- make another project's genuine event a "repeat" (never processed) or its invoice never
-- recorded. Each is now unique within its project only.
ALTER TABLE stripe_events DROP CONSTRAINT stripe_events_pkey;
ALTER TABLE stripe_events ADD PRIMARY KEY (project_id, id);
DROP INDEX stripe_events_project_time;
CREATE INDEX stripe_events_project_time ON stripe_events (project_id, received_at);

ALTER TABLE stripe_invoices DROP CONSTRAINT stripe_invoices_pkey;
ALTER TABLE stripe_invoices ADD PRIMARY KEY (project_id, id);

-- The payment state is read from the invoice itself (issue 21), not from the event that
-- carried it: how many attempts Stripe made, and when it tries next. A snapshot with fewer
-- attempts never replaces one with more, whatever the order events arrive in.
ALTER TABLE stripe_invoices ADD COLUMN attempt_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE stripe_invoices ADD COLUMN next_payment_attempt BIGINT;
