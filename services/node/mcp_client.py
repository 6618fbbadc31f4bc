"""The node's MCP client: list and call the tools of a tenant's MCP server.

A `ToolExecRequest` of kind `"mcp"` carries what to do in `request.mcp`:

    {"op": "list" | "call",                # no op but a tool: "call"
     "transport": "http" | "stdio",
     "url": "https://host/mcp",          # http: the Streamable HTTP endpoint
     "command": ["python", "-m", "x"],  # stdio: run inside the node's sandbox
     "headers": {"Authorization": "Bearer ..."},  # http: secret *values*, this call only
     "tool": "echo"}                     # call: the server's own tool name

`handle(request, sandbox)` answers a `ToolDone` (list: the tools in `result`; call: the
text content in `output`, `structuredContent` in `result`, `isError` in `is_error`) or
raises `McpFailure` whose `reason` the node sends as `Failed.error`: `"timeout"` (the
server did not finish within `limits.timeout_s`), `"upstream_error"` (it refused the
connection, answered an HTTP error, garbage or a JSON-RPC error), `"invalid_arguments"`
(the request itself is unusable), `"sandbox_error"` (a stdio server could not be
started). `execute` is the same, returning the `Failed` frame instead of raising.

Bounded whatever the server does: the whole exchange (connect, handshake, list or
call) runs under one deadline of `limits.timeout_s`; a stdio server is stopped (its
process group killed) when it ends. An HTTP server is reached by the node itself, so
its `host:port` must be in `request.network` (the orchestrator puts it there); a stdio
server runs through `sandbox.wrap(...)` under the call's limits and network. Header
values are never logged, put in an event or echoed in an error: every detail is
scrubbed of them, and nothing the server answered beyond a short reason is repeated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import msgspec
from mcp import Client, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from shared.contracts.frames import Failed, ToolDone
from shared.contracts.messages import ToolExecRequest

log = logging.getLogger("nexus.node.mcp")
# The SDK logs what a broken server sent (bodies, tracebacks): our own failure says
# what happened, without repeating what a server (or a header) said.
logging.getLogger("mcp").setLevel(logging.CRITICAL)

TRANSPORTS = ("http", "stdio")
MAX_TOOLS = 256  # tools kept from one listing
MAX_PAGES = 16  # tools/list pages followed
MAX_LISTING_BYTES = 512 * 1024  # the listing travels in one NATS message
MAX_DESCRIPTION = 2000
MAX_DETAIL = 300


class McpFailure(Exception):
    """The MCP exchange did not give an answer; `reason` names why (a `Failed.error`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def failed(self) -> Failed:
        status = {"timeout": 504, "invalid_arguments": 400}.get(self.reason, 502)
        return Failed(error=self.reason, detail=self.detail, status=status)


async def execute(request: ToolExecRequest, sandbox: Any = None) -> ToolDone | Failed:
    """`handle`, with its failure as the `Failed` frame to send (never raises)."""
    try:
        return await handle(request, sandbox)
    except McpFailure as exc:
        return exc.failed()


async def handle(request: ToolExecRequest, sandbox: Any = None) -> ToolDone:
    spec = request.mcp or {}
    op = spec.get("op", "call" if spec.get("tool") else None)
    transport = spec.get("transport")
    if op not in ("list", "call"):
        raise McpFailure("invalid_arguments", f"mcp.op must be 'list' or 'call', not {op!r}")
    if transport not in TRANSPORTS:
        raise McpFailure("invalid_arguments", f"mcp.transport must be one of {TRANSPORTS}")
    headers = {str(k): str(v) for k, v in (spec.get("headers") or {}).items()}
    secrets = [v for v in headers.values() if v]
    where = _describe(spec)
    timeout_s = request.limits.timeout_s
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout_s):
            async with _connect(spec, request, sandbox, headers) as client:
                if op == "list":
                    done = await _list(client, request)
                else:
                    done = await _call(client, request, str(spec.get("tool") or ""))
    except McpFailure as exc:
        raise McpFailure(exc.reason, _scrub(exc.detail, secrets)) from None
    except TimeoutError:
        raise McpFailure("timeout", f"MCP server {where} did not answer {_verb(op)} within "
                                    f"{timeout_s:g}s") from None
    except BaseException as exc:  # any transport fault is the server's failure
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or _cancelled(exc):
            raise
        reason, why = _explain(exc)
        log.info("mcp server failed", extra={"server": where, "op": op, "reason": reason,
                                             "tool_call_id": request.tool_call_id})
        raise McpFailure(reason, _scrub(f"MCP server {where}: {why}", secrets)) from None
    duration_ms = round((time.monotonic() - started) * 1000, 3)
    return _with(done, duration_ms=duration_ms)


