-- Customers deleted in the last day, so that a customer token issued before the deletion
-- (held by that customer's browser or app, valid up to a day) cannot create the customer
-- again with the project's default budget. Housekeeping forgets a deletion after a day.
CREATE TABLE deleted_customers (
    project_id   TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    external_id  TEXT NOT NULL,
    deleted_at   BIGINT NOT NULL,
    PRIMARY KEY (project_id, external_id)
);
CREATE INDEX deleted_customers_time ON deleted_customers (deleted_at);
