"""Tenant secrets: values that HTTP tools and MCP servers send as headers, referenced by
name everywhere else (definitions, events, logs, errors never hold a value).

The `tenant_secrets` table is technical state, not events (an event is forever and
replicated to every reader; a secret must be replaceable and deletable): this module
alone reads and writes it. Values are sealed with AES-256-GCM under a key derived from
the platform's secret (the admin key the orchestrator already holds), the tenant and
name bound as associated data, so a row copied to another tenant or name does not
open. A value is opened only to build one `ToolExecRequest` for one call.
"""

from __future__ import annotations

import hashlib
import os
import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.contracts.errors import Conflict, NotFound
from services.orchestrator.schemas import SecretOut

MAX_SECRETS_PER_TENANT = 1000


class SecretStore:
    """The `tenant_secrets` table: its only reader and writer."""

    def __init__(self, pool: asyncpg.Pool, platform_secret: str | None) -> None:
        self.pool = pool
        self._aead = (AESGCM(hashlib.sha256(b"nexus-tenant-secrets\x00"
                                            + platform_secret.encode()).digest())
                      if platform_secret else None)

    def _sealer(self) -> AESGCM:
        if self._aead is None:
            raise Conflict("secrets need the platform's secret (NEXUS_ADMIN_KEY) to be sealed")
        return self._aead

    async def put(self, tenant: str, name: str, value: str) -> tuple[SecretOut, bool]:
        """Create or replace a secret; (its listing, whether it is new)."""
        nonce = os.urandom(12)
        sealed = nonce + self._sealer().encrypt(nonce, value.encode(), f"{tenant}\x00{name}".encode())
        row = await self.pool.fetchrow(
            "INSERT INTO tenant_secrets AS s (tenant, name, ciphertext)"
            " SELECT $1, $2, $3 WHERE (SELECT count(*) FROM tenant_secrets WHERE tenant = $1) < $4"
            " OR EXISTS (SELECT 1 FROM tenant_secrets WHERE tenant = $1 AND name = $2)"
            " ON CONFLICT (tenant, name) DO UPDATE SET ciphertext = EXCLUDED.ciphertext,"
            " updated_at = now() RETURNING created_at, updated_at, (xmax = 0) AS created",
            tenant, name, sealed, MAX_SECRETS_PER_TENANT)
        if row is None:
            raise Conflict(f"a tenant keeps at most {MAX_SECRETS_PER_TENANT} secrets")
        return SecretOut(name=name, created_at=row["created_at"],
                         updated_at=row["updated_at"]), bool(row["created"])

    async def names(self, tenant: str) -> list[SecretOut]:
        rows = await self.pool.fetch(
            "SELECT name, created_at, updated_at FROM tenant_secrets WHERE tenant = $1"
            " ORDER BY name", tenant)
        return [SecretOut(name=r["name"], created_at=r["created_at"], updated_at=r["updated_at"])
                for r in rows]

    async def delete(self, tenant: str, name: str) -> None:
        done = await self.pool.execute(
            "DELETE FROM tenant_secrets WHERE tenant = $1 AND name = $2", tenant, name)
        if done.split()[-1] == "0":
            raise NotFound("secret", name)

    async def resolve(self, tenant: str, names: tuple[str, ...]) -> dict[str, str]:
        """The values of `names` (for one call only); a missing one is `NotFound`."""
        if not names:
            return {}
        rows = await self.pool.fetch(
            "SELECT name, ciphertext FROM tenant_secrets WHERE tenant = $1 AND name = ANY($2::text[])",
            tenant, list(names))
        sealed = {r["name"]: bytes(r["ciphertext"]) for r in rows}
        values = {}
        for name in names:
            if name not in sealed:
                raise NotFound("secret", name)
            blob = sealed[name]
            try:
                values[name] = self._sealer().decrypt(blob[:12], blob[12:],
                                                      f"{tenant}\x00{name}".encode()).decode()
            except InvalidTag:
                raise Conflict(f"secret {name!r} cannot be opened (was the platform's secret "
                               "changed?); set it again") from None
        return values
