"""`/v1/mcp-servers`: a tenant's MCP servers (register: lists its tools through a node;
remove). Registering honours `Idempotency-Key` (a retry answers the first registration,
listing the server's tools once)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter

from shared.contracts.errors import NexusError
from services.orchestrator import idempotency as idem
from services.orchestrator.keys import Caller
from services.orchestrator.mcp_servers import McpServerService
from services.orchestrator.problems import problem_for
from services.orchestrator.schemas import McpServerIn, McpServerList, McpServerOut

ServerName = Annotated[str, Parameter(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]{0,63}$")]


class McpServersController(Controller):
    path = "/v1/mcp-servers"

    @post("/", status_code=201, responses=idem.RESPONSES)
    async def register_mcp_server(self, request: Request, data: McpServerIn, caller: Caller,
                                  mcp_server_service: McpServerService,
                                  idempotency: idem.IdempotencyStore,
                                  idempotency_key: idem.KeyHeader = None) -> Response[McpServerOut]:
        """Register (or re-register: a new version) an MCP server; a node lists its tools,
        which become `mcp.<name>.<tool>`. A server that fails to list is a 502 (504 when it
        did not answer in `limits.timeout_s`) naming it and the reason; nothing is kept."""
        async def run() -> idem.Recorded:
            try:
                out = await mcp_server_service.register(caller, data)
            except NexusError as exc:
                raise problem_for(exc) from None
            return idem.Recorded.json(out, status=201)

        return await idem.run_once(request, caller.tenant, idempotency, run)  # type: ignore[return-value]

    @get("/")
    async def list_mcp_servers(self, caller: Caller, mcp_server_service: McpServerService) -> McpServerList:
        return await mcp_server_service.of_tenant(caller)

    @get("/{name:str}")
    async def get_mcp_server(self, name: str, caller: Caller,
                             mcp_server_service: McpServerService) -> McpServerOut:
        return await mcp_server_service.require(caller, name)

    @delete("/{name:str}", status_code=204)
    async def remove_mcp_server(self, name: ServerName, caller: Caller,
                                mcp_server_service: McpServerService) -> None:
        """Remove the server: its tools leave the registry (`McpServerRemoved`)."""
        await mcp_server_service.remove(caller, name)
