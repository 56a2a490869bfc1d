-- Whether the budget shrank the call's max output (the `clamp` policy lowered it to what the
-- customer's remaining budget paid for): shown as a badge in the dashboard's calls tables, so
-- a short answer can be told from a model's own choice. Calls recorded before: not clamped.
ALTER TABLE usage_events ADD COLUMN clamped INTEGER NOT NULL DEFAULT 0;
