"""MCP servers a tenant registers, and their tools as the registry's `ToolSpec`s.

Pure: the orchestrator (`services/orchestrator/mcp_servers.py`) lists a server's tools
through a node and records `McpServerRegistered`; this module decides which listed tools
are usable and what each becomes.

- A server's name matches `SERVER_NAME` (no dots: the registry name of its tool `t` is
  `mcp.<server>.<t>`, so it can never be a builtin's or a tenant tool's name: a listed
  tool called `python` is `mcp.<server>.python` and never shadows the builtin).
- A listed tool is kept when its name matches `MCP_TOOL_NAME` and its `inputSchema` is
  a JSON Schema of an object that `shared.domain.tools.schema_problems` accepts (the
  same check as a tenant's own tool: linear-time patterns, no remote `$ref`, bounded
  size); otherwise it is skipped with the reason, never failing the registration.
- `exec_mcp` is the `ToolExecRequest.mcp` body the node's `services/node/mcp_client.py`
  takes (`op` "list" or "call"; headers with secret *values*, resolved for one call).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from shared.contracts.messages import ToolLimits
from shared.domain.tools import (
    MCP_PREFIX,
    McpTarget,
    Permissions,
    ToolSpec,
    mcp_tool_name,
    schema_problems,
)

SERVER_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
MCP_TOOL_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
MAX_DESCRIPTION = 2000


class McpServer(msgspec.Struct, frozen=True, kw_only=True):
    """A registered server as the registry holds it (from `McpServerRegistered`)."""

    tenant: str
    name: str
    version: int
    transport: Literal["http", "stdio"]
    url: str | None = None
    command: tuple[str, ...] = ()
    headers: dict[str, str] = {}  # header -> the name of a tenant secret
    tools: tuple[dict[str, Any], ...] = ()  # usable tools: name, description, inputSchema
    skipped: tuple[dict[str, str], ...] = ()  # name, reason
    limits: ToolLimits = ToolLimits()
    needs_approval: bool = False
    effect: Literal["read_only", "idempotent", "side_effecting"] = "side_effecting"


def sort_listing(listed: object) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, str], ...]]:
    """(usable tools, skipped tools with their reason) of a `tools/list` answer."""
    usable: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    for item in listed if isinstance(listed, (list, tuple)) else ():
        if not isinstance(item, dict):
            skipped.append({"name": "?", "reason": "not a tool object"})
            continue
        name = item.get("name")
        shown = str(name)[:128]
        if not isinstance(name, str) or not re.match(MCP_TOOL_NAME, name):
            skipped.append({"name": shown, "reason": f"unusable name: must match {MCP_TOOL_NAME}"})
            continue
        if name in seen:
            skipped.append({"name": shown, "reason": "listed twice"})
            continue
        problems = schema_problems(item.get("inputSchema"), "inputSchema")
        if problems:
            why = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
            skipped.append({"name": shown, "reason": why[:500]})
            continue
        seen.add(name)
        description = item.get("description")
        usable.append({"name": name,
                       "description": description[:MAX_DESCRIPTION] if isinstance(description, str) else "",
                       "inputSchema": item["inputSchema"]})
    return tuple(usable), tuple(skipped)


def tool_spec(server: McpServer, tool: dict[str, Any]) -> ToolSpec:
    """The registry's `ToolSpec` of one usable tool of `server`: kind "mcp", named
    `mcp.<server>.<tool>`, the tool's inputSchema as its parameters, the server's
    limits, approval and effect; network: the server's own host (HTTP) or none."""
    return ToolSpec(
        name=mcp_tool_name(server.name, tool["name"]),
        description=tool.get("description", ""),
        parameters=tool["inputSchema"],
        kind="mcp",
        permissions=Permissions(),
        limits=server.limits,
        needs_approval=server.needs_approval,
        effect=server.effect,
        mcp=McpTarget(server=server.name, tool=tool["name"], transport=server.transport,
                      url=server.url, command=server.command, headers=dict(server.headers)))


def tool_specs(server: McpServer) -> list[ToolSpec]:
    return [tool_spec(server, tool) for tool in server.tools]


def split_name(name: str) -> tuple[str, str] | None:
    """`mcp.<server>.<tool>` -> (server, tool); None for any other name."""
    if not name.startswith(MCP_PREFIX):
        return None
    server, sep, tool = name[len(MCP_PREFIX):].partition(".")
    return (server, tool) if sep and server and tool else None


def exec_mcp(op: Literal["list", "call"], target: McpTarget | McpServer,
             headers: dict[str, str], tool: str | None = None) -> dict[str, Any]:
    """`ToolExecRequest.mcp` for `op` on a server; `headers` hold the resolved secret
    values (this request only: never in an event or a log)."""
    body: dict[str, Any] = {"op": op, "transport": target.transport, "headers": headers}
    if target.transport == "http":
        body["url"] = target.url
    else:
        body["command"] = list(target.command)
    if op == "call":
        body["tool"] = tool if tool is not None else getattr(target, "tool", None)
    return body
