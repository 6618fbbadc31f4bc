"""The `workspaces` read model: sessions that called tools, when each closed and when its
workspace was deleted; the janitor's work list (services/orchestrator/workspaces.py)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from shared.contracts.events import RecordedEvent, SessionClosed, ToolCallRequested, WorkspaceDeleted
from shared.infra.eventstore import EventStore, Projection


class WorkspacesProjection(Projection):
    """`workspace_purges`: a row per session that requested a tool call (only those can
    have a workspace), its close and its workspace's deletion."""

    name = "workspaces"
    handles = frozenset({"ToolCallRequested", "SessionClosed", "WorkspaceDeleted"})
    tables = ("workspace_purges",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        match rec.event:
            case ToolCallRequested(session_id=sid):
                await conn.execute(
                    "INSERT INTO workspace_purges (session_id, tenant) VALUES ($1, $2)"
                    " ON CONFLICT (session_id) DO NOTHING", sid, rec.metadata.tenant or "")
            case SessionClosed(session_id=sid):
                await conn.execute(
                    "UPDATE workspace_purges SET closed_at = $2 WHERE session_id = $1"
                    " AND closed_at IS NULL", sid, rec.recorded_at)
            case WorkspaceDeleted(session_id=sid, objects=objects, bytes=size):
                await conn.execute(
                    "UPDATE workspace_purges SET deleted_at = $2, objects = $3, bytes = $4"
                    " WHERE session_id = $1", sid, rec.recorded_at, objects, size)


class WorkspacesReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def pending(self, limit: int = 100) -> list[tuple[str, str, datetime]]:
        """(tenant, session_id, closed_at) of closed sessions whose workspace is not yet
        deleted, the longest closed first."""
        rows = await self.pool.fetch(
            "SELECT tenant, session_id, closed_at FROM workspace_purges"
            " WHERE closed_at IS NOT NULL AND deleted_at IS NULL ORDER BY closed_at LIMIT $1",
            limit)
        return [(r["tenant"], r["session_id"], r["closed_at"]) for r in rows]

    async def rows(self, tenant: str) -> list[tuple]:
        """Every row of a tenant (for comparing the projection with its rebuild)."""
        rows = await self.pool.fetch(
            "SELECT * FROM workspace_purges WHERE tenant = $1 ORDER BY session_id", tenant)
        return [tuple(r) for r in rows]
