"""The `api_keys` read model: key id, tenant, role and the key's hash; revocations."""

from __future__ import annotations

import asyncpg
import msgspec

from shared.contracts.events import ApiKeyCreated, ApiKeyRevoked, RecordedEvent
from shared.infra.eventstore import EventStore, Projection
from services.orchestrator.schemas import KeyView


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


class StoredKey(msgspec.Struct, frozen=True):
    """What authentication needs of a key."""

    tenant: str
    role: str
    key_hash: str
    revoked: bool


class ApiKeysReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def lookup(self, key_id: str) -> StoredKey | None:
        row = await self.pool.fetchrow(
            "SELECT tenant, role, key_hash, revoked_at IS NOT NULL AS revoked"
            " FROM api_keys WHERE key_id = $1", key_id)
        return StoredKey(**dict(row)) if row else None

    async def active_tenant(self, key_id: str, tenant: str | None) -> str | None:
        """The tenant of an unrevoked key (of `tenant`, or of any tenant when None)."""
        return await self.pool.fetchval(
            "SELECT tenant FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL"
            " AND ($2::text IS NULL OR tenant = $2)", key_id, tenant)

    async def of_tenant(self, tenant: str) -> list[KeyView]:
        rows = await self.pool.fetch(
            "SELECT key_id, tenant, name, role, created_at, revoked_at FROM api_keys"
            " WHERE tenant = $1 ORDER BY created_at", tenant)
        return [KeyView(**dict(r)) for r in rows]
