-- migrate:up

-- `routing_stats`: the scores' spread (discounted sum of squares) and the change
-- detector's state per (tenant, cluster, model) (shared/domain/adaptive_routing.py:
-- a CUSUM on the feedback's standardised residuals; `resets`: changes detected).
ALTER TABLE routing_stats
    ADD COLUMN sq      double precision NOT NULL DEFAULT 0,
    ADD COLUMN cusum   double precision NOT NULL DEFAULT 0,
    ADD COLUMN run_n   int              NOT NULL DEFAULT 0,
    ADD COLUMN run_sum double precision NOT NULL DEFAULT 0,
    ADD COLUMN run_sq  double precision NOT NULL DEFAULT 0,
    ADD COLUMN resets  int              NOT NULL DEFAULT 0;

-- migrate:down
ALTER TABLE routing_stats DROP COLUMN sq, DROP COLUMN cusum, DROP COLUMN run_n,
    DROP COLUMN run_sum, DROP COLUMN run_sq, DROP COLUMN resets;
