"""The `sessions` read model: one row per session, its status, budget limits and metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec

from shared.contracts.events import RecordedEvent, SessionClosed, SessionStarted
from shared.infra.eventstore import EventStore, Projection
from services.orchestrator.schemas import BudgetView, SessionView


class SessionsProjection(Projection):
    """`sessions` table: one row per session, its status, budget limits and metadata."""

    name = "sessions"
    handles = frozenset({"SessionStarted", "SessionClosed"})
    tables = ("sessions",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        event = rec.event
        if isinstance(event, SessionStarted):
            await conn.execute(
                f"INSERT INTO sessions ({_INSERTED}) VALUES ($1, $2, 'open', $3::jsonb, $4, $5,"
                " $6::jsonb, $7, $8::jsonb, $9, $10, 1, $11, $12, $13)", *_started_row(rec))
        elif isinstance(event, SessionClosed):
            await conn.execute(
                "UPDATE sessions SET status = 'closed', closed_at = $2, close_reason = $3,"
                " version = $4, event_count = event_count + 1 WHERE session_id = $1",
                event.session_id, rec.recorded_at, event.reason, rec.stream_version,
            )

    async def apply_batch(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """Each run of started sessions in one statement (sessions are created in bursts,
        issue 16); a close in between is applied in its place, so the table ends as the
        loop of `apply` would leave it."""
        started: list[RecordedEvent] = []
        for rec in events:
            if isinstance(rec.event, SessionStarted):
                started.append(rec)
                continue
            await self._insert(conn, started)
            started = []
            await self.apply(conn, rec)
        await self._insert(conn, started)

    async def _insert(self, conn: asyncpg.Connection, started: list[RecordedEvent]) -> None:
        if len(started) < 2:
            for rec in started:
                await self.apply(conn, rec)
            return
        await conn.execute(
            f"INSERT INTO sessions ({_INSERTED}) SELECT s, t, 'open', b::jsonb, p, pv, pr::jsonb,"
            " a, m::jsonb, c, v, 1, tr, av, src FROM unnest($1::text[], $2::text[], $3::text[],"
            " $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::timestamptz[],"
            " $10::bigint[], $11::text[], $12::int[], $13::text[])"
            " AS u(s, t, b, p, pv, pr, a, m, c, v, tr, av, src)",
            *(list(column) for column in zip(*map(_started_row, started), strict=True)))


_INSERTED = ("session_id, tenant, status, budget, policy, policy_version, policy_rules, agent,"
             " metadata, created_at, version, event_count, trace_id, agent_version, agent_source")


def _started_row(rec: RecordedEvent) -> tuple:
    """A started session's row, the columns of `_INSERTED` less the constant ones."""
    event = rec.event
    assert isinstance(event, SessionStarted)
    return (event.session_id, event.tenant,
            msgspec.json.encode(event.budget).decode() if event.budget else None,
            event.policy, event.policy_version,
            msgspec.json.encode(event.policy_rules).decode() if event.policy_rules is not None else None,
            event.agent, msgspec.json.encode(event.metadata).decode(),
            rec.recorded_at, rec.stream_version, rec.metadata.trace_id,
            event.agent_version, event.agent_source)


_COLUMNS = (
    "SELECT session_id, tenant, status, budget::text AS budget, policy, policy_version,"
    " policy_rules::text AS policy_rules, agent, agent_version, agent_source,"
    " metadata::text AS metadata, created_at, closed_at, version, trace_id FROM sessions"
)


def _view(row: asyncpg.Record) -> SessionView:
    budget = json.loads(row["budget"]) if row["budget"] else None
    return SessionView(
        session_id=row["session_id"], tenant=row["tenant"], status=row["status"],
        budget=BudgetView(**budget) if budget is not None else None, policy=row["policy"],
        policy_version=row["policy_version"],
        policy_rules=json.loads(row["policy_rules"]) if row["policy_rules"] else None,
        agent=row["agent"], metadata=json.loads(row["metadata"]), created_at=row["created_at"],
        closed_at=row["closed_at"], version=row["version"], trace_id=row["trace_id"],
        agent_version=row["agent_version"], agent_source=row["agent_source"],
    )


class SessionsReadModel:
    """Queries on `sessions`, always scoped by tenant."""

    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def get(self, tenant: str, session_id: str) -> SessionView | None:
        row = await self.pool.fetchrow(f"{_COLUMNS} WHERE session_id = $1 AND tenant = $2",
                                       session_id, tenant)
        return _view(row) if row else None

    async def page(self, tenant: str, *, status: str | None, agent: str | None, limit: int,
                   before: tuple[datetime, str] | None) -> list[SessionView]:
        """Newest first, at most `limit`, those before `(created_at, session_id)` if given."""
        args: list[object] = [tenant]
        clauses = ["tenant = $1"]
        if status:
            args.append(status)
            clauses.append(f"status = ${len(args)}")
        if agent:
            args.append(agent)
            clauses.append(f"agent = ${len(args)}")
        if before:
            args += list(before)
            clauses.append(f"(created_at, session_id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        rows = await self.pool.fetch(
            f"{_COLUMNS} WHERE {' AND '.join(clauses)}"
            f" ORDER BY created_at DESC, session_id DESC LIMIT ${len(args)}", *args)
        return [_view(r) for r in rows]
