-- migrate:up

-- `tools` projection: the current version of each tenant's tools (ToolDefined).
CREATE TABLE tools (
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    version     int         NOT NULL,
    spec        jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- `tool_calls` projection: each tool call's state, folded from its ToolCall* events.
CREATE TABLE tool_calls (
    tool_call_id    text PRIMARY KEY,
    tenant          text        NOT NULL,
    session_id      text        NOT NULL,
    tool            text        NOT NULL,
    tool_version    int         NOT NULL,
    run_id          text,
    arguments       jsonb       NOT NULL,
    status          text        NOT NULL,  -- requested, pending_approval, running, finished, failed
    verdict         text,
    rule            text,
    reason          text,
    approved        boolean,
    approved_by     text,
    node            text,
    is_error        boolean,
    exit_code       int,
    output          text,
    result          jsonb,
    output_bytes    bigint,
    truncated       boolean,
    output_ref      text,
    duration_ms     double precision,
    cpu_s           double precision,
    peak_memory_mb  double precision,
    error           text,
    detail          text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX tool_calls_session_idx ON tool_calls (tenant, session_id, created_at);

-- Tenant secrets (HTTP tool and MCP server headers): technical state, never events.
-- Only `services/orchestrator/secrets.py` reads and writes it; values are AES-GCM
-- ciphertexts under a key derived from the platform's secret (the admin key).
CREATE TABLE tenant_secrets (
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    ciphertext  bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

-- migrate:down
DROP TABLE tenant_secrets;
DROP TABLE tool_calls;
DROP TABLE tools;
