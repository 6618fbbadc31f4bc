"""`/v1/mcp-servers`: a tenant's MCP servers (register: lists its tools through a node)."""

from __future__ import annotations

from litestar import Controller, get, post

from services.orchestrator.keys import Caller
from services.orchestrator.mcp_servers import McpServerService
from services.orchestrator.schemas import McpServerIn, McpServerList, McpServerOut


class McpServersController(Controller):
    path = "/v1/mcp-servers"

    @post("/", status_code=201)
    async def register_mcp_server(self, data: McpServerIn, caller: Caller,
                                  mcp_server_service: McpServerService) -> McpServerOut:
        """Register (or re-register: a new version) an MCP server; a node lists its tools,
        which become `mcp.<name>.<tool>`. A server that fails to list is a 502 (504 when it
        did not answer in `limits.timeout_s`) naming it and the reason; nothing is kept."""
        return await mcp_server_service.register(caller, data)

    @get("/")
    async def list_mcp_servers(self, caller: Caller, mcp_server_service: McpServerService) -> McpServerList:
        return await mcp_server_service.of_tenant(caller)

    @get("/{name:str}")
    async def get_mcp_server(self, name: str, caller: Caller,
                             mcp_server_service: McpServerService) -> McpServerOut:
        return await mcp_server_service.require(caller, name)
