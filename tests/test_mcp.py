"""MCP end to end: registering servers, calling their tools, and Nexus as an MCP gateway.

Against the session's `platform` (real orchestrator, provider and node processes, real
NATS and Postgres) and real MCP servers as processes: `tests/mcp_test_server.py` (the
official SDK over Streamable HTTP, plus a server that accepts and never answers and one
that answers garbage), `tests/mcp_stdio_server.py` (stdio, run inside the node's
sandbox). The gateway is driven by the official `mcp` client. Each test is its own
tenant; the MCP server processes are shared by the module.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support import free_port_str, wait_until
from tests.test_tenants import tenant_admin

ROOT = Path(__file__).resolve().parent.parent
LISTED = {"echo", "add", "fail", "python", "whoami"}
SKIPPED = {"bad name!", "broken"}


@pytest.fixture(scope="module")
def mcp_servers() -> Iterator[dict[str, str]]:
    """URLs of the three HTTP servers: `ok` (the SDK's), `hang`, `garbage`."""
    procs, urls = [], {}
    for mode in ("http", "hang", "garbage"):
        port = free_port_str()
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.mcp_test_server", mode,
                                       "--port", port], cwd=ROOT))
        urls["ok" if mode == "http" else mode] = f"http://127.0.0.1:{port}/mcp"
    try:
        for url in urls.values():
            wait_until(lambda u=url: _accepts(u), timeout=30, what=f"{url} listening")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _accepts(url: str) -> bool:
    import socket

    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=1):
        return True


@pytest.fixture
def tenant(platform) -> dict[str, str]:
    return tenant_admin(platform, f"mcp{uuid.uuid4().hex[:8]}")


def register(platform, key: dict[str, str], name: str, **body) -> httpx.Response:
    return httpx.post(f"{platform.api}/v1/mcp-servers", headers=key,
                      json={"name": name, **body}, timeout=30)


def session(platform, headers, allow: list[str]) -> str:
    resp = httpx.post(f"{platform.api}/v1/sessions", headers=headers,
                      json={"policy_rules": {"tools_allow": allow}})
    assert resp.status_code == 201, resp.text
    return resp.json()["session_id"]


def invoke(platform, headers, sid: str, tool: str, arguments: dict) -> httpx.Response:
    return httpx.post(f"{platform.api}/v1/sessions/{sid}/tools/{tool}/invoke", headers=headers,
                      json={"arguments": arguments}, timeout=60)


def test_a_server_registers_its_tools_and_they_run_under_the_registry(platform, tenant,
                                                                       mcp_servers) -> None:
    secret = f"Bearer s3cret-{uuid.uuid4().hex}"
    assert httpx.put(f"{platform.api}/v1/secrets/mcp-token", headers=tenant,
                     json={"value": secret}).status_code in (200, 201)
    resp = register(platform, tenant, "kit", url=mcp_servers["ok"],
                    headers={"Authorization": "mcp-token"})
    assert resp.status_code == 201, resp.text
    server = resp.json()
    assert {t["tool"] for t in server["tools"]} == LISTED
    assert {t["name"] for t in server["tools"]} == {f"mcp.kit.{n}" for n in LISTED}
    skipped = {s["name"]: s["reason"] for s in server["skipped"]}
    assert set(skipped) == SKIPPED
    assert "unusable name" in skipped["bad name!"]
    assert "inputSchema" in skipped["broken"] and "JSON Schema" in skipped["broken"]
    assert server["headers"] == {"Authorization": "mcp-token"}  # the name, never the value

    assert httpx.get(f"{platform.api}/v1/mcp-servers/kit", headers=tenant).json() == server
    listed = httpx.get(f"{platform.api}/v1/mcp-servers", headers=tenant).json()["servers"]
    assert [s["name"] for s in listed] == ["kit"]

    # the collision: the builtin stays the builtin; the server's is only mcp.kit.python
    tools = {t["name"]: t for t in httpx.get(f"{platform.api}/v1/tools", headers=tenant).json()["tools"]}
    assert tools["python"]["source"] == "builtin" and tools["python"]["kind"] == "builtin"
    assert tools["mcp.kit.python"]["kind"] == "mcp"
    assert not any(n.endswith(("bad name!", ".broken")) for n in tools)

    sid = session(platform, tenant, ["mcp.kit.*", "python"])
    echoed = invoke(platform, tenant, sid, "mcp.kit.echo", {"text": "hello over MCP"})
    assert echoed.status_code == 200, echoed.text
    assert echoed.json()["status"] == "finished" and echoed.json()["output"] == "hello over MCP"
    added = invoke(platform, tenant, sid, "mcp.kit.add", {"a": 2, "b": 40}).json()
    assert added["result"] == {"sum": 42} and added["is_error"] is False
    assert invoke(platform, tenant, sid, "mcp.kit.fail", {}).json()["is_error"] is True
    mine = invoke(platform, tenant, sid, "mcp.kit.python", {"code": "x"}).json()
    assert mine["output"] == "mcp-test-server's python"
    builtin = invoke(platform, tenant, sid, "python", {"code": "print(6 * 7)"}).json()
    assert builtin["output"].strip() == "42"  # the sandbox's python, not the server's
    # the secret header reached the server (its digest) and no event holds its value
    seen = invoke(platform, tenant, sid, "mcp.kit.whoami", {}).json()["output"]
    assert seen == hashlib.sha256(secret.encode()).hexdigest()
    # arguments failing the tool's inputSchema: 422 naming the field, nothing ran
    bad = invoke(platform, tenant, sid, "mcp.kit.add", {"a": "two"})
    assert bad.status_code == 422 and any(e["field"].startswith("arguments")
                                          for e in bad.json()["errors"])
    log = httpx.get(f"{platform.api}/v1/sessions/{sid}/events", headers=tenant,
                    params={"limit": 500}).text
    assert secret not in log and secret.split()[1] not in log


