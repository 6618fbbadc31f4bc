-- migrate:up

-- `runs` projection: each agent run's state, folded from its Run* events.
CREATE TABLE runs (
    run_id          text PRIMARY KEY,
    tenant          text        NOT NULL,
    session_id      text        NOT NULL,
    agent           text        NOT NULL,
    agent_version   int         NOT NULL,
    status          text        NOT NULL,  -- running, awaiting_approval, finished, failed, cancelled
    steps           int         NOT NULL DEFAULT 0,
    cost_micro_usd  bigint      NOT NULL DEFAULT 0,
    answer          text,
    error           text,
    detail          text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX runs_session_idx ON runs (tenant, session_id, created_at);

-- Run leases: technical state (not events), only `services/orchestrator/run_leases.py`
-- reads and writes it. One row per run that is not over: `active` runs are owned by
-- `owner` until `expires_at` (renewed while it runs; afterwards any orchestrator takes
-- it over, `epoch` + 1); `parked` runs wait for a human until `expires_at`.
CREATE TABLE run_leases (
    run_id      text PRIMARY KEY,
    tenant      text        NOT NULL,
    owner       text,
    epoch       bigint      NOT NULL DEFAULT 1,
    state       text        NOT NULL,  -- active, parked
    expires_at  timestamptz NOT NULL
);
CREATE INDEX run_leases_expiry_idx ON run_leases (expires_at);

-- messages of a run in the conversation: the assistant's tool calls and tool results
ALTER TABLE messages ADD COLUMN tool_calls jsonb;
ALTER TABLE messages ADD COLUMN tool_call_id text;
ALTER TABLE messages ADD COLUMN run_id text;

-- migrate:down
ALTER TABLE messages DROP COLUMN run_id;
ALTER TABLE messages DROP COLUMN tool_call_id;
ALTER TABLE messages DROP COLUMN tool_calls;
DROP TABLE run_leases;
DROP TABLE runs;
