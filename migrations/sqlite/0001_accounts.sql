-- Tenants, the people who log in, and who belongs where.
-- Ids are prefixed UUIDv7 text; times are integer milliseconds since the Unix epoch.

CREATE TABLE organizations (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    email          TEXT NOT NULL,          -- trimmed and lower-cased
    password_hash  TEXT NOT NULL,          -- argon2id PHC string
    created_at     BIGINT NOT NULL
);
CREATE UNIQUE INDEX users_email_key ON users (email);

CREATE TABLE memberships (
    org_id      TEXT NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'viewer')),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

-- Each worker process records that it is alive; /metrics shows the age of the newest beat.
CREATE TABLE worker_heartbeats (
    worker    TEXT PRIMARY KEY,
    beat_at   BIGINT NOT NULL
);