def test_a_hanging_or_garbage_server_fails_registration_in_bounded_time(platform, tenant,
                                                                        mcp_servers) -> None:
    sid = session(platform, tenant, ["python"])
    others: list[httpx.Response] = []

    def meanwhile() -> None:  # other calls go on while the node waits on the hung server
        for _ in range(3):
            others.append(invoke(platform, tenant, sid, "python", {"code": "print('alive')"}))

    worker = threading.Thread(target=meanwhile)
    worker.start()
    # bounded: the client gives up after 30 s (an httpx error fails the test); the server
    # gets 2 s, and the answer says it was the server's timeout that ended it
    hung = register(platform, tenant, "hung", url=mcp_servers["hang"], limits={"timeout_s": 2})
    worker.join(60)
    assert hung.status_code == 504, hung.text
    problem = hung.json()
    assert problem["server"] == "hung" and problem["reason"] == "timeout"
    assert "hung" in problem["detail"] and "tools/list" in problem["detail"]
    assert "within 2s" in problem["detail"]
    assert [r.json()["output"].strip() for r in others] == ["alive"] * 3

    junk = register(platform, tenant, "junk", url=mcp_servers["garbage"], limits={"timeout_s": 5})
    assert junk.status_code == 502, junk.text
    assert junk.json()["reason"] == "upstream_error" and "not MCP" in junk.json()["detail"]

    gone = register(platform, tenant, "gone", url="http://127.0.0.1:9/mcp", limits={"timeout_s": 5})
    assert gone.status_code == 502 and gone.json()["reason"] == "upstream_error"

    for name in ("hung", "junk", "gone"):  # nothing recorded
        assert httpx.get(f"{platform.api}/v1/mcp-servers/{name}", headers=tenant).status_code == 404
    assert httpx.get(f"{platform.api}/v1/mcp-servers", headers=tenant).json()["servers"] == []


def test_bad_registrations_are_problems_naming_the_field(platform, tenant, mcp_servers) -> None:
    both = register(platform, tenant, "x", url=mcp_servers["ok"], command=["true"])
    assert both.status_code == 400 and both.json()["errors"][0]["field"] == "url"
    assert register(platform, tenant, "x").status_code == 400
    assert register(platform, tenant, "Bad.Name", url=mcp_servers["ok"]).status_code == 400
    missing = register(platform, tenant, "x", url=mcp_servers["ok"],
                       headers={"Authorization": "no-such-secret"})
    assert missing.status_code == 400
    assert missing.json()["errors"][0]["field"] == "headers.Authorization"


