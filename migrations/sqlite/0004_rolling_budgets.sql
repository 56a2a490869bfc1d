-- no-transaction
-- Budgets may also run in rolling 30-day windows counted from when they were set.
-- SQLite cannot change a CHECK constraint in place: the two tables are rebuilt, following
-- SQLite's documented procedure (foreign keys off, so that dropping the old table neither
-- cascades to reservations and usage nor rewrites their references).
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

CREATE TABLE projects_new (
    id                    TEXT PRIMARY KEY,
    org_id                TEXT NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name                  TEXT NOT NULL,
    currency              TEXT NOT NULL DEFAULT 'usd',
    budget_policy         TEXT NOT NULL DEFAULT 'clamp' CHECK (budget_policy IN ('clamp', 'reject')),
    min_output_tokens     BIGINT NOT NULL DEFAULT 16,
    markup_bps            BIGINT NOT NULL DEFAULT 0 CHECK (markup_bps >= 0),
    default_budget_nanos  BIGINT NOT NULL DEFAULT 0 CHECK (default_budget_nanos >= 0),
    default_budget_period TEXT NOT NULL DEFAULT 'month'
                          CHECK (default_budget_period IN ('month', 'day', 'rolling', 'lifetime')),
    customer_from_user    INTEGER NOT NULL DEFAULT 0,
    default_customer      TEXT,
    estimate_margin_bps   BIGINT NOT NULL DEFAULT 2000 CHECK (estimate_margin_bps >= 0),
    created_at            BIGINT NOT NULL
);
INSERT INTO projects_new (id, org_id, name, currency, budget_policy, min_output_tokens, markup_bps,
    default_budget_nanos, default_budget_period, customer_from_user, default_customer, estimate_margin_bps, created_at)
SELECT id, org_id, name, currency, budget_policy, min_output_tokens, markup_bps,
    default_budget_nanos, default_budget_period, customer_from_user, default_customer, estimate_margin_bps, created_at
FROM projects;
DROP TABLE projects;
ALTER TABLE projects_new RENAME TO projects;
CREATE INDEX projects_org ON projects (org_id);

CREATE TABLE customers_new (
    id              TEXT PRIMARY KEY,
    project_id      TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    external_id     TEXT NOT NULL,
    name            TEXT,
    email           TEXT,
    budget_nanos    BIGINT NOT NULL CHECK (budget_nanos >= 0),
    budget_period   TEXT NOT NULL CHECK (budget_period IN ('month', 'day', 'rolling', 'lifetime')),
    period_start    BIGINT NOT NULL,
    period_end      BIGINT NOT NULL,
    spent_nanos     BIGINT NOT NULL DEFAULT 0,
    reserved_nanos  BIGINT NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    blocked         INTEGER NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL
);
INSERT INTO customers_new (id, project_id, external_id, name, email, budget_nanos, budget_period, period_start,
    period_end, spent_nanos, reserved_nanos, blocked, created_at)
SELECT id, project_id, external_id, name, email, budget_nanos, budget_period, period_start,
    period_end, spent_nanos, reserved_nanos, blocked, created_at
FROM customers;
DROP TABLE customers;
ALTER TABLE customers_new RENAME TO customers;
CREATE UNIQUE INDEX customers_project_external ON customers (project_id, external_id);

COMMIT;
PRAGMA foreign_keys = ON;
