-- Accounts whose email address is confirmed, sessions that belong to a user (so a password
-- change or reset can end the others), and throttling that decides in the statement that counts.

-- When the account's owner proved they read its mail (a confirmation link, a reset link, an
-- invitation link); null: not yet, and the account may not join or invite anyone. Accounts
-- made before this migration count as confirmed.
ALTER TABLE users ADD COLUMN verified_at BIGINT;
UPDATE users SET verified_at = created_at;

-- One-time links that confirm an account's email address; the token is stored hashed.
CREATE TABLE email_verifications (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX email_verifications_user ON email_verifications (user_id);

-- The logged-in user of a session (null: nobody), copied from its data by the session store.
ALTER TABLE sessions ADD COLUMN user_id TEXT;
UPDATE sessions SET user_id = data::jsonb ->> 'user_id';
CREATE INDEX sessions_user ON sessions (user_id) WHERE user_id IS NOT NULL;

-- login_failures now counts attempts of every throttled kind (logins per address and email,
-- reset requests, sign-ups). A key with a backoff (an email's logins) also keeps when its next
-- attempt may come and the delay that set it.
ALTER TABLE login_failures ADD COLUMN next_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE login_failures ADD COLUMN delay_ms BIGINT NOT NULL DEFAULT 0;
