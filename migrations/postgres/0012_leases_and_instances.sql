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
-- reserved; billed like a settled call when the project says so.
ALTER TABLE usage_events DROP CONSTRAINT usage_events_status_check;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_status_check
    CHECK (status IN ('settled', 'refused', 'failed', 'interrupted'));
DROP INDEX usage_events_unbatched;
CREATE INDEX usage_events_unbatched ON usage_events (project_id, customer_id, created_at)
    WHERE meter_batch_id IS NULL AND status IN ('settled', 'interrupted') AND billed_nanos > 0;
