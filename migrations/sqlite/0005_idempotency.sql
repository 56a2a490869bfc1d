-- Idempotency-Key on the management API's POSTs: the first answer to a key is kept (for a
-- day) and replayed to retries of the same request.
CREATE TABLE idempotency_keys (
    project_id     TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    idem_key       TEXT NOT NULL,
    request_hash   TEXT NOT NULL,           -- SHA-256 of method, path and body
    status_code    BIGINT,                  -- NULL while the first request is in progress
    content_type   TEXT,
    response_body  TEXT,
    created_at     BIGINT NOT NULL,
    PRIMARY KEY (project_id, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
