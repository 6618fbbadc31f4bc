"""The `mcp_servers` read model: each tenant's MCP servers at their current registration,
with the tools they listed (and those skipped, with the reason)."""

from __future__ import annotations

import asyncpg
import msgspec

from shared.contracts.events import McpServerRegistered, McpServerRemoved, RecordedEvent
from shared.contracts.messages import ToolLimits
from shared.domain.mcp import McpServer
from shared.infra.eventstore import EventStore, Projection

_enc = msgspec.json.Encoder()


class McpServersProjection(Projection):
    """`mcp_servers` table: the current registration of each tenant's MCP servers (a
    removed one has no row)."""

    name = "mcp_servers"
    handles = frozenset({"McpServerRegistered", "McpServerRemoved"})
    tables = ("mcp_servers",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        if isinstance(e, McpServerRemoved):
            await conn.execute("DELETE FROM mcp_servers WHERE tenant = $1 AND name = $2",
                               e.tenant, e.name)
            return
        assert isinstance(e, McpServerRegistered)
        await conn.execute(
            "INSERT INTO mcp_servers (tenant, name, version, transport, url, command, headers,"
            " tools, skipped, limits, needs_approval, effect, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8::jsonb, $9::jsonb, $10::jsonb,"
            " $11, $12, $13) ON CONFLICT (tenant, name) DO UPDATE SET version = EXCLUDED.version,"
            " transport = EXCLUDED.transport, url = EXCLUDED.url, command = EXCLUDED.command,"
            " headers = EXCLUDED.headers, tools = EXCLUDED.tools, skipped = EXCLUDED.skipped,"
            " limits = EXCLUDED.limits, needs_approval = EXCLUDED.needs_approval,"
            " effect = EXCLUDED.effect, updated_at = EXCLUDED.updated_at",
            e.tenant, e.name, rec.stream_version, e.transport, e.url,
            _enc.encode(list(e.command)).decode(), _enc.encode(e.headers).decode(),
            _enc.encode(list(e.tools)).decode(), _enc.encode(list(e.skipped)).decode(),
            _enc.encode(e.limits).decode(), e.needs_approval, e.effect, rec.recorded_at)


_COLUMNS = ("SELECT tenant, name, version, transport, url, command::text AS command,"
            " headers::text AS headers, tools::text AS tools, skipped::text AS skipped,"
            " limits::text AS limits, needs_approval, effect FROM mcp_servers")


def _server(row: asyncpg.Record) -> McpServer:
    dec = msgspec.json.decode
    return McpServer(tenant=row["tenant"], name=row["name"], version=row["version"],
                     transport=row["transport"], url=row["url"],
                     command=tuple(dec(row["command"])), headers=dec(row["headers"]),
                     tools=tuple(dec(row["tools"])), skipped=tuple(dec(row["skipped"])),
                     limits=msgspec.convert(dec(row["limits"]), ToolLimits),
                     needs_approval=row["needs_approval"], effect=row["effect"])


class McpServersReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def get(self, tenant: str, name: str) -> McpServer | None:
        row = await self.pool.fetchrow(f"{_COLUMNS} WHERE tenant = $1 AND name = $2", tenant, name)
        return _server(row) if row else None

    async def of_tenant(self, tenant: str) -> list[McpServer]:
        """The tenant's servers with their tools, by name."""
        rows = await self.pool.fetch(f"{_COLUMNS} WHERE tenant = $1 ORDER BY name", tenant)
        return [_server(r) for r in rows]
