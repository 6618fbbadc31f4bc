-- migrate:up

-- `mcp_servers` projection (services/orchestrator/read_models/mcp_servers.py): the
-- current registration of each tenant's MCP servers (McpServerRegistered) and the tools
-- they listed. Headers hold secret *names*, never values.
CREATE TABLE mcp_servers (
    tenant          text        NOT NULL,
    name            text        NOT NULL,
    version         int         NOT NULL,
    transport       text        NOT NULL,  -- 'http' or 'stdio'
    url             text,
    command         jsonb       NOT NULL,  -- argv of a stdio server ([] for http)
    headers         jsonb       NOT NULL,  -- header -> secret name
    tools           jsonb       NOT NULL,  -- usable tools: name, description, inputSchema
    skipped         jsonb       NOT NULL,  -- listed tools left out: name, reason
    limits          jsonb       NOT NULL,
    needs_approval  boolean     NOT NULL,
    effect          text        NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- migrate:down
DROP TABLE mcp_servers;
