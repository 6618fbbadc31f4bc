"""Session management: start sessions (events) and read them (projection)."""

from __future__ import annotations

import json

import asyncpg

from shared.events import BudgetLimits, Metadata, SessionStarted, new_id, session_stream
from shared.eventstore import EventStore, ProjectionRunner
from services.orchestrator.schemas import BudgetView, SessionCreate, SessionView


def _view(row: asyncpg.Record) -> SessionView:
    budget = json.loads(row["budget"]) if row["budget"] else None
    return SessionView(
        session_id=row["session_id"],
        tenant=row["tenant"],
        status=row["status"],
        budget=BudgetView(**budget) if budget is not None else None,
        policy=row["policy"],
        agent=row["agent"],
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
        closed_at=row["closed_at"],
        version=row["version"],
        trace_id=row["trace_id"],
    )


class SessionService:
    def __init__(self, store: EventStore, runner: ProjectionRunner) -> None:
        self.store = store
        self.runner = runner

    async def start(self, tenant: str, actor: str, request: SessionCreate) -> SessionView:
        session_id = new_id()
        budget = (
            BudgetLimits(limit_usd=request.budget.limit_usd, limit_tokens=request.budget.limit_tokens)
            if request.budget else None
        )
        event = SessionStarted(session_id=session_id, tenant=tenant, budget=budget,
                               policy=request.policy, agent=request.agent,
                               metadata=dict(request.metadata))
        result = await self.store.append(
            session_stream(session_id), [event], expected_version=0,
            metadata=Metadata(tenant=tenant, actor=actor, correlation_id=session_id),
        )
        # Read-your-writes: fold the new event into the read models before answering.
        await self.runner.wait_for(result.last_position)
        view = await self.get(tenant, session_id)
        assert view is not None, "session missing from its projection after catch-up"
        return view

    async def get(self, tenant: str, session_id: str) -> SessionView | None:
        row = await self.store.pool.fetchrow(
            "SELECT session_id, tenant, status, budget::text AS budget, policy, agent,"
            " metadata::text AS metadata, created_at, closed_at, version, trace_id"
            " FROM sessions WHERE session_id = $1 AND tenant = $2",
            session_id, tenant,
        )
        return _view(row) if row else None
