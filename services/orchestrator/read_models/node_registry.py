"""The `nodes` read model: the node registry, the same fold (`fold_node`) the
orchestrator keeps in memory (live load is not here: it is telemetry, see fleet.py)."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec

from shared.contracts.events import RecordedEvent
from shared.contracts.messages import NodeRegistration
from shared.domain.nodes import NODE_EVENT_TYPES, NodeRecord, fold_node
from shared.infra.eventstore import EventStore, Projection


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


class RegisteredNode(msgspec.Struct, frozen=True):
    node_id: str
    status: str
    registration: NodeRegistration
    registered_at: datetime
    status_changed_at: datetime


_COLUMNS = ("SELECT node_id, status, registration::text AS registration, registered_at,"
            " status_changed_at FROM nodes")


def _node(row: asyncpg.Record) -> RegisteredNode:
    return RegisteredNode(
        node_id=row["node_id"], status=row["status"],
        registration=msgspec.json.decode(row["registration"], type=NodeRegistration),
        registered_at=row["registered_at"], status_changed_at=row["status_changed_at"])


class NodeRegistryReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def find(self, *, status: str | None = None, label: tuple[str, str] | None = None,
                   model: str | None = None) -> list[RegisteredNode]:
        """Nodes by id: of `status` (every status but `deregistered` when None), carrying
        the label `(key, value)`, serving `model`."""
        clauses, args = [], []
        if status is not None:
            args.append(status)
            clauses.append(f"status = ${len(args)}")
        else:
            clauses.append("status <> 'deregistered'")
        if label is not None:
            args.append(msgspec.json.encode({label[0]: label[1]}).decode())
            clauses.append(f"labels @> ${len(args)}::jsonb")
        if model is not None:
            args.append(model)
            clauses.append(f"${len(args)} = ANY(models)")
        rows = await self.pool.fetch(
            f"{_COLUMNS} WHERE {' AND '.join(clauses)} ORDER BY node_id", *args)
        return [_node(r) for r in rows]

    async def get(self, node_id: str) -> RegisteredNode | None:
        row = await self.pool.fetchrow(f"{_COLUMNS} WHERE node_id = $1", node_id)
        return _node(row) if row else None
