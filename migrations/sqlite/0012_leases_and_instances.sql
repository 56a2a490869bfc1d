-- no-transaction
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

-- Leases that give back what they do not use, and reservations that belong to the process
-- instance that made them, so a crashed instance's holds are released within a minute.

-- A lease's row holds, besides its calls' shares, budget for calls not made yet (its spare)
-- until this time (Unix ms); null once given back, and for every other reservation. A call
-- refused elsewhere waits for these to be given back, then tries again.
ALTER TABLE reservations ADD COLUMN spare_until BIGINT;
-- The process instance whose calls the reservation holds budget for (null: made outside the
-- proxy, released only by expiry).
ALTER TABLE reservations ADD COLUMN instance_id TEXT;
-- The call it holds for (a lease: its first call), to record it should its instance die.
ALTER TABLE reservations ADD COLUMN endpoint TEXT;
ALTER TABLE reservations ADD COLUMN model TEXT;
CREATE INDEX reservations_instance ON reservations (instance_id) WHERE instance_id IS NOT NULL;

-- Every serving process beats here every few seconds; one whose beat has stopped is dead,
-- and its reservations are released (and their calls recorded as interrupted) by whichever
-- instance sees it first.
CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    -- Stable across restarts where it can be (host and listening address): an instance that
    -- starts again under the same name releases what its previous life held at once.
    name        TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    beat_at     BIGINT NOT NULL
);
CREATE INDEX instances_beat ON instances (beat_at);

-- Whether a call interrupted by its instance's death is billed at what it had reserved (the
-- provider may well have served it) or not billed (the default: the customer got no answer).
ALTER TABLE projects ADD COLUMN bill_interrupted BOOLEAN NOT NULL DEFAULT FALSE;

-- A call whose instance died with it in flight is recorded as `interrupted`, with what it had
-- reserved; billed like a settled call when the project says so. SQLite cannot change a CHECK
-- constraint: the table is rebuilt by SQLite's documented procedure (foreign keys off, so
-- that dropping the old table neither cascades nor fails: see the top of this file).
CREATE TABLE usage_events_new (
    id                   TEXT PRIMARY KEY,
    project_id           TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    customer_id          TEXT REFERENCES customers (id) ON DELETE SET NULL,
    request_id           TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    model                TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('settled', 'refused', 'failed', 'interrupted')),
    reason               TEXT,                   -- why refused, failed or interrupted
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
    created_at           BIGINT NOT NULL,
    meter_batch_id       TEXT
);
INSERT INTO usage_events_new (id, project_id, customer_id, request_id, endpoint, model, status, reason,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, reserved_nanos,
    cost_nanos, billed_nanos, usage_source, latency_ms, created_at, meter_batch_id)
SELECT id, project_id, customer_id, request_id, endpoint, model, status, reason,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, reserved_nanos,
    cost_nanos, billed_nanos, usage_source, latency_ms, created_at, meter_batch_id
FROM usage_events;
DROP TABLE usage_events;
ALTER TABLE usage_events_new RENAME TO usage_events;
CREATE INDEX usage_events_customer_time ON usage_events (customer_id, created_at);
CREATE INDEX usage_events_project_time ON usage_events (project_id, created_at);
CREATE INDEX usage_events_unbatched ON usage_events (project_id, customer_id, created_at)
    WHERE meter_batch_id IS NULL AND status IN ('settled', 'interrupted') AND billed_nanos > 0;
CREATE INDEX usage_events_batch ON usage_events (meter_batch_id) WHERE meter_batch_id IS NOT NULL;

COMMIT;
PRAGMA foreign_keys = ON;
