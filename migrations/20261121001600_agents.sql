-- migrate:up

-- `agents` projection: the current version of each agent, per tenant (the system agents
-- shipped in `agents/` under the tenant '@system'), from AgentDefined.
CREATE TABLE agents (
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    version     int         NOT NULL,
    description text        NOT NULL,
    definition  jsonb       NOT NULL,
    markdown    text        NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- sessions pin the agent's version they start with (SessionStarted.agent_version/source)
ALTER TABLE sessions ADD COLUMN agent_version int;
ALTER TABLE sessions ADD COLUMN agent_source text;

-- migrate:down
ALTER TABLE sessions DROP COLUMN agent_source;
ALTER TABLE sessions DROP COLUMN agent_version;
DROP TABLE agents;
