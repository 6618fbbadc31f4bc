-- migrate:up

-- Read model of the `nodes` projection (services/orchestrator/projections.py): the
-- registry, folded from node-<id> streams. Load is not here: heartbeats are telemetry
-- kept on the NEXUS_HEARTBEATS JetStream stream and in each orchestrator's memory.
CREATE TABLE nodes (
    node_id            text PRIMARY KEY,
    status             text        NOT NULL,
    hostname           text        NOT NULL,
    labels             jsonb       NOT NULL,
    models             text[]      NOT NULL,
    registration       jsonb       NOT NULL,
    version            bigint      NOT NULL,
    registered_at      timestamptz NOT NULL,
    status_changed_at  timestamptz NOT NULL
);

CREATE INDEX nodes_status_idx ON nodes (status);
CREATE INDEX nodes_labels_idx ON nodes USING gin (labels);

-- migrate:down
DROP TABLE nodes;
