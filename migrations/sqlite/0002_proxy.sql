-- The hot path's tables: projects and their keys, providers and prices, end-customers with
-- their budgets, open reservations, and the usage ledger every other part reads.
-- Money is integer nano-units of the project's currency; times are Unix milliseconds.

CREATE TABLE projects (
    id                    TEXT PRIMARY KEY,
    org_id                TEXT NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name                  TEXT NOT NULL,
    currency              TEXT NOT NULL DEFAULT 'usd',
    -- What happens when a call's worst case does not fit: shrink its max output, or refuse it.
    budget_policy         TEXT NOT NULL DEFAULT 'clamp' CHECK (budget_policy IN ('clamp', 'reject')),
    -- Clamp never below this many output tokens; below it the call is refused.
    min_output_tokens     BIGINT NOT NULL DEFAULT 16,
    -- Billed = provider cost × (10000 + markup_bps) / 10000.
    markup_bps            BIGINT NOT NULL DEFAULT 0 CHECK (markup_bps >= 0),
    default_budget_nanos  BIGINT NOT NULL DEFAULT 0 CHECK (default_budget_nanos >= 0),
    default_budget_period TEXT NOT NULL DEFAULT 'month' CHECK (default_budget_period IN ('month', 'day', 'lifetime')),
    -- Also take the customer from OpenAI's `user` field when the header is absent.
    customer_from_user    INTEGER NOT NULL DEFAULT 0,
    -- The customer a call without one is charged to; NULL refuses such calls.
    default_customer      TEXT,
    -- Safety margin (basis points) added to input estimates for models without an exact tokenizer.
    estimate_margin_bps   BIGINT NOT NULL DEFAULT 2000 CHECK (estimate_margin_bps >= 0),
    created_at            BIGINT NOT NULL
);
CREATE INDEX projects_org ON projects (org_id);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    project_id    TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind          TEXT NOT NULL CHECK (kind IN ('secret', 'publishable')),
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL,            -- the first characters, to recognise a key in lists
    key_hash      TEXT NOT NULL,            -- SHA-256 (hex) of the whole key; the key itself is never stored
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);
CREATE UNIQUE INDEX api_keys_hash ON api_keys (key_hash);
CREATE INDEX api_keys_project ON api_keys (project_id);

CREATE TABLE provider_connections (
    id              TEXT PRIMARY KEY,
    project_id      TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind            TEXT NOT NULL CHECK (kind IN ('openai', 'anthropic', 'openai_compatible')),
    name            TEXT NOT NULL,
    base_url        TEXT NOT NULL,
    api_key_sealed  TEXT NOT NULL,          -- encrypted with the master key
    -- Comma-separated model names (or prefixes ending in '*') routed to this connection.
    models          TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX provider_connections_project ON provider_connections (project_id);

-- Per-project prices replacing (or adding to) the shipped table; nanos per million tokens.
CREATE TABLE price_overrides (
    project_id         TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    model              TEXT NOT NULL,
    input              BIGINT NOT NULL CHECK (input >= 0),
    cached_input       BIGINT NOT NULL CHECK (cached_input >= 0),
    output             BIGINT NOT NULL CHECK (output >= 0),
    cache_write        BIGINT NOT NULL CHECK (cache_write >= 0),
    max_output_tokens  BIGINT NOT NULL CHECK (max_output_tokens > 0),
    PRIMARY KEY (project_id, model)
);

CREATE TABLE customers (
    id              TEXT PRIMARY KEY,
    project_id      TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    external_id     TEXT NOT NULL,          -- the tenant's own id for this customer
    name            TEXT,
    email           TEXT,
    budget_nanos    BIGINT NOT NULL CHECK (budget_nanos >= 0),
    budget_period   TEXT NOT NULL CHECK (budget_period IN ('month', 'day', 'lifetime')),
    period_start    BIGINT NOT NULL,
    period_end      BIGINT NOT NULL,        -- exclusive; the far future for 'lifetime'
    spent_nanos     BIGINT NOT NULL DEFAULT 0,   -- settled in the current period
    reserved_nanos  BIGINT NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    blocked         INTEGER NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL
);
CREATE UNIQUE INDEX customers_project_external ON customers (project_id, external_id);

-- Open reservations: the worst case of calls in flight. Settled or released exactly once;
-- the housekeeping job releases those past expires_at (a crashed process's calls).
CREATE TABLE reservations (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    amount_nanos  BIGINT NOT NULL CHECK (amount_nanos >= 0),
    request_id    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (expires_at);
CREATE INDEX reservations_customer ON reservations (customer_id);

-- One row per call that reached a decision: settled, refused or failed.
CREATE TABLE usage_events (
    id                   TEXT PRIMARY KEY,
    project_id           TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    customer_id          TEXT REFERENCES customers (id) ON DELETE SET NULL,
    request_id           TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    model                TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('settled', 'refused', 'failed')),
    reason               TEXT,                   -- why refused or failed
    input_tokens         BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens  BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens   BIGINT NOT NULL DEFAULT 0,
    output_tokens        BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens     BIGINT NOT NULL DEFAULT 0,
    reserved_nanos       BIGINT NOT NULL DEFAULT 0,
    cost_nanos           BIGINT NOT NULL DEFAULT 0,   -- the provider's price
    billed_nanos         BIGINT NOT NULL DEFAULT 0,   -- with the project's markup
    usage_source         TEXT NOT NULL DEFAULT 'provider' CHECK (usage_source IN ('provider', 'counted', 'none')),
    latency_ms           BIGINT NOT NULL DEFAULT 0,
    created_at           BIGINT NOT NULL
);
CREATE INDEX usage_events_customer_time ON usage_events (customer_id, created_at);
CREATE INDEX usage_events_project_time ON usage_events (project_id, created_at);
