-- The admission rule's one relaxation: a call whose cost Tollgate cannot bound from the
-- request (a document by URL, a file by id, a hosted tool, a field it does not know) is
-- refused unless its project sets a per-call ceiling, in nanos of the project's currency
-- (billed, markup included). NULL: such calls are refused. The ceiling is reserved in full,
-- and what the provider bills is charged even beyond it.

ALTER TABLE projects ADD COLUMN unbounded_call_ceiling_nanos BIGINT;