# -- connecting ---------------------------------------------------------------------------


@asynccontextmanager
async def _connect(spec: dict[str, Any], request: ToolExecRequest, sandbox: Any,
                   headers: dict[str, str]) -> AsyncIterator[Any]:
    if spec["transport"] == "http":
        url = _checked_url(spec.get("url"), request.network)
        timeout = httpx2.Timeout(request.limits.timeout_s)
        async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
            transport = streamable_http_client(url, http_client=http, terminate_on_close=False,
                                               max_sse_event_size=MAX_LISTING_BYTES * 2)
            async with Client(transport, cache=None,
                              read_timeout_seconds=request.limits.timeout_s) as client:
                yield client
        return
    command = spec.get("command")
    if (not isinstance(command, (list, tuple)) or not command
            or not all(isinstance(a, str) and a for a in command)):
        raise McpFailure("invalid_arguments", "mcp.command must be a non-empty list of strings")
    if sandbox is None or not hasattr(sandbox, "wrap"):
        raise McpFailure("sandbox_error", "this node has no sandbox to run a stdio MCP server in")
    try:
        argv = sandbox.wrap(list(command), limits=request.limits, network=request.network)
    except Exception as exc:  # noqa: BLE001 - the sandbox names its own failure
        raise McpFailure("sandbox_error", f"cannot sandbox {command[0]!r}: {exc}") from None
    release = getattr(sandbox, "release", None)
    with tempfile.TemporaryFile("w+") as errlog:  # the server's stderr, for the failure
        try:
            params = StdioServerParameters(command=argv[0], args=list(argv[1:]))
            async with Client(stdio_client(params, errlog=errlog), cache=None,
                              read_timeout_seconds=request.limits.timeout_s) as client:
                yield client
        except BaseException as exc:
            if isinstance(exc, OSError) and not _cancelled(exc):
                raise McpFailure("sandbox_error", f"cannot start {command[0]!r}: {exc}") from None
            if not _cancelled(exc) and not isinstance(exc, (McpFailure, TimeoutError)):
                tail = _stderr_tail(errlog)
                if tail:
                    raise McpFailure("upstream_error", f"stdio MCP server {command[0]!r} ended: "
                                                       f"{_leaf(exc)!s:.120}; stderr: {tail}") from None
            raise
        finally:
            if release is not None:  # its slot (uid) and, with network, its egress proxy
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await release(argv)


