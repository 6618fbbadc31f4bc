"""API keys and the callers they identify.

A key looks like `nx_<key_id>_<secret>`; only its SHA-256 is stored (in the
`ApiKeyCreated` event and the `api_keys` projection), and it is shown once. The
bootstrap platform-admin key comes from `NEXUS_ADMIN_KEY` and is never stored.

Roles: `platform` (the bootstrap key: every tenant, node administration), `admin`
(manages its own tenant: keys, policies, budgets), `member` (uses the API).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from shared.contracts.events import ApiKeyCreated, ApiKeyRevoked, Metadata, apikey_stream
from shared.infra.eventstore import EventStore, WrongExpectedVersion
from services.orchestrator import idempotency
from services.orchestrator.read_models.api_keys import ApiKeysReadModel
from services.orchestrator.schemas import KeyView

KEY_PATTERN = re.compile(r"^nx_([0-9a-f]{16})_([A-Za-z0-9_-]{20,})$")
ROLES = ("admin", "member")
CACHE_TTL_S = 5.0  # a revoked key stops working within this time on every orchestrator


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key_id, key): a fresh key, to be shown once."""
    key_id = secrets.token_hex(8)
    return key_id, f"nx_{key_id}_{secrets.token_urlsafe(32)}"


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str
    role: str  # "platform", "admin" or "member"

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}"

    @property
    def is_admin(self) -> bool:
        return self.role in ("platform", "admin")


@dataclass
class IssuedKey:
    key_id: str
    key: str
    tenant: str
    name: str
    role: str


class KeyService:
    def __init__(self, store: EventStore, admin_key: str | None, runner=None) -> None:
        self.store = store
        self.runner = runner  # a ProjectionRunner: answer after the key is usable
        self.read_model = ApiKeysReadModel(store)
        self._admin_hash = hash_key(admin_key) if admin_key else None
        # mixed into derived keys: the platform's secret, which no tenant holds
        self._server_secret = hashlib.sha256(f"nexus-derived-keys\x00{admin_key or ''}".encode()).digest()
        # key id -> (when read, (its hash, its caller; None: revoked) or None: no such key)
        self._cache: dict[str, tuple[float, tuple[str, Caller | None] | None]] = {}

    async def create(self, tenant: str, name: str, role: str, actor: str, *,
                     retry_of: tuple[str, str, str] | None = None) -> IssuedKey:
        """Issue a key. `retry_of` = (the caller's own key, Idempotency-Key, request hash):
        the new key is derived from them (HMAC under the caller's key together with the
        platform's secret, so neither a caller's key nor a leak of it alone recomputes the
        new key; nothing more is stored), so a retry issues the very same key again,
        as a duplicate of the first event, and another request under the same
        Idempotency-Key (another body or caller) collides with it: a 422."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        event_ids = None
        if retry_of is None:
            key_id, key = new_key()
        else:
            caller_key, idem_key, request_hash = retry_of
            key_id = idempotency.derived_id(tenant, idem_key, "api-key").hex[:16]
            secret = hmac.new(self._server_secret + caller_key.encode(),
                              f"{tenant}\x00{idem_key}\x00{request_hash}".encode(),
                              hashlib.sha256).digest()
            key = f"nx_{key_id}_{base64.urlsafe_b64encode(secret).rstrip(b'=').decode()}"
            event_ids = [idempotency.derived_id(tenant, idem_key, f"api-key:{hash_key(key)}")]
        try:
            result = await self.store.append(
                apikey_stream(key_id),
                [ApiKeyCreated(key_id=key_id, tenant=tenant, name=name, role=role, key_hash=hash_key(key))],
                expected_version=0, metadata=Metadata(tenant=tenant, actor=actor),
                event_ids=event_ids)
        except WrongExpectedVersion:
            if retry_of is None:
                raise
            raise idempotency.reused() from None
        if self.runner is not None:
            await self.runner.wait_for(result.last_position, names=("api_keys",))
        return IssuedKey(key_id, key, tenant, name, role)

    async def revoke(self, key_id: str, tenant: str | None, actor: str) -> bool:
        """Revoke a key (of `tenant`, or any tenant when None); False if there is none."""
        owner = await self.read_model.active_tenant(key_id, tenant)
        if owner is None:
            return False
        stream = apikey_stream(key_id)
        await self.store.append(stream, [ApiKeyRevoked(key_id=key_id, tenant=owner, actor=actor)],
                                expected_version=await self.store.stream_version(stream),
                                metadata=Metadata(tenant=owner, actor=actor))
        self._cache.pop(key_id, None)
        return True

    async def of_tenant(self, tenant: str) -> list[KeyView]:
        """The tenant's keys (revoked ones too), oldest first."""
        return await self.read_model.of_tenant(tenant)

    async def still_active(self, key_id: str) -> Caller | None:
        """The caller of an issued key that is still active (not revoked), by its id, or
        None; "admin" is the bootstrap key when one is configured. For sessions derived
        from a key (the dashboard's cookie): revoking the key ends them (same 5 s cache)."""
        if key_id == "admin":
            return Caller(tenant="default", key_id="admin", role="platform") if self._admin_hash else None
        entry = await self._entry(key_id)
        return entry[1] if entry is not None else None

    async def authenticate(self, key: str, tenant_header: str | None = None) -> Caller | None:
        """The caller a presented key identifies, or None (constant-time comparisons)."""
        digest = hash_key(key)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return Caller(tenant=tenant_header or "default", key_id="admin", role="platform")
        match = KEY_PATTERN.match(key)
        if not match:
            return None
        entry = await self._entry(match.group(1))
        if entry is None or not hmac.compare_digest(digest, entry[0]):
            return None
        return entry[1]

    async def _entry(self, key_id: str) -> tuple[str, Caller | None] | None:
        """(the key's hash, its caller; None once revoked), or None: no such key. Read at
        most every CACHE_TTL_S; misses are not cached: a key just issued elsewhere works
        at once."""
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > CACHE_TTL_S:
            row = await self.read_model.lookup(key_id)
            caller = None if row is None or row.revoked else \
                Caller(tenant=row.tenant, key_id=key_id, role=row.role)
            cached = (now, (row.key_hash, caller) if row is not None else None)
            if row is not None:
                self._cache[key_id] = cached
        return cached[1]