def test_a_stdio_server_runs_inside_the_sandbox(platform, tenant) -> None:
    source = (ROOT / "tests" / "mcp_stdio_server.py").read_text()
    resp = register(platform, tenant, "local",
                    command=["/usr/bin/python3", "-I", "-S", "-c", source])
    assert resp.status_code == 201, resp.text
    assert {t["name"] for t in resp.json()["tools"]} == {"mcp.local.echo", "mcp.local.pid"}
    sid = session(platform, tenant, ["mcp.local.*"])
    assert invoke(platform, tenant, sid, "mcp.local.echo", {"text": "from the sandbox"}
                  ).json()["output"] == "from the sandbox"
    pid = int(invoke(platform, tenant, sid, "mcp.local.pid", {}).json()["output"])
    assert pid <= 3  # its own pid namespace: the node's processes are not its neighbours


def test_another_tenants_server_is_not_found(platform, tenant, mcp_servers) -> None:
    assert register(platform, tenant, "mine", url=mcp_servers["ok"]).status_code == 201
    other = tenant_admin(platform, f"mcp{uuid.uuid4().hex[:8]}")
    assert httpx.get(f"{platform.api}/v1/mcp-servers/mine", headers=other).status_code == 404
    assert httpx.get(f"{platform.api}/v1/mcp-servers", headers=other).json()["servers"] == []
    tools = httpx.get(f"{platform.api}/v1/tools", headers=other).json()["tools"]
    assert not any(t["name"].startswith("mcp.mine.") for t in tools)
    sid = session(platform, other, ["*"])
    assert invoke(platform, other, sid, "mcp.mine.echo", {"text": "x"}).status_code == 404


async def _gateway(platform, headers: dict[str, str], work) -> object:
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, \
            Client(streamable_http_client(f"{platform.api}/v1/mcp", http_client=http)) as client:
        return await work(client)


