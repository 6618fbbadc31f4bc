"""The orchestrator's read models, each a fold over events (see shared.eventstore)."""

from __future__ import annotations

import asyncpg
import msgspec

from shared.events import RecordedEvent, SessionClosed, SessionStarted
from shared.eventstore import Projection


class SessionsProjection(Projection):
    """`sessions` table: one row per session, its status, budget limits and metadata."""

    name = "sessions"
    handles = frozenset({"SessionStarted", "SessionClosed"})
    tables = ("sessions",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        event = rec.event
        if isinstance(event, SessionStarted):
            await conn.execute(
                "INSERT INTO sessions (session_id, tenant, status, budget, policy, agent, metadata,"
                " created_at, version, event_count, trace_id)"
                " VALUES ($1, $2, 'open', $3::jsonb, $4, $5, $6::jsonb, $7, $8, 1, $9)",
                event.session_id, event.tenant,
                msgspec.json.encode(event.budget).decode() if event.budget else None,
                event.policy, event.agent, msgspec.json.encode(event.metadata).decode(),
                rec.recorded_at, rec.stream_version, rec.metadata.trace_id,
            )
        elif isinstance(event, SessionClosed):
            await conn.execute(
                "UPDATE sessions SET status = 'closed', closed_at = $2, close_reason = $3,"
                " version = $4, event_count = event_count + 1 WHERE session_id = $1",
                event.session_id, rec.recorded_at, event.reason, rec.stream_version,
            )


PROJECTIONS: tuple[Projection, ...] = (SessionsProjection(),)
