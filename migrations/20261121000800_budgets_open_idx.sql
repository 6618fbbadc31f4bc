-- migrate:up

-- The reservation sweeper looks only at budgets that hold open reservations.
CREATE INDEX budgets_open_idx ON budgets (budget_id) WHERE open_reservations > 0;

-- migrate:down
DROP INDEX budgets_open_idx;