def test_the_gateway_serves_exactly_the_allowed_tools_to_an_mcp_client(platform, tenant,
                                                                       mcp_servers) -> None:
    assert register(platform, tenant, "kit", url=mcp_servers["ok"]).status_code == 201
    assert register(platform, tenant, "gated", url=mcp_servers["ok"],
                    needs_approval=True).status_code == 201
    sid = session(platform, tenant, ["mcp.kit.add", "mcp.kit.echo", "mcp.gated.echo", "files.list"])
    headers = {**tenant, "X-Nexus-Session": sid}

    async def work(client: Client) -> tuple:
        listed = await client.list_tools()
        added = await client.call_tool("mcp.kit.add", {"a": 2, "b": 3})
        denied = await client.call_tool("mcp.kit.fail", {})
        gated = await client.call_tool("mcp.gated.echo", {"text": "please"})
        invalid = await client.call_tool("mcp.kit.add", {"a": "x"})
        return listed, added, denied, gated, invalid

    listed, added, denied, gated, invalid = asyncio.run(_gateway(platform, headers, work))
    assert {t.name for t in listed.tools} == {"mcp.kit.add", "mcp.kit.echo", "mcp.gated.echo",
                                              "files.list"}
    assert next(t for t in listed.tools if t.name == "mcp.kit.add").input_schema["required"] == ["a", "b"]
    assert added.is_error is False and added.structured_content == {"sum": 5}
    assert added.content[0].text == "5"
    call_id = added.meta["nexus/tool_call_id"]
    assert denied.is_error and "default.deny_tools" in denied.content[0].text
    assert gated.is_error and gated.structured_content["status"] == "pending_approval"
    pending = gated.structured_content["tool_call_id"]
    assert pending in gated.content[0].text and "approval" in gated.content[0].text
    assert invalid.is_error and "tool.arguments" in invalid.content[0].text

    log = httpx.get(f"{platform.api}/v1/sessions/{sid}/events", headers=tenant,
                    params={"limit": 500}).json()["events"]
    kinds = [e["type"] for e in log if e["data"].get("tool_call_id") == call_id]
    assert kinds == ["ToolCallRequested", "ToolCallDecided", "ToolCallStarted", "ToolCallFinished"]
    view = httpx.get(f"{platform.api}/v1/sessions/{sid}/tool-calls/{pending}", headers=tenant).json()
    assert view["status"] == "pending_approval"

    # another tenant's session, or none: refused before any MCP is spoken
    other = tenant_admin(platform, f"mcp{uuid.uuid4().hex[:8]}")
    for extra, status in (({"X-Nexus-Session": sid}, 404), ({}, 400)):
        resp = httpx.post(f"{platform.api}/v1/mcp", headers={**other, **extra},
                          json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert resp.status_code == status, resp.text
    assert httpx.post(f"{platform.api}/v1/mcp", json={}).status_code == 401


def test_registration_is_idempotent_and_a_removed_servers_tools_leave(platform, tenant,
                                                                     mcp_servers) -> None:
    once = {**tenant, "Idempotency-Key": f"reg-{uuid.uuid4().hex}"}
    first = register(platform, once, "gone", url=mcp_servers["ok"])
    assert first.status_code == 201, first.text
    again = register(platform, once, "gone", url=mcp_servers["ok"])
    assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json() and first.json()["version"] == 1
    other_body = register(platform, once, "gone", url=mcp_servers["ok"], needs_approval=True)
    assert other_body.status_code == 422, other_body.text
    assert httpx.get(f"{platform.api}/v1/mcp-servers/gone", headers=tenant).json()["version"] == 1

    sid = session(platform, tenant, ["*"])
    assert invoke(platform, tenant, sid, "mcp.gone.echo", {"text": "hi"}).status_code == 200
    other = tenant_admin(platform, f"mcp{uuid.uuid4().hex[:8]}")
    assert httpx.delete(f"{platform.api}/v1/mcp-servers/gone", headers=other).status_code == 404

    removed = httpx.delete(f"{platform.api}/v1/mcp-servers/gone", headers=tenant)
    assert removed.status_code == 204, removed.text
    assert httpx.get(f"{platform.api}/v1/mcp-servers/gone", headers=tenant).status_code == 404
    assert httpx.get(f"{platform.api}/v1/mcp-servers", headers=tenant).json()["servers"] == []
    tools = httpx.get(f"{platform.api}/v1/tools", headers=tenant).json()["tools"]
    assert not any(t["name"].startswith("mcp.gone.") for t in tools)
    assert invoke(platform, tenant, sid, "mcp.gone.echo", {"text": "hi"}).status_code == 404
    assert httpx.delete(f"{platform.api}/v1/mcp-servers/gone", headers=tenant).status_code == 404
    # the name can be registered again: the next version of the same stream
    back = register(platform, tenant, "gone", url=mcp_servers["ok"])
    assert back.status_code == 201 and back.json()["version"] == 3, back.text


def test_the_gateway_honours_an_idempotency_key_on_tools_call(platform, tenant,
                                                              mcp_servers) -> None:
    assert register(platform, tenant, "kit", url=mcp_servers["ok"]).status_code == 201
    sid = session(platform, tenant, ["mcp.kit.*"])
    key = f"mcp-{uuid.uuid4().hex}"

    async def work(client: Client) -> tuple:
        first = await client.call_tool("mcp.kit.add", {"a": 2, "b": 3})
        retry = await client.call_tool("mcp.kit.add", {"a": 2, "b": 3})
        other = await client.call_tool("mcp.kit.add", {"a": 1, "b": 1})
        return first, retry, other

    headers = {**tenant, "X-Nexus-Session": sid, "Idempotency-Key": key}
    first, retry, other = asyncio.run(_gateway(platform, headers, work))
    assert first.is_error is False and first.structured_content == {"sum": 5}
    assert retry.structured_content == {"sum": 5} and retry.content[0].text == "5"
    assert retry.meta["nexus/tool_call_id"] == first.meta["nexus/tool_call_id"]
    assert retry.meta["nexus/idempotent_replayed"] is True
    assert other.is_error and "Idempotency-Key" in other.content[0].text
    log = httpx.get(f"{platform.api}/v1/sessions/{sid}/events", headers=tenant,
                    params={"limit": 500}).json()["events"]
    assert [e["type"] for e in log].count("ToolCallRequested") == 1  # ran once
