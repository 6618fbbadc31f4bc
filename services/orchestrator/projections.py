"""The orchestrator's read models, each a fold over events (see shared.eventstore)."""

from __future__ import annotations

import asyncpg
import msgspec

from shared.events import ApiKeyCreated, ApiKeyRevoked, RecordedEvent, SessionClosed, SessionStarted
from shared.eventstore import Projection
from shared.messages import NodeRegistration
from shared.nodes import NODE_EVENT_TYPES, NodeRecord, fold_node


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


class NodesProjection(Projection):
    """`nodes` table: the registry, the same fold (`fold_node`) the orchestrator keeps in memory."""

    name = "nodes"
    handles = NODE_EVENT_TYPES
    tables = ("nodes",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        node_id = rec.event.node_id  # type: ignore[attr-defined]
        row = await conn.fetchrow(
            "SELECT status, registration::text AS registration, version FROM nodes WHERE node_id = $1",
            node_id,
        )
        state = None
        if row is not None:
            reg = msgspec.json.decode(row["registration"], type=NodeRegistration)
            state = NodeRecord(node_id, row["status"], reg, row["version"])
        new = fold_node(state, rec.event, rec.stream_version)
        if new is None:
            return
        reg = new.registration
        await conn.execute(
            "INSERT INTO nodes (node_id, status, hostname, labels, models, registration, version,"
            " registered_at, status_changed_at)"
            " VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, $8, $8)"
            " ON CONFLICT (node_id) DO UPDATE SET status = EXCLUDED.status,"
            " hostname = EXCLUDED.hostname, labels = EXCLUDED.labels, models = EXCLUDED.models,"
            " registration = EXCLUDED.registration, version = EXCLUDED.version,"
            " status_changed_at = CASE WHEN nodes.status = EXCLUDED.status"
            "   THEN nodes.status_changed_at ELSE EXCLUDED.status_changed_at END",
            node_id, new.status, reg.hostname, msgspec.json.encode(reg.labels).decode(),
            list(reg.runtime.models), msgspec.json.encode(reg).decode(), new.version,
            rec.recorded_at,
        )


class ApiKeysProjection(Projection):
    """`api_keys` table: key id, tenant, role and the key's hash; revocations."""

    name = "api_keys"
    handles = frozenset({"ApiKeyCreated", "ApiKeyRevoked"})
    tables = ("api_keys",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        event = rec.event
        if isinstance(event, ApiKeyCreated):
            await conn.execute(
                "INSERT INTO api_keys (key_id, tenant, name, role, key_hash, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                event.key_id, event.tenant, event.name, event.role, event.key_hash, rec.recorded_at,
            )
        elif isinstance(event, ApiKeyRevoked):
            await conn.execute("UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1",
                               event.key_id, rec.recorded_at)


PROJECTIONS: tuple[Projection, ...] = (SessionsProjection(), NodesProjection(), ApiKeysProjection())
