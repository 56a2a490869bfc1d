-- Budgets may also run in rolling 30-day windows counted from when they were set.
ALTER TABLE customers DROP CONSTRAINT customers_budget_period_check,
    ADD CONSTRAINT customers_budget_period_check CHECK (budget_period IN ('month', 'day', 'rolling', 'lifetime'));
ALTER TABLE projects DROP CONSTRAINT projects_default_budget_period_check,
    ADD CONSTRAINT projects_default_budget_period_check
        CHECK (default_budget_period IN ('month', 'day', 'rolling', 'lifetime'));
