"""The `agents` read model: the current version of each agent, per tenant; the system
agents (shipped in `agents/`) are the tenant `@system` and shadowed, per tenant, by a
tenant's own agent of the same name."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from shared.contracts.events import SYSTEM_AGENTS, AgentDefined, RecordedEvent
from shared.infra.eventstore import EventStore, Projection

_enc = msgspec.json.Encoder()


class AgentsProjection(Projection):
    """`agents` table: the current version of each (tenant, name)."""

    name = "agents"
    handles = frozenset({"AgentDefined"})
    tables = ("agents",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        assert isinstance(e, AgentDefined)
        await conn.execute(
            "INSERT INTO agents (tenant, name, version, description, definition, markdown,"
            " updated_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)"
            " ON CONFLICT (tenant, name) DO UPDATE SET version = EXCLUDED.version,"
            " description = EXCLUDED.description, definition = EXCLUDED.definition,"
            " markdown = EXCLUDED.markdown, updated_at = EXCLUDED.updated_at",
            e.tenant, e.name, rec.stream_version, str(e.definition.get("description", "")),
            _enc.encode(e.definition).decode(), e.markdown, rec.recorded_at)


class AgentRow(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    name: str
    version: int
    definition: dict[str, Any]
    markdown: str

    @property
    def source(self) -> str:
        return "system" if self.tenant == SYSTEM_AGENTS else "tenant"


def _row(r: asyncpg.Record) -> AgentRow:
    return AgentRow(tenant=r["tenant"], name=r["name"], version=r["version"],
                    definition=msgspec.json.decode(r["definition"]), markdown=r["markdown"])


_COLUMNS = "SELECT tenant, name, version, definition::text AS definition, markdown FROM agents"


class AgentsReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def visible(self, tenant: str, name: str) -> AgentRow | None:
        """The tenant's own agent of that name, else the system one, else None."""
        row = await self.pool.fetchrow(
            f"{_COLUMNS} WHERE name = $2 AND tenant IN ($1, $3)"
            " ORDER BY (tenant = $3) LIMIT 1", tenant, name, SYSTEM_AGENTS)
        return _row(row) if row else None

    async def of_tenant(self, tenant: str) -> list[AgentRow]:
        """Every agent the tenant sees, by name: its own, and the system ones it does not
        shadow."""
        rows = await self.pool.fetch(
            f"SELECT DISTINCT ON (name) * FROM ({_COLUMNS} WHERE tenant IN ($1, $2)) a"
            " ORDER BY name, (tenant = $2)", tenant, SYSTEM_AGENTS)
        return [_row(r) for r in rows]
