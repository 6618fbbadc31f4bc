-- migrate:up

-- Read model of the `sessions` projection (services/orchestrator/projections.py).
-- Derived data: `nexus projections rebuild sessions` empties and refills it.
CREATE TABLE sessions (
    session_id   text PRIMARY KEY,
    tenant       text        NOT NULL,
    status       text        NOT NULL,
    budget       jsonb,
    policy       text,
    agent        text,
    metadata     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    closed_at    timestamptz,
    close_reason text,
    version      bigint      NOT NULL,
    event_count  int         NOT NULL,
    trace_id     text
);

CREATE INDEX sessions_tenant_created_idx ON sessions (tenant, created_at DESC);

-- migrate:down
DROP TABLE sessions;
