"""The orchestrator's read models, each a fold over events (see shared.infra.eventstore)."""

from __future__ import annotations

import asyncpg
import msgspec

from shared.domain.budget import BUDGET_EVENT_TYPE_NAMES, BudgetState, Reservation, fold_budget
from shared.contracts.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    MessageAppended,
    PolicyDefined,
    RecordedEvent,
    SessionClosed,
    SessionStarted,
)
from shared.infra.eventstore import Projection
from shared.contracts.messages import NodeRegistration
from shared.domain.nodes import NODE_EVENT_TYPES, NodeRecord, fold_node


class SessionsProjection(Projection):
    """`sessions` table: one row per session, its status, budget limits and metadata."""

    name = "sessions"
    handles = frozenset({"SessionStarted", "SessionClosed"})
    tables = ("sessions",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        event = rec.event
        if isinstance(event, SessionStarted):
            await conn.execute(
                "INSERT INTO sessions (session_id, tenant, status, budget, policy, policy_version,"
                " policy_rules, agent, metadata, created_at, version, event_count, trace_id)"
                " VALUES ($1, $2, 'open', $3::jsonb, $4, $5, $6::jsonb, $7, $8::jsonb, $9, $10, 1, $11)",
                event.session_id, event.tenant,
                msgspec.json.encode(event.budget).decode() if event.budget else None,
                event.policy, event.policy_version,
                msgspec.json.encode(event.policy_rules).decode() if event.policy_rules is not None else None,
                event.agent, msgspec.json.encode(event.metadata).decode(),
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


def _budget_from_json(raw: str) -> BudgetState:
    data = msgspec.json.decode(raw)
    data["reservations"] = {k: Reservation(**v) for k, v in data["reservations"].items()}
    return BudgetState(**data)


class BudgetsProjection(Projection):
    """`budgets` table: each budget stream folded with `fold_budget` (the manager's fold)."""

    name = "budgets"
    handles = BUDGET_EVENT_TYPE_NAMES
    tables = ("budgets",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        raw = await conn.fetchval("SELECT state::text FROM budgets WHERE budget_id = $1", rec.stream_id)
        state = _budget_from_json(raw) if raw else None
        new = fold_budget(state, rec.event, rec.stream_version)
        if new is None or new is state:
            return
        await conn.execute(
            "INSERT INTO budgets (budget_id, scope, owner, tenant, period, limit_micro_usd, limit_tokens,"
            " reserved_micro_usd, reserved_tokens, committed_micro_usd, committed_tokens,"
            " open_reservations, state, version, updated_at)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13::jsonb,$14,$15)"
            " ON CONFLICT (budget_id) DO UPDATE SET limit_micro_usd = EXCLUDED.limit_micro_usd,"
            " limit_tokens = EXCLUDED.limit_tokens, reserved_micro_usd = EXCLUDED.reserved_micro_usd,"
            " reserved_tokens = EXCLUDED.reserved_tokens,"
            " committed_micro_usd = EXCLUDED.committed_micro_usd,"
            " committed_tokens = EXCLUDED.committed_tokens,"
            " open_reservations = EXCLUDED.open_reservations, state = EXCLUDED.state,"
            " version = EXCLUDED.version, updated_at = EXCLUDED.updated_at",
            rec.stream_id, new.scope, new.owner, rec.metadata.tenant, new.period,
            new.limit_micro_usd, new.limit_tokens, new.reserved_micro_usd, new.reserved_tokens,
            new.committed_micro_usd, new.committed_tokens, len(new.reservations),
            msgspec.json.encode(new).decode(), new.version, rec.recorded_at,
        )


class MessagesProjection(Projection):
    """`messages` table: the conversation of every session."""

    name = "messages"
    handles = frozenset({"MessageAppended"})
    tables = ("messages",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        assert isinstance(e, MessageAppended)
        await conn.execute(
            "INSERT INTO messages (position, session_id, message_id, role, content, call_id, model,"
            " provider, node, input_tokens, output_tokens, cost_micro_usd, finish_reason, created_at)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)",
            rec.position, e.session_id, e.message_id, e.role, e.content, e.call_id, e.model,
            e.provider, e.node, e.input_tokens, e.output_tokens, e.cost_micro_usd, e.finish_reason,
            rec.recorded_at,
        )


class PoliciesProjection(Projection):
    """`policies` table: the current version of each tenant's named policies."""

    name = "policies"
    handles = frozenset({"PolicyDefined"})
    tables = ("policies",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        assert isinstance(e, PolicyDefined)
        await conn.execute(
            "INSERT INTO policies (tenant, name, version, rules, updated_at)"
            " VALUES ($1, $2, $3, $4::jsonb, $5) ON CONFLICT (tenant, name) DO UPDATE SET"
            " version = EXCLUDED.version, rules = EXCLUDED.rules, updated_at = EXCLUDED.updated_at",
            e.tenant, e.name, rec.stream_version, msgspec.json.encode(e.rules).decode(),
            rec.recorded_at)


PROJECTIONS: tuple[Projection, ...] = (
    SessionsProjection(),
    NodesProjection(),
    ApiKeysProjection(),
    BudgetsProjection(),
    MessagesProjection(),
    PoliciesProjection(),
)
