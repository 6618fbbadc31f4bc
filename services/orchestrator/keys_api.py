"""`/v1/keys`: admins issue and revoke API keys of their tenant (the platform key: any)."""

from __future__ import annotations

from litestar import Controller, Request, delete, get, post

from services.orchestrator import idempotency
from services.orchestrator.auth import require_admin
from services.orchestrator.keys import KeyService, Caller
from services.orchestrator.problems import Problem
from services.orchestrator.schemas import KeyCreate, KeyIssued, KeyList


class KeysController(Controller):
    path = "/v1/keys"

    @post("/", status_code=201, responses={422: idempotency.RESPONSES[422]})
    async def create_key(self, request: Request, data: KeyCreate, caller: Caller,
                         keys: KeyService,
                         idempotency_key: idempotency.KeyHeader = None) -> KeyIssued:
        require_admin(caller)
        tenant = caller.tenant
        if data.tenant is not None and data.tenant != tenant:
            if caller.role != "platform":
                raise Problem(403, "forbidden", "only the platform admin key creates keys of other tenants")
            tenant = data.tenant
        idem = idempotency.validate_key(request.headers.get(idempotency.HEADER))
        caller_key = request.headers.get("authorization", "").partition(" ")[2].strip()
        issued = await keys.create(
            tenant, data.name, data.role, caller.actor,
            retry_of=(caller_key, idem, idempotency.body_hash(await request.body()))
            if idem else None)
        return KeyIssued(key_id=issued.key_id, key=issued.key, tenant=issued.tenant,
                         name=issued.name, role=issued.role)

    @get("/")
    async def list_keys(self, caller: Caller, keys: KeyService) -> KeyList:
        require_admin(caller)
        return KeyList(keys=tuple(await keys.of_tenant(caller.tenant)))

    @delete("/{key_id:str}", status_code=204)
    async def revoke_key(self, key_id: str, caller: Caller, keys: KeyService) -> None:
        require_admin(caller)
        scope = None if caller.role == "platform" else caller.tenant
        if not await keys.revoke(key_id, scope, caller.actor):
            raise Problem(404, "not-found", f"key {key_id!r} not found")
