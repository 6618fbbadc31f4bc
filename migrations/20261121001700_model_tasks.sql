-- migrate:up

-- `model_tasks` projection (services/orchestrator/read_models/model_tasks.py): each
-- model download task's state, folded from the ModelDownload* events (progress and
-- speed are NATS telemetry, never rows).
CREATE TABLE model_tasks (
    task_id       text        PRIMARY KEY,
    node_id       text        NOT NULL,
    model         text        NOT NULL,
    sha256        text        NOT NULL,
    size_bytes    bigint      NOT NULL,
    reason        text        NOT NULL,
    source        text        NOT NULL,
    status        text        NOT NULL,
    attempt       int         NOT NULL,
    resumed_from  bigint      NOT NULL,
    bytes_done    bigint      NOT NULL,
    fetched_bytes bigint      NOT NULL,
    error         text,
    detail        text        NOT NULL,
    reconciled    boolean     NOT NULL,
    version       int         NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX model_tasks_node_idx ON model_tasks (node_id, created_at);
CREATE INDEX model_tasks_status_idx ON model_tasks (status, created_at);

-- `node_models` projection: what each node has installed (ModelInstalled, ModelRemoved).
CREATE TABLE node_models (
    node_id       text        NOT NULL,
    model         text        NOT NULL,
    sha256        text        NOT NULL,
    size_bytes    bigint      NOT NULL,
    installed_at  timestamptz NOT NULL,
    PRIMARY KEY (node_id, model)
);

-- migrate:down
DROP TABLE node_models;
DROP TABLE model_tasks;
