"""The `runs` read model: each agent run's status, steps, cost and outcome, folded from
its `Run*` events (the lists; `GET /v1/runs/{id}` folds the run's own stream)."""

from __future__ import annotations

from typing import Any

import asyncpg

from shared.contracts.events import (
    RecordedEvent,
    RunApprovalGiven,
    RunAwaitingApproval,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunModelAnswered,
    RunStarted,
    RunStepStarted,
)
from shared.infra.eventstore import EventStore, Projection


class RunsProjection(Projection):
    name = "runs"
    handles = frozenset({"RunStarted", "RunStepStarted", "RunModelAnswered", "RunAwaitingApproval",
                         "RunApprovalGiven", "RunFinished", "RunFailed", "RunCancelled"})
    tables = ("runs",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e, at = rec.event, rec.recorded_at
        match e:
            case RunStarted():
                await conn.execute(
                    "INSERT INTO runs (run_id, tenant, session_id, agent, agent_version, status,"
                    " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'running', $6, $6)"
                    " ON CONFLICT (run_id) DO NOTHING",
                    e.run_id, e.tenant, e.session_id, e.agent, e.agent_version, at)
            case RunStepStarted():
                await conn.execute(
                    "UPDATE runs SET steps = GREATEST(steps, $2), status = 'running', updated_at = $3"
                    " WHERE run_id = $1 AND status NOT IN ('finished', 'failed', 'cancelled')",
                    e.run_id, e.step, at)
            case RunModelAnswered():
                await conn.execute(
                    "UPDATE runs SET cost_micro_usd = cost_micro_usd + $2, updated_at = $3"
                    " WHERE run_id = $1", e.run_id, e.cost_micro_usd, at)
            case RunAwaitingApproval():
                await conn.execute(
                    "UPDATE runs SET status = 'awaiting_approval', updated_at = $2"
                    " WHERE run_id = $1 AND status NOT IN ('finished', 'failed', 'cancelled')",
                    e.run_id, at)
            case RunApprovalGiven():
                await conn.execute(
                    "UPDATE runs SET status = 'running', updated_at = $2"
                    " WHERE run_id = $1 AND status = 'awaiting_approval'", e.run_id, at)
            case RunFinished():
                await self._end(conn, e.run_id, "finished", e.answer, None, None, at)
            case RunFailed():
                await self._end(conn, e.run_id, "failed", None, e.reason, e.detail, at)
            case RunCancelled():
                await self._end(conn, e.run_id, "cancelled", None, "cancelled", e.reason, at)

    @staticmethod
    async def _end(conn: asyncpg.Connection, run_id: str, status: str, answer: str | None,
                   error: str | None, detail: str | None, at: Any) -> None:
        await conn.execute(
            "UPDATE runs SET status = $2, answer = $3, error = $4, detail = $5, updated_at = $6"
            " WHERE run_id = $1 AND status NOT IN ('finished', 'failed', 'cancelled')",
            run_id, status, answer, error, detail, at)


class RunsReadModel:
    """Every query on `runs`."""

    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def of_session(self, tenant: str, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT run_id, session_id, agent, agent_version, status, steps, cost_micro_usd,"
            " answer, error, detail, created_at, updated_at FROM runs"
            " WHERE tenant = $1 AND session_id = $2 ORDER BY created_at DESC, run_id LIMIT $3",
            tenant, session_id, limit)
        return [dict(r) for r in rows]

    async def of_tenant(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's latest runs, newest first (the dashboard's Runs page)."""
        rows = await self.pool.fetch(
            "SELECT run_id, session_id, agent, agent_version, status, steps, cost_micro_usd,"
            " answer, error, detail, created_at, updated_at FROM runs"
            " WHERE tenant = $1 ORDER BY created_at DESC, run_id LIMIT $2", tenant, limit)
        return [dict(r) for r in rows]

    async def count_by_status(self, tenant: str) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT status, count(*) AS n FROM runs WHERE tenant = $1 GROUP BY status", tenant)
        return {r["status"]: r["n"] for r in rows}

    async def count_all_by_status(self) -> dict[str, int]:
        """Runs by status across every tenant (the platform's dashboard)."""
        rows = await self.pool.fetch("SELECT status, count(*) AS n FROM runs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    async def rows_of_tenant(self, tenant: str) -> list[tuple]:
        """Every run row of a tenant (for comparing the projection with its rebuild)."""
        rows = await self.pool.fetch(
            "SELECT * FROM runs WHERE tenant = $1 ORDER BY run_id", tenant)
        return [tuple(r) for r in rows]

    async def all_rows(self) -> list[tuple]:
        """Every run row (for comparing the projection with its rebuild)."""
        return [tuple(r) for r in await self.pool.fetch("SELECT * FROM runs ORDER BY run_id")]
