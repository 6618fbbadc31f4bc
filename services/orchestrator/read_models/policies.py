"""The `policies` read model: the current version of each tenant's named policies."""

from __future__ import annotations

import asyncpg
import msgspec

from shared.contracts.events import PolicyDefined, RecordedEvent
from shared.infra.eventstore import EventStore, Projection
from services.orchestrator.schemas import PolicyOut


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


class PoliciesReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def current_version(self, tenant: str, name: str) -> int | None:
        return await self.pool.fetchval(
            "SELECT version FROM policies WHERE tenant = $1 AND name = $2", tenant, name)

    async def of_tenant(self, tenant: str) -> list[PolicyOut]:
        """The tenant's policies at their current version, by name."""
        rows = await self.pool.fetch(
            "SELECT name, version, rules::text AS rules FROM policies WHERE tenant = $1 ORDER BY name",
            tenant)
        return [PolicyOut(name=r["name"], version=r["version"], rules=msgspec.json.decode(r["rules"]))
                for r in rows]
