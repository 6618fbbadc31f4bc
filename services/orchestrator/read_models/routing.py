"""The `skills` and `routing_stats` read models: tenants' skills at their current
version, and what adaptive routing learned from the events: each routed call
(`ModelRouted`) with its cost (`LLMCallCompleted`) and feedback (`CallFeedback`), and
per (tenant, cluster, model) the folded statistics (`shared.domain.adaptive_routing`:
`fold_feedback`, `fold_cost`), so a rebuild from the events gives the same numbers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from shared.contracts.events import (
    CallFeedback,
    LLMCallCompleted,
    ModelRouted,
    RecordedEvent,
    SkillDefined,
)
from shared.domain.adaptive_routing import ArmStats, fold_cost, fold_feedback
from shared.infra.eventstore import EventStore, Projection

_enc = msgspec.json.Encoder()
_ARM = ArmStats.__struct_fields__  # routing_stats' columns of the folded statistics


class SkillsProjection(Projection):
    name = "skills"
    handles = frozenset({"SkillDefined"})
    tables = ("skills",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        assert isinstance(e, SkillDefined)
        await conn.execute(
            "INSERT INTO skills (tenant, name, version, spec, updated_at)"
            " VALUES ($1, $2, $3, $4::jsonb, $5) ON CONFLICT (tenant, name) DO UPDATE SET"
            " version = EXCLUDED.version, spec = EXCLUDED.spec, updated_at = EXCLUDED.updated_at",
            e.tenant, e.name, rec.stream_version, _enc.encode(e.spec).decode(), rec.recorded_at)


class RoutingStatsProjection(Projection):
    name = "routing_stats"
    handles = frozenset({"ModelRouted", "LLMCallCompleted", "CallFeedback"})
    tables = ("routed_calls", "routing_stats")

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        match e:
            case ModelRouted():
                tenant = rec.metadata.tenant or ""
                await conn.execute(
                    "INSERT INTO routed_calls (call_id, tenant, session_id, skill, cluster, pick,"
                    " routed_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    e.call_id, tenant, e.session_id, e.skill, e.cluster, e.pick, rec.recorded_at)
                await conn.execute(
                    "INSERT INTO routing_stats (tenant, cluster, model, skill_counts)"
                    " VALUES ($1, $2, $3, jsonb_build_object($4::text, 1))"
                    " ON CONFLICT (tenant, cluster, model) DO UPDATE SET skill_counts ="
                    " routing_stats.skill_counts || jsonb_build_object($4::text,"
                    " coalesce((routing_stats.skill_counts ->> $4)::int, 0) + 1)",
                    tenant, e.cluster, e.pick, e.skill if e.matched_by == "explicit" else "")
            case LLMCallCompleted():
                row = await conn.fetchrow(
                    "UPDATE routed_calls SET cost_micro_usd = $2, latency_ms = $3"
                    " WHERE call_id = $1 RETURNING tenant, cluster, pick", e.call_id,
                    e.cost_micro_usd, e.latency_ms)
                if row is not None:
                    await self._fold(conn, row, lambda s: fold_cost(s, e.cost_micro_usd))
            case CallFeedback():
                row = await conn.fetchrow(
                    "UPDATE routed_calls SET feedback = $2 WHERE call_id = $1"
                    " RETURNING tenant, cluster, pick", e.call_id, e.score)
                if row is not None:
                    await self._fold(conn, row, lambda s: fold_feedback(s, e.score))

    async def apply_batch(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """As `apply` one by one, but each run of completions (every call appends one; a
        routed one also folds its arm) updates `routed_calls` in one statement."""
        run: list[RecordedEvent] = []
        for rec in events:
            if isinstance(rec.event, LLMCallCompleted) and all(
                    r.event.call_id != rec.event.call_id for r in run):
                run.append(rec)
                continue
            await self._completed(conn, run)
            run = [rec] if isinstance(rec.event, LLMCallCompleted) else []
            if not run:
                await self.apply(conn, rec)
        await self._completed(conn, run)

    async def _completed(self, conn: asyncpg.Connection, run: list[RecordedEvent]) -> None:
        """Completions of distinct calls: their `routed_calls` rows in one statement, then
        their arms folded in order (that statement and the folds touch different tables)."""
        if len(run) <= 1:
            for rec in run:
                await self.apply(conn, rec)
            return
        rows = {r["call_id"]: r for r in await conn.fetch(
            "UPDATE routed_calls AS r SET cost_micro_usd = u.cost, latency_ms = u.latency"
            " FROM unnest($1::text[], $2::bigint[], $3::float8[]) AS u(call_id, cost, latency)"
            " WHERE r.call_id = u.call_id RETURNING r.call_id, r.tenant, r.cluster, r.pick",
            [r.event.call_id for r in run], [r.event.cost_micro_usd for r in run],
            [r.event.latency_ms for r in run])}
        for rec in run:
            e = rec.event
            if (row := rows.get(e.call_id)) is not None:
                await self._fold(conn, row, lambda s, cost=e.cost_micro_usd: fold_cost(s, cost))

    @staticmethod
    async def _fold(conn: asyncpg.Connection, row: Any, fold) -> None:
        cur = await conn.fetchrow(
            f"SELECT {', '.join(_ARM)} FROM routing_stats"
            " WHERE tenant = $1 AND cluster = $2 AND model = $3 FOR UPDATE",
            row["tenant"], row["cluster"], row["pick"])
        stats = fold(ArmStats(**dict(cur)) if cur is not None else ArmStats())
        await conn.execute(
            f"INSERT INTO routing_stats (tenant, cluster, model, {', '.join(_ARM)}) VALUES"
            f" ($1, $2, $3, {', '.join(f'${i + 4}' for i in range(len(_ARM)))})"
            " ON CONFLICT (tenant, cluster, model) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in _ARM),
            row["tenant"], row["cluster"], row["pick"], *(getattr(stats, c) for c in _ARM))


class RoutedCall(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    session_id: str
    skill: str
    cluster: str
    pick: str
    routed_at: datetime
    cost_micro_usd: int | None
    latency_ms: float | None
    feedback: float | None


class RoutingReadModel:
    """Queries on `skills`, `routed_calls` and `routing_stats`."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    async def skill(self, tenant: str, name: str) -> tuple[dict, int] | None:
        row = await self.store.pool.fetchrow(
            "SELECT spec, version FROM skills WHERE tenant = $1 AND name = $2", tenant, name)
        return (msgspec.json.decode(row["spec"]), row["version"]) if row else None

    async def skills(self, tenant: str) -> list[tuple[dict, int]]:
        rows = await self.store.pool.fetch(
            "SELECT spec, version FROM skills WHERE tenant = $1 ORDER BY name", tenant)
        return [(msgspec.json.decode(r["spec"]), r["version"]) for r in rows]

    async def arms(self, tenant: str, cluster: str,
                   models: list[str]) -> tuple[dict[str, ArmStats], dict[str, ArmStats], dict[str, int]]:
        """Per model: this cluster's stats, the stats over all the tenant's clusters, and
        the cluster's explicit skill traffic (skill -> calls)."""
        rows = await self.store.pool.fetch(
            f"SELECT cluster, model, {', '.join(_ARM)}, skill_counts"
            " FROM routing_stats WHERE tenant = $1 AND model = ANY($2::text[])", tenant, models)
        own: dict[str, ArmStats] = {}
        pooled: dict[str, ArmStats] = {}
        traffic: dict[str, int] = {}
        for r in rows:
            stats = ArmStats(**{c: r[c] for c in _ARM})
            if r["cluster"] == cluster:
                own[r["model"]] = stats
                for skill, n in msgspec.json.decode(r["skill_counts"]).items():
                    if skill:
                        traffic[skill] = traffic.get(skill, 0) + int(n)
            p = pooled.setdefault(r["model"], ArmStats())
            n = p.cost_n + stats.cost_n
            pooled[r["model"]] = ArmStats(
                alpha=p.alpha + stats.alpha, beta=p.beta + stats.beta, sq=p.sq + stats.sq,
                feedback_n=p.feedback_n + stats.feedback_n, cost_n=n,
                cost_mean=(p.cost_mean * p.cost_n + stats.cost_mean * stats.cost_n) / n if n else 0.0)
        return own, pooled, traffic

    async def all_arms(self, tenant: str) -> dict[tuple[str, str], ArmStats]:
        rows = await self.store.pool.fetch(
            f"SELECT cluster, model, {', '.join(_ARM)} FROM routing_stats WHERE tenant = $1", tenant)
        return {(r["cluster"], r["model"]): ArmStats(**{c: r[c] for c in _ARM}) for r in rows}

    async def routed_between(self, tenant: str, since: datetime, until: datetime,
                             limit: int) -> list[RoutedCall]:
        rows = await self.store.pool.fetch(
            "SELECT call_id, session_id, skill, cluster, pick, routed_at, cost_micro_usd,"
            " latency_ms, feedback FROM routed_calls WHERE tenant = $1 AND routed_at >= $2"
            " AND routed_at <= $3 ORDER BY routed_at LIMIT $4", tenant, since, until, limit)
        return [RoutedCall(**dict(r)) for r in rows]
