-- A project bills in its own currency (chosen when it is made); Tollgate's shipped prices are
-- in USD and apply outside USD only at the project's rate: nano-units of its currency per USD.
ALTER TABLE projects ADD COLUMN usd_rate_nanos BIGINT;
