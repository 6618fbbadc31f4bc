-- migrate:up

-- `budgets` projection: the fold of each budget stream (shared.budget.fold_budget).
CREATE TABLE budgets (
    budget_id          text PRIMARY KEY,
    scope              text        NOT NULL,
    owner              text        NOT NULL,
    tenant             text,
    period             text,
    limit_micro_usd    bigint,
    limit_tokens       bigint,
    reserved_micro_usd bigint      NOT NULL,
    reserved_tokens    bigint      NOT NULL,
    committed_micro_usd bigint     NOT NULL,
    committed_tokens   bigint      NOT NULL,
    open_reservations  int         NOT NULL,
    state              jsonb       NOT NULL,
    version            bigint      NOT NULL,
    updated_at         timestamptz NOT NULL
);

-- `messages` projection: every session's conversation, in order.
CREATE TABLE messages (
    position        bigint PRIMARY KEY,
    session_id      text        NOT NULL,
    message_id      text        NOT NULL,
    role            text        NOT NULL,
    content         text        NOT NULL,
    call_id         text,
    model           text,
    provider        text,
    node            text,
    input_tokens    int,
    output_tokens   int,
    cost_micro_usd  bigint,
    finish_reason   text,
    created_at      timestamptz NOT NULL
);
CREATE INDEX messages_session_idx ON messages (session_id, position);

-- `policies` projection: the latest version of each tenant policy.
CREATE TABLE policies (
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    version     bigint      NOT NULL,
    rules       jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant, name)
);

ALTER TABLE sessions ADD COLUMN policy_version bigint, ADD COLUMN policy_rules jsonb;

-- migrate:down
ALTER TABLE sessions DROP COLUMN policy_version, DROP COLUMN policy_rules;
DROP TABLE policies;
DROP TABLE messages;
DROP TABLE budgets;
