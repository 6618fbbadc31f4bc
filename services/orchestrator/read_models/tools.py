"""The `tools` and `tool_calls` read models: each tenant's tools at their current
version (`ToolDefined`), and each tool call's state folded from its `ToolCall*` events."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from shared.contracts.events import (
    RecordedEvent,
    ToolCallApprovalGiven,
    ToolCallDecided,
    ToolCallFailed,
    ToolCallFinished,
    ToolCallRequested,
    ToolCallStarted,
    ToolDefined,
)
from shared.infra.eventstore import EventStore, Projection

_enc = msgspec.json.Encoder()


class ToolsProjection(Projection):
    """`tools` table: the current version of each tenant's tools."""

    name = "tools"
    handles = frozenset({"ToolDefined"})
    tables = ("tools",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        assert isinstance(e, ToolDefined)
        await conn.execute(
            "INSERT INTO tools (tenant, name, version, spec, updated_at)"
            " VALUES ($1, $2, $3, $4::jsonb, $5) ON CONFLICT (tenant, name) DO UPDATE SET"
            " version = EXCLUDED.version, spec = EXCLUDED.spec, updated_at = EXCLUDED.updated_at",
            e.tenant, e.name, rec.stream_version, _enc.encode(e.spec).decode(), rec.recorded_at)


_STATUS = {"allowed": "allowed", "denied": "denied", "needs_approval": "pending_approval"}


class ToolCallsProjection(Projection):
    """`tool_calls` table: one row per tool call, its verdict, node and outcome."""

    name = "tool_calls"
    handles = frozenset({"ToolCallRequested", "ToolCallDecided", "ToolCallApprovalGiven",
                         "ToolCallStarted", "ToolCallFinished", "ToolCallFailed"})
    tables = ("tool_calls",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e, at = rec.event, rec.recorded_at
        match e:
            case ToolCallRequested():
                await conn.execute(
                    "INSERT INTO tool_calls (tool_call_id, tenant, session_id, tool, tool_version,"
                    " run_id, arguments, status, created_at, updated_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, 'requested', $8, $8)"
                    " ON CONFLICT (tool_call_id) DO NOTHING",
                    e.tool_call_id, rec.metadata.tenant or "", e.session_id, e.tool,
                    e.tool_version, e.run_id, _enc.encode(e.arguments).decode(), at)
            case ToolCallDecided():
                await conn.execute(
                    "UPDATE tool_calls SET verdict = $2, rule = $3, reason = $4, status = $5,"
                    " updated_at = $6 WHERE tool_call_id = $1",
                    e.tool_call_id, e.verdict, e.rule, e.reason, _STATUS.get(e.verdict, e.verdict), at)
            case ToolCallApprovalGiven():
                await conn.execute(
                    "UPDATE tool_calls SET approved = $2, approved_by = $3,"
                    " status = CASE WHEN $2 THEN 'approved' ELSE status END, updated_at = $4"
                    " WHERE tool_call_id = $1", e.tool_call_id, e.approved, e.by, at)
            case ToolCallStarted():
                await conn.execute(
                    "UPDATE tool_calls SET status = 'running', node = $2, updated_at = $3"
                    " WHERE tool_call_id = $1", e.tool_call_id, e.node, at)
            case ToolCallFinished():
                await conn.execute(
                    "UPDATE tool_calls SET status = 'finished', node = $2, is_error = $3,"
                    " exit_code = $4, output = $5, result = $6::jsonb, output_bytes = $7,"
                    " truncated = $8, output_ref = $9, duration_ms = $10, cpu_s = $11,"
                    " peak_memory_mb = $12, updated_at = $13 WHERE tool_call_id = $1",
                    e.tool_call_id, e.node, e.is_error, e.exit_code, e.output,
                    _enc.encode(e.result).decode() if e.result is not None else None,
                    e.output_bytes, e.truncated, e.output_ref, e.duration_ms, e.cpu_s,
                    e.peak_memory_mb, at)
            case ToolCallFailed():
                await conn.execute(
                    "UPDATE tool_calls SET status = 'failed', error = $2, detail = $3,"
                    " node = COALESCE($4, node), updated_at = $5 WHERE tool_call_id = $1",
                    e.tool_call_id, e.reason, e.detail, e.node, at)


class ToolsReadModel:
    """Every query on `tools` and `tool_calls`."""

    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def tool(self, tenant: str, name: str) -> tuple[dict[str, Any], int] | None:
        """A tenant tool's spec (as stored) and its current version."""
        row = await self.pool.fetchrow(
            "SELECT spec::text AS spec, version FROM tools WHERE tenant = $1 AND name = $2",
            tenant, name)
        return (msgspec.json.decode(row["spec"]), row["version"]) if row else None

    async def tools_of(self, tenant: str) -> list[tuple[dict[str, Any], int]]:
        rows = await self.pool.fetch(
            "SELECT spec::text AS spec, version FROM tools WHERE tenant = $1 ORDER BY name", tenant)
        return [(msgspec.json.decode(r["spec"]), r["version"]) for r in rows]

    async def call(self, tenant: str, session_id: str, tool_call_id: str) -> dict[str, Any] | None:
        """A tool call of the tenant's session, as a dict of its columns."""
        row = await self.pool.fetchrow(
            "SELECT tool_call_id, session_id, tool, tool_version, run_id,"
            " arguments::text AS arguments, status, verdict, rule, reason, approved, approved_by,"
            " node, is_error, exit_code, output, result::text AS result, output_bytes, truncated,"
            " output_ref, duration_ms, cpu_s, peak_memory_mb, error, detail, created_at,"
            " updated_at FROM tool_calls WHERE tool_call_id = $1 AND tenant = $2"
            " AND session_id = $3", tool_call_id, tenant, session_id)
        if row is None:
            return None
        out = dict(row)
        out["arguments"] = msgspec.json.decode(out["arguments"])
        out["result"] = msgspec.json.decode(out["result"]) if out["result"] is not None else None
        return out

    async def active_calls(self, tenant: str, session_id: str) -> int:
        """Calls of the session that may still be running (decided, not yet ended)."""
        return await self.pool.fetchval(
            "SELECT count(*) FROM tool_calls WHERE tenant = $1 AND session_id = $2"
            " AND status IN ('requested', 'approved', 'running')", tenant, session_id)

    async def rows_of_tenant(self, tenant: str) -> list[tuple]:
        """Every tool call row of a tenant (for comparing a projection with its rebuild)."""
        rows = await self.pool.fetch(
            "SELECT * FROM tool_calls WHERE tenant = $1 ORDER BY tool_call_id", tenant)
        return [tuple(r) for r in rows]
