"""MCP servers: a tenant registers one, a node lists its tools, the registry holds them.

`register` resolves the server's header secrets (`SecretStore`, for this request only),
picks a node with the fleet's selector, sends it a `ToolExecRequest` of kind "mcp", op
"list" on `nexus.node.<id>.tool` (`call_node`: the frame stream of
`shared.infra.streaming`), sorts the listing (`shared.domain.mcp.sort_listing`: unusable
names and invalid schemas are skipped with their reason) and records
`McpServerRegistered`. A server that hangs, dies or answers garbage is a
`McpServerFailed` (502, or 504 for a timeout) naming the server and the reason, in
bounded time (the server's `limits.timeout_s`, at most `MAX_LIST_S`, plus the stream's
grace), and nothing is recorded. The tools then are `mcp.<server>.<tool>` in the tool registry
(`tools`: the `McpToolSource` of `services/orchestrator/tools.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec

from shared.contracts import subjects
from shared.contracts.errors import (
    Conflict,
    InvalidRequest,
    McpServerFailed,
    NoNodeAvailable,
    NotFound,
)
from shared.contracts.events import (
    McpServerRegistered,
    McpServerRemoved,
    Metadata,
    mcpserver_stream,
    new_id,
)
from shared.contracts.frames import Failed, ToolDone
from shared.contracts.messages import ToolExecRequest, ToolLimits
from shared.domain.mcp import McpServer, exec_mcp, sort_listing, tool_spec
from shared.domain.tools import ToolSpec, http_host
from shared.infra.eventstore import EventStore, ProjectionRunner, WrongExpectedVersion
from shared.infra.messaging import Bus, MessagingError
from shared.infra.streaming import RemoteStreamError, StreamReceiver
from services.orchestrator.keys import Caller
from services.orchestrator.read_models.mcp_servers import McpServersReadModel
from services.orchestrator.schemas import (
    McpServerIn,
    McpServerList,
    McpServerOut,
    McpSkippedOut,
    McpToolOut,
)

log = logging.getLogger("nexus.orchestrator.mcp")

STREAM_GRACE_S = 5.0  # beyond the server's timeout: the node's own answer arrives first
MAX_LIST_S = 30.0  # a registration waits at most this long for tools/list, whatever the limits

Resolve = Callable[[str, tuple[str, ...]], Awaitable[dict[str, str]]]  # tenant, names -> values
PickNode = Callable[[], str]  # a node id, or raises shared.contracts.errors.NoNodeAvailable


async def call_node(bus: Bus, node_id: str, request: ToolExecRequest, *,
                    deadline_s: float) -> ToolDone | Failed:
    """Run one `ToolExecRequest` on a node: its `ToolDone` or `Failed`, a `Failed`
    ("node_lost") when the node vanishes or stalls, never longer than `deadline_s`."""
    try:
        async with asyncio.timeout(deadline_s):
            async with StreamReceiver(bus, subjects.node_tool(node_id), request,
                                      first_frame_timeout_s=min(deadline_s, 10.0)) as stream:
                async for frame in stream.frames():
                    if isinstance(frame, (ToolDone, Failed)):
                        return frame
    except TimeoutError:
        return Failed(error="timeout", detail=f"node {node_id} gave no answer within {deadline_s:g}s",
                      status=504)
    except (MessagingError, RemoteStreamError) as exc:
        return Failed(error="node_lost", detail=f"node {node_id}: {exc}"[:300], status=503)
    return Failed(error="node_lost", detail=f"node {node_id} ended the stream without an answer",
                  status=503)


def tool_node(tools: Any) -> PickNode:
    """The node picker of the tool calls (`ToolService.pick_node`: the fleet's selector)."""

    def pick() -> str:
        node = tools.pick_node(ToolSpec(name="mcp", kind="mcp"))
        if node is None:
            raise NoNodeAvailable("no online node can list an MCP server's tools now; retry shortly")
        return node

    return pick


class McpServerService:
    def __init__(self, store: EventStore, runner: ProjectionRunner, bus: Bus, *,
                 pick_node: PickNode, resolve: Resolve) -> None:
        self.store = store
        self.runner = runner
        self.bus = bus
        self.pick_node = pick_node
        self.resolve = resolve
        self.read_model = McpServersReadModel(store)

    # -- registration ------------------------------------------------------------------

    async def register(self, caller: Caller, data: McpServerIn) -> McpServerOut:
        if (data.url is None) == (data.command is None):
            raise InvalidRequest("give exactly one of url (Streamable HTTP) and command (stdio)",
                                 [{"field": "url", "message": "exactly one of url and command"}])
        if data.command is not None and data.headers:
            raise InvalidRequest("headers are for an HTTP server",
                                 [{"field": "headers", "message": "only with url"}])
        limits = msgspec.convert(msgspec.to_builtins(data.limits), ToolLimits)
        server = McpServer(tenant=caller.tenant, name=data.name, version=0,
                           transport="http" if data.url else "stdio", url=data.url,
                           command=tuple(data.command or ()), headers=dict(data.headers),
                           limits=limits, needs_approval=data.needs_approval, effect=data.effect)
        listed = await self._list_tools(server)
        tools, skipped = sort_listing(listed)
        event = McpServerRegistered(
            tenant=server.tenant, name=server.name, transport=server.transport, url=server.url,
            command=server.command, headers=server.headers, tools=tools, skipped=skipped,
            limits=msgspec.to_builtins(limits), needs_approval=server.needs_approval,
            effect=server.effect)
        result = await self.store.append(mcpserver_stream(caller.tenant, data.name), [event],
                                         expected_version=None,
                                         metadata=Metadata(tenant=caller.tenant, actor=caller.actor))
        await self.runner.wait_for(result.last_position, names=("mcp_servers",))
        log.info("mcp server registered", extra={"tenant": caller.tenant, "server": data.name,
                                                 "tools": len(tools), "skipped": len(skipped)})
        return _out(msgspec.structs.replace(server, version=result.next_expected_version,
                                            tools=tools, skipped=skipped))

    async def _list_tools(self, server: McpServer) -> object:
        try:
            headers = await self.resolve(server.tenant, tuple(sorted(set(server.headers.values()))))
        except NotFound as exc:
            fields = [f"headers.{h}" for h, n in server.headers.items() if n == exc.name]
            raise InvalidRequest(f"no secret named {exc.name!r} (PUT /v1/secrets/{exc.name} first)",
                                 [{"field": f, "message": "no such secret"} for f in fields]) from None
        values = {h: headers[name] for h, name in server.headers.items()}
        node = self.pick_node()
        limits = msgspec.structs.replace(server.limits,
                                         timeout_s=min(server.limits.timeout_s, MAX_LIST_S))
        request = ToolExecRequest(
            tool_call_id=new_id(), tenant=server.tenant, session_id="", tool=f"mcp.{server.name}",
            kind="mcp", target="tools/list", limits=limits,
            network=(http_host(server.url),) if server.url else (),
            mcp=exec_mcp("list", server, values))
        answer = await call_node(self.bus, node, request,
                                 deadline_s=limits.timeout_s + STREAM_GRACE_S)
        if isinstance(answer, Failed):
            raise McpServerFailed(server.name, answer.error,
                                  f"MCP server {server.name!r}: tools/list failed on node {node}: "
                                  f"{answer.error}: {answer.detail}"[:600])
        if answer.is_error or not isinstance(answer.result, list):
            raise McpServerFailed(server.name, "upstream_error",
                                  f"MCP server {server.name!r}: tools/list gave no tool list")
        return answer.result

    async def remove(self, caller: Caller, name: str) -> None:
        """Remove the tenant's server (`McpServerRemoved`): its tools leave the registry at
        once; calls already running finish. Another tenant's, or none: `NotFound`."""
        if await self.read_model.get(caller.tenant, name) is None:
            raise NotFound("MCP server", name)
        stream = mcpserver_stream(caller.tenant, name)
        try:
            result = await self.store.append(
                stream, [McpServerRemoved(tenant=caller.tenant, name=name, by=caller.actor)],
                expected_version=await self.store.stream_version(stream),
                metadata=Metadata(tenant=caller.tenant, actor=caller.actor))
        except WrongExpectedVersion:
            raise Conflict(f"MCP server {name!r} changed meanwhile; read it and retry") from None
        await self.runner.wait_for(result.last_position, names=("mcp_servers",))
        log.info("mcp server removed", extra={"tenant": caller.tenant, "server": name})

    # -- reads -------------------------------------------------------------------------

    async def of_tenant(self, caller: Caller) -> McpServerList:
        return McpServerList(servers=[_out(s) for s in await self.read_model.of_tenant(caller.tenant)])

    async def require(self, caller: Caller, name: str) -> McpServerOut:
        server = await self.read_model.get(caller.tenant, name)
        if server is None:
            raise NotFound("MCP server", name)
        return _out(server)

    # -- the tool registry's view (services/orchestrator/tools.py) ---------------------

    async def tools(self, tenant: str) -> list[tuple[ToolSpec, int]]:
        """Every usable tool of the tenant's servers as `mcp.<server>.<tool>` specs, each
        with its server's version (`services.orchestrator.tools.McpToolSource`)."""
        return [(tool_spec(s, t), s.version)
                for s in await self.read_model.of_tenant(tenant) for t in s.tools]


def _out(server: McpServer) -> McpServerOut:
    return McpServerOut(
        name=server.name, version=server.version, transport=server.transport,
        url=_shown_url(server.url), command=list(server.command), headers=dict(server.headers),
        tools=[McpToolOut(name=spec.name, tool=spec.target, description=spec.description,
                          parameters=spec.parameters)
               for spec in (tool_spec(server, t) for t in server.tools)],
        skipped=[McpSkippedOut(name=s.get("name", "?"), reason=s.get("reason", ""))
                 for s in server.skipped],
        limits=msgspec.to_builtins(server.limits), needs_approval=server.needs_approval,
        effect=server.effect)


def _shown_url(url: str | None) -> str | None:
    """The URL without credentials (user:password@) if a tenant put some in it."""
    if url is None:
        return None
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()

