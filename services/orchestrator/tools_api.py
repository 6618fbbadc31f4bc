"""`/v1/tools`, tool calls in a session, their approval, and `/v1/secrets`: thin handlers
over `ToolService` and `SecretStore`, scoped to the caller's tenant (another tenant's
session, tool, call or secret is a 404)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from shared.contracts.errors import InvalidEntity, NexusError
from shared.contracts.messages import ToolLimits
from shared.domain.tools import HttpTool, Permissions, ToolError, ToolSpec, validate_spec
from services.orchestrator import idempotency as idem
from services.orchestrator.auth import require_admin
from services.orchestrator.keys import Caller
from services.orchestrator.problems import problem_for
from services.orchestrator.schemas import (
    SECRET_NAME,
    SecretIn,
    SecretList,
    SecretOut,
    ToolApprovalIn,
    ToolCallView,
    ToolIn,
    ToolInvokeIn,
    ToolList,
    ToolOut,
)
from services.orchestrator.secrets import SecretStore
from services.orchestrator.tools import ToolService

AnyToolName = Annotated[str, Parameter(min_length=1, max_length=200,
                                       pattern=r"^[a-z][a-z0-9_.-]{0,199}$")]
SecretName = Annotated[str, Parameter(pattern=SECRET_NAME)]


def spec_of(data: ToolIn) -> ToolSpec:
    """The definition as a checked `ToolSpec`; `InvalidEntity` (422) naming each field."""
    try:
        return validate_spec(ToolSpec(
            name=data.name, description=data.description, kind=data.kind, builtin=data.builtin,
            parameters=data.parameters if data.parameters is not None else {"type": "object"},
            permissions=Permissions(network="none" if data.permissions.network == "none"
                                    else tuple(data.permissions.network),
                                    filesystem=data.permissions.filesystem),
            limits=msgspec.convert(msgspec.to_builtins(data.limits), ToolLimits),
            needs_approval=data.needs_approval, effect=data.effect,
            http=HttpTool(**msgspec.structs.asdict(data.http)) if data.http else None,
            node_labels=dict(data.node_labels)))
    except ToolError as exc:
        raise InvalidEntity(f"the tool definition is invalid: {exc}", exc.errors,
                            "tool.definition") from None


async def _edge(work: Any) -> Any:
    try:
        return await work
    except NexusError as exc:
        raise problem_for(exc) from None


def _call_answer(view: ToolCallView) -> idem.Recorded:
    return idem.Recorded.json(view, status=202 if view.status == "pending_approval" else 200)


class ToolsController(Controller):
    path = "/v1/tools"

    @get("/")
    async def list_tools(self, caller: Caller, tool_service: ToolService) -> ToolList:
        """Every tool the tenant can call: builtins, its own, its MCP servers' tools."""
        return ToolList(tools=await tool_service.list(caller))

    @post("/", status_code=201, responses=idem.RESPONSES)
    async def define_tool(self, request: Request, data: ToolIn, caller: Caller,
                          tool_service: ToolService, idempotency: idem.IdempotencyStore,
                          idempotency_key: idem.KeyHeader = None) -> Response[ToolOut]:
        """Define a tool, or a new version of it (admin)."""
        require_admin(caller)

        async def run() -> idem.Recorded:
            out = await tool_service.define(caller, spec_of(data), expected_version=data.expected_version)
            return idem.Recorded.json(out, status=201)

        return await idem.run_once(request, caller.tenant, idempotency,  # type: ignore[return-value]
                                   lambda: _edge(run()))

    @get("/{name:str}")
    async def get_tool(self, name: AnyToolName, caller: Caller, tool_service: ToolService) -> ToolOut:
        return await tool_service.get(caller, name)


class ToolCallsController(Controller):
    path = "/v1/sessions/{session_id:str}"

    @post("/tools/{name:str}/invoke", status_code=200, responses={
        **idem.RESPONSES, 202: ResponseSpec(ToolCallView, description=(
            "The call waits for a human's approval (POST .../tool-calls/{call_id}/approval)"))})
    async def invoke_tool(self, request: Request, session_id: str, name: AnyToolName,
                          data: ToolInvokeIn, caller: Caller, tool_service: ToolService,
                          idempotency: idem.IdempotencyStore,
                          idempotency_key: idem.KeyHeader = None) -> Response[ToolCallView]:
        """Call a tool in the session: its outcome, or 202 while it waits for approval."""
        key = idem.validate_key(idempotency_key)  # a retry finds its earlier attempt's call
        call_id = str(idem.derived_id(caller.tenant, key, f"tool-call {session_id} {name}")) \
            if key else None

        async def run() -> idem.Recorded:
            return _call_answer(await tool_service.invoke(caller, session_id, name, data.arguments,
                                                   run_id=data.run_id, call_id=call_id,
                                                   retry=call_id is not None))

        return await idem.run_once(request, caller.tenant, idempotency,  # type: ignore[return-value]
                                   lambda: _edge(run()))

    @get("/tool-calls/{call_id:str}")
    async def get_tool_call(self, session_id: str, call_id: str, caller: Caller,
                            tool_service: ToolService) -> ToolCallView:
        return await tool_service.call(caller, session_id, call_id)

    @post("/tool-calls/{call_id:str}/approval", status_code=200, responses=idem.RESPONSES)
    async def approve_tool_call(self, request: Request, session_id: str, call_id: str,
                                data: ToolApprovalIn, caller: Caller, tool_service: ToolService,
                                idempotency: idem.IdempotencyStore,
                                idempotency_key: idem.KeyHeader = None) -> Response[ToolCallView]:
        """Approve (it runs now; the answer is its outcome) or reject a pending call (admin)."""
        require_admin(caller)

        async def run() -> idem.Recorded:
            return _call_answer(await tool_service.answer_approval(
                caller, session_id, call_id, approve=data.approve, reason=data.reason))

        return await idem.run_once(request, caller.tenant, idempotency,  # type: ignore[return-value]
                                   lambda: _edge(run()))


class SecretsController(Controller):
    """Tenant secrets (admin): set, list names, delete. A value is never answered."""

    path = "/v1/secrets"

    @put("/{name:str}", status_code=200)
    async def put_secret(self, name: SecretName, data: SecretIn, caller: Caller,
                         secret_store: SecretStore) -> SecretOut:
        require_admin(caller)
        out, _ = await secret_store.put(caller.tenant, name, data.value)
        return out

    @get("/")
    async def list_secrets(self, caller: Caller, secret_store: SecretStore) -> SecretList:
        require_admin(caller)
        return SecretList(secrets=await secret_store.names(caller.tenant))

    @delete("/{name:str}", status_code=204)
    async def delete_secret(self, name: SecretName, caller: Caller, secret_store: SecretStore) -> None:
        require_admin(caller)
        await secret_store.delete(caller.tenant, name)
