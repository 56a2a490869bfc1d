-- The calls a lease holds budget for, each recorded should its process die mid-call (a
-- lease's row names only the call that took it). Written off the hot path, only for calls
-- still in flight a quarter of a second after they started; removed once they end.
CREATE TABLE calls_in_flight (
    -- The id the call's usage event has, or will have: a call whose event exists has ended.
    event_id        TEXT PRIMARY KEY,
    instance_id     TEXT NOT NULL,
    -- The lease's row.
    reservation_id  TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    model           TEXT NOT NULL,
    -- Its share of the lease.
    amount_nanos    BIGINT NOT NULL,
    started_at      BIGINT NOT NULL
);
CREATE INDEX calls_in_flight_reservation ON calls_in_flight (reservation_id);
CREATE INDEX calls_in_flight_instance ON calls_in_flight (instance_id);
