"""A real MCP server for the tests (the official `mcp` SDK's low-level `Server`).

    python -m tests.mcp_test_server http --port P   # Streamable HTTP on 127.0.0.1:P/mcp
    python -m tests.mcp_test_server stdio           # over stdin/stdout (run in the sandbox)
    python -m tests.mcp_test_server hang --port P   # accepts connections, never answers
    python -m tests.mcp_test_server garbage --port P  # answers every request with non-MCP bytes

Tools: `echo` (text back), `add` (structured result), `fail` (an `isError` result),
`python` (collides with the builtin of that name: must never shadow it), and two that
registration must skip with a reason: `bad name!` (not a usable name) and `broken`
(its inputSchema is not a valid JSON Schema). `whoami` answers the SHA-256 of the
`Authorization` header the HTTP server saw, so a test can check that a secret header
reached the server without the value appearing anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hashlib
from typing import Any

import mcp_types as types
from mcp.server import Server

SEEN_AUTH: contextvars.ContextVar[str] = contextvars.ContextVar("seen_auth", default="")

TOOLS = [
    types.Tool(name="echo", description="Echo the text back",
               input_schema={"type": "object", "properties": {"text": {"type": "string"}},
                             "required": ["text"]}),
    types.Tool(name="add", description="Add two integers",
               input_schema={"type": "object",
                             "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                             "required": ["a", "b"]}),
    types.Tool(name="fail", description="Always reports an error",
               input_schema={"type": "object", "properties": {}}),
    types.Tool(name="python", description="Not the builtin python",
               input_schema={"type": "object", "properties": {"code": {"type": "string"}}}),
    types.Tool(name="whoami", description="sha256 of the Authorization header this server saw",
               input_schema={"type": "object", "properties": {}}),
    types.Tool(name="bad name!", description="An unusable name",
               input_schema={"type": "object", "properties": {}}),
    types.Tool(name="broken", description="An invalid inputSchema",
               input_schema={"type": "object", "properties": {"x": {"type": "no-such-type"}}}),
]


def text(value: str) -> list[types.ContentBlock]:
    return [types.TextContent(text=value)]


async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    match params.name:
        case "echo":
            return types.CallToolResult(content=text(str(args.get("text", ""))))
        case "add":
            total = int(args["a"]) + int(args["b"])
            return types.CallToolResult(content=text(str(total)), structured_content={"sum": total})
        case "fail":
            return types.CallToolResult(content=text("this tool always fails"), is_error=True)
        case "python":
            return types.CallToolResult(content=text("mcp-test-server's python"))
        case "whoami":  # a digest: the platform scrubs the secret's value from outputs
            seen = SEEN_AUTH.get()
            digest = hashlib.sha256(seen.encode()).hexdigest() if seen else "none"
            return types.CallToolResult(content=text(digest))
    return types.CallToolResult(content=text(f"unknown tool {params.name}"), is_error=True)


def server() -> Server:
    return Server("nexus-test", version="1", on_list_tools=list_tools, on_call_tool=call_tool)


def serve_http(port: int) -> None:
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    app = server().streamable_http_app(
        stateless_http=True, json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))

    async def asgi(scope: Any, receive: Any, send: Any) -> None:  # note the auth header
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode()
            SEEN_AUTH.set(auth)
        await app(scope, receive, send)

    uvicorn.run(asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


def serve_stdio() -> None:
    import anyio
    from mcp.server.stdio import stdio_server

    srv = server()

    async def main() -> None:
        async with stdio_server() as (read, write):
            await srv.run(read, write, srv.create_initialization_options())

    anyio.run(main)


async def _hang(port: int) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read the request, never answer, never close
        await reader.read(65536)

    srv = await asyncio.start_server(accept, "127.0.0.1", port)
    async with srv:
        await srv.serve_forever()


async def _garbage(port: int) -> None:
    body = b"\x00\x01 this is not JSON-RPC {{{"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", port)
    async with srv:
        await srv.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("http", "stdio", "hang", "garbage"))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "http":
        serve_http(args.port)
    elif args.mode == "stdio":
        serve_stdio()
    elif args.mode == "hang":
        asyncio.run(_hang(args.port))
    else:
        asyncio.run(_garbage(args.port))


if __name__ == "__main__":
    main()
