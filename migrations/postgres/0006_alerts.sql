-- Budget alerts: what each project wants to hear about and where, the alerts fired (at most
-- one per customer, budget period and kind), and their deliveries (webhook, email), which the
-- dashboard lists as the delivery log.

CREATE TABLE alert_settings (
    project_id             TEXT PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    -- Percentages of a customer's budget, ascending, comma-separated ("50,80,100"); empty for none.
    thresholds             TEXT NOT NULL DEFAULT '50,80,100',
    -- Also alert when a call is refused for want of budget.
    on_refused             BOOLEAN NOT NULL DEFAULT TRUE,
    webhook_url            TEXT,
    -- The signing secret of the webhook, encrypted with the master key.
    webhook_secret_sealed  TEXT NOT NULL,
    -- Comma-separated addresses mailed (through SMTP) when an alert fires.
    email_to               TEXT,
    updated_at             BIGINT NOT NULL
);

CREATE TABLE alerts (
    id              TEXT PRIMARY KEY,
    project_id      TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    customer_id     TEXT NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    kind            TEXT NOT NULL CHECK (kind IN ('threshold', 'refused')),
    threshold_pct   BIGINT NOT NULL,        -- 0 for 'refused'
    period_start    BIGINT NOT NULL,        -- the budget period the alert belongs to
    period_end      BIGINT NOT NULL,
    budget_nanos    BIGINT NOT NULL,        -- the customer's state when it fired
    spent_nanos     BIGINT NOT NULL,
    created_at      BIGINT NOT NULL
);
-- Once per customer, period and kind, however many replicas scan at once.
CREATE UNIQUE INDEX alerts_once ON alerts (customer_id, period_start, kind, threshold_pct);
CREATE INDEX alerts_project_time ON alerts (project_id, created_at);

CREATE TABLE alert_deliveries (
    id               TEXT PRIMARY KEY,
    alert_id         TEXT NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    project_id       TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    channel          TEXT NOT NULL CHECK (channel IN ('webhook', 'email')),
    target           TEXT NOT NULL,          -- the URL or the address
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    last_status      BIGINT,                 -- the receiver's HTTP status on the last attempt
    last_error       TEXT,
    next_attempt_at  BIGINT,
    delivered_at     BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX alert_deliveries_project_time ON alert_deliveries (project_id, created_at);
CREATE INDEX alert_deliveries_pending ON alert_deliveries (status, next_attempt_at);

-- Where periodic scanners got to (the alert scanner reads usage events after its position).
CREATE TABLE scan_positions (
    name      TEXT PRIMARY KEY,
    position  BIGINT NOT NULL
);
