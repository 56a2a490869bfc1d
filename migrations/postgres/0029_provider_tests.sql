-- The last test of a provider connection (the dashboard's Test button: a models call with its
-- credential): when, whether it succeeded, and what it found (the number of models, or the
-- provider's status and message, never the credential). The first-run checklist reads it.
ALTER TABLE provider_connections ADD COLUMN last_test_at BIGINT;
ALTER TABLE provider_connections ADD COLUMN last_test_ok BOOLEAN;
ALTER TABLE provider_connections ADD COLUMN last_test_detail TEXT;