def _checked_url(url: object, network: Iterable[str]) -> str:
    if not isinstance(url, str) or not url:
        raise McpFailure("invalid_arguments", "mcp.url is required for the http transport")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise McpFailure("invalid_arguments", "mcp.url must be an http(s) URL with a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = set(network)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if not allowed & {parts.hostname, f"{parts.hostname}:{port}", netloc}:
        raise McpFailure("invalid_arguments", f"mcp.url's host {parts.hostname}:{port} is not in "
                                              "the call's network allowlist")
    return url


# -- the two operations ------------------------------------------------------------------


async def _list(client: Any, request: ToolExecRequest) -> ToolDone:
    tools: list[dict[str, Any]] = []
    size = 0
    truncated = False
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            entry = {"name": tool.name,
                     "description": (tool.description or "")[:MAX_DESCRIPTION],
                     "inputSchema": tool.input_schema}
            encoded = len(json.dumps(entry, default=str))
            if len(tools) >= MAX_TOOLS or size + encoded > MAX_LISTING_BYTES:
                truncated = True
                break
            tools.append(entry)
            size += encoded
        cursor = page.next_cursor
        if cursor is None or truncated:
            break
    else:
        truncated = True
    names = ", ".join(t["name"] for t in tools)
    return ToolDone(is_error=False, output=_cap(f"{len(tools)} tools: {names}",
                                                request.limits.max_output_bytes)[0],
                    output_bytes=size, truncated=truncated, result=tools)


async def _call(client: Any, request: ToolExecRequest, tool: str) -> ToolDone:
    if not tool:
        raise McpFailure("invalid_arguments", "mcp.tool (the server's tool name) is required")
    result = await client.call_tool(tool, dict(request.arguments),
                                    read_timeout_seconds=request.limits.timeout_s)
    parts = [_content_text(block) for block in result.content]
    text = "\n".join(p for p in parts if p)
    cap = request.limits.max_output_bytes
    output, produced, truncated = _cap(text, cap)
    structured = result.structured_content
    if structured is not None and len(json.dumps(structured, default=str)) > cap:
        structured, truncated = None, True  # above the cap: the text (capped) is what is kept
    return ToolDone(is_error=bool(result.is_error), output=output, output_bytes=produced,
                    truncated=truncated, result=structured)


def _content_text(block: Any) -> str:
    kind = getattr(block, "type", "")
    if kind == "text":
        return block.text
    if kind in ("image", "audio"):
        return f"[{kind} {getattr(block, 'mime_type', '')}, {len(block.data) * 3 // 4} bytes]"
    if kind == "resource_link":
        return f"[resource {block.uri}]"
    if kind == "resource":
        inner = block.resource
        return getattr(inner, "text", None) or f"[resource {inner.uri}]"
    return f"[{kind or 'content'}]"


# -- helpers --------------------------------------------------------------------------------


def _cap(text: str, limit: int) -> tuple[str, int, bool]:
    """(text within `limit` UTF-8 bytes, bytes produced, truncated)."""
    data = text.encode()
    if len(data) <= limit:
        return text, len(data), False
    return data[:limit].decode(errors="ignore"), len(data), True


def _with(done: ToolDone, **changes: Any) -> ToolDone:
    return msgspec.structs.replace(done, **changes)


def _describe(spec: dict[str, Any]) -> str:
    """The server as a failure names it: the URL without credentials or query, or the
    stdio command's program."""
    if spec.get("transport") == "http":
        parts = urlsplit(str(spec.get("url") or ""))
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    command = spec.get("command") or ["?"]
    return f"stdio {str(command[0])[:100]!r}"


def _verb(op: object) -> str:
    return "tools/list" if op == "list" else "tools/call"


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
        for word in secret.split():  # "Bearer abc": the token alone too
            if len(word) >= 6:
                text = text.replace(word, "***")
    return text[:MAX_DETAIL]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _leaf(exc: BaseException) -> BaseException:
    leaves = _leaves(exc)
    for leaf in leaves:  # the most telling one: a protocol or HTTP error over noise
        if not isinstance(leaf, (anyio.ClosedResourceError, anyio.BrokenResourceError)):
            return leaf
    return leaves[0]


def _cancelled(exc: BaseException) -> bool:
    return any(isinstance(leaf, asyncio.CancelledError) for leaf in _leaves(exc))


def _explain(exc: BaseException) -> tuple[str, str]:
    """(reason, a short why) for a transport or protocol fault, without the server's words
    beyond an MCP error's own message."""
    leaf = _leaf(exc)
    if isinstance(leaf, McpFailure):
        return leaf.reason, leaf.detail
    if isinstance(leaf, (TimeoutError, httpx2.TimeoutException)):
        return "timeout", "timed out"
    if isinstance(leaf, MCPError):
        if leaf.code == -32700 or "parse" in leaf.message.lower():
            return "upstream_error", "the answer is not MCP (invalid JSON-RPC)"
        return "upstream_error", f"MCP error {leaf.code}: {leaf.message[:160]}"
    if isinstance(leaf, httpx2.HTTPStatusError):
        return "upstream_error", f"HTTP {leaf.response.status_code}"
    if isinstance(leaf, httpx2.ConnectError):
        return "upstream_error", "connection refused or unreachable"
    if isinstance(leaf, httpx2.HTTPError):
        return "upstream_error", f"HTTP transport error ({type(leaf).__name__})"
    if isinstance(leaf, OSError):
        return "upstream_error", f"{type(leaf).__name__}: {leaf.strerror or ''}".strip()
    return "upstream_error", f"the server's answer broke the exchange ({type(leaf).__name__})"


def _stderr_tail(errlog: Any) -> str:
    try:
        errlog.seek(0, 2)
        size = errlog.tell()
        errlog.seek(max(0, size - 400))
        return " ".join(errlog.read().split())[-200:]
    except (OSError, ValueError):
        return ""
