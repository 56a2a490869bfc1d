-- Meter errors Stripe finds after accepting a meter event reach Tollgate only as the v2 thin
-- event `v1.billing.meter.error_report_triggered`, sent to an event destination with a signing
-- secret of its own (issue 21). The destination's secret, sealed like the webhook secret.
ALTER TABLE stripe_connections ADD COLUMN event_secret_sealed TEXT;

-- A thin event carries no data: a job fetches the full event (`GET /v2/core/events/{id}`, on the
-- account named in `context` for Connect) and processes it, retrying with backoff.
ALTER TABLE stripe_events ADD COLUMN thin BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE stripe_events ADD COLUMN context TEXT;
ALTER TABLE stripe_events ADD COLUMN next_attempt_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX stripe_events_thin_pending ON stripe_events (thin, processed_at, next_attempt_at);

-- A batch Stripe accepted and later reported as failed: back to `failed`, with Stripe's code
-- (its message goes in `last_error`) and the report that named it.
ALTER TABLE meter_batches ADD COLUMN stripe_error_code TEXT;
ALTER TABLE meter_batches ADD COLUMN reported_failed_at BIGINT;
ALTER TABLE meter_batches ADD COLUMN reported_by_event TEXT;
-- Stripe keeps an accepted identifier even when the event fails validation later, so a batch
-- sent again after such a report goes with an identifier of its own (NULL: the batch id).
ALTER TABLE meter_batches ADD COLUMN meter_identifier TEXT;

-- Each report as Stripe sent it: Stripe samples the failed requests, so a report may count
-- errors Tollgate cannot tie to a batch; the report itself is shown, never dropped.
CREATE TABLE meter_error_reports (
    project_id        TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    event_id          TEXT NOT NULL,            -- evt_… of the thin event
    meter_id          TEXT,
    summary           TEXT NOT NULL,            -- Stripe's developer_message_summary
    error_count       BIGINT NOT NULL,
    codes             TEXT NOT NULL,            -- "meter_event_customer_not_found ×3, …"
    validation_start  BIGINT,                   -- the window the report covers (Unix seconds)
    validation_end    BIGINT,
    batches_failed    BIGINT NOT NULL,          -- batches identified from the samples
    created_at        BIGINT NOT NULL,          -- Stripe's event time (Unix ms)
    PRIMARY KEY (project_id, event_id)
);
CREATE INDEX meter_error_reports_time ON meter_error_reports (project_id, created_at);
