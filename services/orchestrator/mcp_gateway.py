"""`/v1/mcp`: Nexus as an MCP server (Streamable HTTP, stateless), for any MCP client.

The official SDK's low-level `Server` answers the protocol; it is mounted into the
Litestar app as an ASGI route, behind the same Bearer-key middleware as every route.
A client names its session with the `X-Nexus-Session` header (as on the OpenAI-
compatible routes) or the `session` query parameter (for clients that cannot set
headers); without one, or with another tenant's, the answer is a problem+json 400/404
before any MCP is spoken.

- `tools/list`: exactly the tools the caller may call in that session: the builtins,
  the tenant's tools and its MCP servers' tools (`ToolService.list`), those the
  session's policy allows (`evaluate_tool`; a session without a policy allows none).
- `tools/call`: `ToolService.invoke`, so the schema check, policy, approval, rate limits
  and the `ToolCall*` audit events are those of `POST /v1/sessions/{id}/tools/{name}/invoke`.
  A finished call answers its output as text (and its JSON result as
  `structuredContent`), `isError` when the tool reported a failure or the call failed;
  a call that needs approval answers `isError` with text naming the tool call id and
  how to approve it (`structuredContent`: `tool_call_id`, `status`); a denial or
  arguments failing the schema answer `isError` with the rule and reason. Each result's
  `_meta` carries `nexus/tool_call_id`. An unknown tool is a JSON-RPC error.
- `Idempotency-Key` (an HTTP header on the tools/call request, as on the REST routes;
  MCP clients can set headers on their HTTP client): a retried call with the same key,
  tool and arguments in the same session answers the first call's result (its `_meta`
  has `nexus/idempotent_replayed`) instead of running the tool again; the same key with
  another call is an `isError` result saying so; a retry while the first still runs
  waits for it (NEXUS_IDEMPOTENCY_WAIT_S), then is an `isError` "still running". The
  record is the REST routes' (`idempotency.IdempotencyStore`, per tenant, kept a day).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
import msgspec
from litestar import Litestar
from litestar.handlers import asgi
from litestar.types import Receive, Scope, Send
from mcp.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from shared import __version__
from shared.contracts.errors import (
    InvalidEntity,
    NexusError,
    NoNodeAvailable,
    NotFound,
    PolicyDenied,
    SessionClosed,
)
from services.orchestrator import idempotency as idem
from services.orchestrator.keys import Caller
from services.orchestrator.problems import Problem

log = logging.getLogger("nexus.orchestrator.mcp_gateway")

PATH = "/v1/mcp"
SESSION_HEADER = "x-nexus-session"
SESSION_QUERY = "session"
SCOPE_KEY = "nexus.mcp"  # (Caller, session_id, app state, Idempotency-Key), on the ASGI scope
IDEMPOTENCY_ROUTE = "MCP tools/call"  # the idempotency record's route (one per tenant and key)


def _who(ctx: Any) -> tuple[Caller, str, Any, str | None]:
    return ctx.request.scope[SCOPE_KEY]


def _text(value: str) -> list[types.ContentBlock]:
    return [types.TextContent(text=value)]


class McpGateway:
    """The MCP server and its session manager (run it with `lifespan`)."""

    def __init__(self, max_body_bytes: int) -> None:
        self.server = Server("nexus", version=__version__,
                             instructions="Nexus tools: each call is decided by the session's "
                                          "policy, audited and counted against the session.",
                             on_list_tools=self._list_tools, on_call_tool=self._call_tool)
        self.manager = StreamableHTTPSessionManager(
            self.server, stateless=True, json_response=True,
            max_request_body_size=max_body_bytes,
            # Bearer keys, not cookies: a rebinding page cannot use them, and hosts vary.
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        async with self.manager.run():
            yield

    def route(self) -> Any:
        gateway = self

        @asgi(PATH, copy_scope=True)  # one exact path: /v1/mcp-servers is not under it
        async def mcp_gateway(scope: Scope, receive: Receive, send: Send) -> None:
            await gateway.serve(scope, receive, send)

        return mcp_gateway

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = scope.get("user")
        if not isinstance(caller, Caller):
            raise Problem(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        session_id = headers.get(SESSION_HEADER) or _query(scope, SESSION_QUERY)
        if not session_id:
            raise Problem(400, "validation", "name the session: the X-Nexus-Session header or the "
                          "`session` query parameter",
                          errors=[{"field": "X-Nexus-Session", "message": "required"}])
        state = scope["app"].state
        await state.sessions.require(caller, session_id)  # another tenant's: 404
        key = idem.validate_key(headers.get(idem.HEADER))
        scope[SCOPE_KEY] = (caller, session_id, state, key)  # type: ignore[typeddict-unknown-key]
        await self.manager.handle_request(scope, receive, send)  # type: ignore[arg-type]

    # -- MCP handlers ----------------------------------------------------------------------

    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        caller, session_id, state, _ = _who(ctx)
        session = await state.sessions.require(caller, session_id)
        policy, _ = await state.policies.compiled(caller.tenant, session.policy,
                                                  session.policy_version, session.policy_rules)
        if policy is None or session.status != "open":
            return types.ListToolsResult(tools=[])
        tools = [t for t in await state.tools.list(caller) if policy.evaluate_tool(t.name).allowed]
        return types.ListToolsResult(tools=[
            types.Tool(name=t.name, description=_describe(t), input_schema=t.parameters)
            for t in tools])

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        caller, session_id, state, key = _who(ctx)
        if key is None:
            return await self._invoke(caller, session_id, state, params)
        request_hash = idem.body_hash(msgspec.json.encode(
            [session_id, params.name, params.arguments or {}]))
        try:
            got = await state.idempotency.begin(caller.tenant, IDEMPOTENCY_ROUTE, key, request_hash)
        except Problem as exc:  # used with another call (422), or the first still runs (409)
            return types.CallToolResult(content=_text(f"Idempotency-Key: {exc.detail}"),
                                        structured_content={"status": exc.slug,
                                                            "http_status": exc.status_code},
                                        is_error=True)
        if isinstance(got, idem.StoredResponse):
            replay = types.CallToolResult.model_validate_json(got.body)
            meta = {**(replay.meta or {}), "nexus/idempotent_replayed": True}
            return replay.model_copy(update={"meta": meta})
        try:
            result = await self._invoke(caller, session_id, state, params)
        except BaseException:
            await asyncio.shield(got.release())
            raise
        if (result.structured_content or {}).get("status") in _RETRYABLE:
            await asyncio.shield(got.release())  # nothing ran: a retry may run it
        else:
            await asyncio.shield(got.complete(idem.StoredResponse(
                200, {}, "application/json",
                result.model_dump_json(by_alias=True, exclude_none=True).encode())))
        return result

    async def _invoke(self, caller: Caller, session_id: str, state: Any,
                      params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            view = await state.tools.invoke(caller, session_id, params.name,
                                            dict(params.arguments or {}))
        except NotFound as exc:
            raise MCPError(types.INVALID_PARAMS, exc.detail) from None
        except (InvalidEntity, PolicyDenied) as exc:
            rule = getattr(exc, "rule", "")
            return types.CallToolResult(content=_text(f"denied ({rule}): {exc.detail}"),
                                        structured_content={"status": "denied", "rule": rule},
                                        is_error=True)
        except NoNodeAvailable as exc:
            return types.CallToolResult(content=_text(exc.detail),
                                        structured_content={"status": "no_node"}, is_error=True)
        except SessionClosed as exc:
            return types.CallToolResult(content=_text(exc.detail), is_error=True)
        except NexusError as exc:
            return types.CallToolResult(content=_text(exc.detail), is_error=True)
        meta = {"nexus/tool_call_id": view.tool_call_id}
        if view.status == "pending_approval":
            return types.CallToolResult(
                content=_text(f"tool call {view.tool_call_id} needs a human's approval: "
                              f"POST /v1/sessions/{session_id}/tool-calls/{view.tool_call_id}"
                              "/approval, then read it at GET /v1/sessions/"
                              f"{session_id}/tool-calls/{view.tool_call_id}"),
                structured_content={"tool_call_id": view.tool_call_id, "status": view.status},
                is_error=True, _meta=meta)
        if view.status == "failed":
            return types.CallToolResult(
                content=_text(f"tool call {view.tool_call_id} failed ({view.error}): {view.detail}"),
                structured_content={"tool_call_id": view.tool_call_id, "status": "failed",
                                    "error": view.error},
                is_error=True, _meta=meta)
        result = view.result
        return types.CallToolResult(
            content=_text(view.output or ""),
            structured_content=result if isinstance(result, dict) else
            ({"result": result} if result is not None else None),
            is_error=bool(view.is_error), _meta=meta)


_RETRYABLE = frozenset({"no_node"})  # answers of calls that never ran: not recorded


def _describe(tool: Any) -> str:
    text = tool.description or ""
    if tool.needs_approval:
        text += " (each call waits for a human's approval)"
    return text


def _query(scope: Scope, name: str) -> str | None:
    from urllib.parse import parse_qs

    raw = scope.get("query_string") or b""
    values = parse_qs(raw.decode("latin-1")).get(name)
    return values[0] if values else None
