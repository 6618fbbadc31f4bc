-- migrate:up

-- `workspaces` projection: sessions that called tools (so may have a workspace in the
-- object store), when they closed, and when their workspace was deleted
-- (ToolCallRequested, SessionClosed, WorkspaceDeleted). The orchestrator's janitor
-- (services/orchestrator/workspaces.py) deletes the closed ones' workspaces.
CREATE TABLE workspace_purges (
    session_id  text PRIMARY KEY,
    tenant      text        NOT NULL,
    closed_at   timestamptz,
    deleted_at  timestamptz,
    objects     int,
    bytes       bigint
);
CREATE INDEX workspace_purges_pending_idx ON workspace_purges (closed_at)
    WHERE closed_at IS NOT NULL AND deleted_at IS NULL;

-- migrate:down
DROP TABLE workspace_purges;
