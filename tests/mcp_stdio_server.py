"""A minimal MCP server over stdio in the standard library only (JSON-RPC lines, the
2025-06-18 handshake), so it runs inside the node's sandbox under the system's
`python3 -I -S`, where no installed package is visible. `tests/test_mcp.py` passes this
file's text as `python3 -c` (the sandbox sees no file of the checkout).

Tools: `echo` (text back) and `pid` (the process id it sees: 1 or 2 in the sandbox's
own pid namespace, far more outside).
"""
import json
import os
import sys

TOOLS = [{"name": "echo", "description": "Echo the text back",
          "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                          "required": ["text"]}},
         {"name": "pid", "description": "The process id the server sees",
          "inputSchema": {"type": "object", "properties": {}}}]


def answer(request, result=None, error=None):
    reply = {"jsonrpc": "2.0", "id": request["id"]}
    reply.update({"error": error} if error else {"result": result})
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    request = json.loads(line)
    method = request.get("method")
    if "id" not in request:
        continue  # a notification
    if method == "initialize":
        answer(request, {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                         "serverInfo": {"name": "stdio-test", "version": "1"}})
    elif method == "tools/list":
        answer(request, {"tools": TOOLS})
    elif method == "tools/call":
        params = request.get("params") or {}
        args = params.get("arguments") or {}
        text = str(args.get("text", "")) if params.get("name") == "echo" else str(os.getpid())
        answer(request, {"content": [{"type": "text", "text": text}], "isError": False})
    elif method == "ping":
        answer(request, {})
    else:
        answer(request, error={"code": -32601, "message": f"method not found: {method}"})
