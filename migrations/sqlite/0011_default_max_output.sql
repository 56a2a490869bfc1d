-- A project's default max output: the output limit a call that names none is reserved for
-- and forwarded with. NULL means the model's own limit, which is how every call without a
-- limit was treated before, so existing projects keep NULL: their calls are neither cut
-- shorter nor reserved differently by an upgrade. New projects get the code's default
-- (`projects::DEFAULT_MAX_OUTPUT_TOKENS`).
ALTER TABLE projects ADD COLUMN default_max_output_tokens BIGINT
    CHECK (default_max_output_tokens IS NULL OR default_max_output_tokens >= 1);
