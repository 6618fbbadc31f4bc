"""Tools end to end over HTTP: the registry, the decision, the node and its sandbox.

Against the session's `platform` (real orchestrator, provider and node processes, real
NATS and Postgres); each test is its own tenant. The node-loss test starts a node of
its own with a unique label and a tool that may only run on nodes with that label
(`node_labels`), so the call lands on it, kills it mid-call, then deregisters it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from shared.infra.eventstore import EventStore, ProjectionRunner
from shared.infra.eventstore.store import create_pool
from services.orchestrator.read_models import PROJECTIONS
from services.orchestrator.read_models.tools import ToolsReadModel
from tests.support import ServiceProc, free_port_str, wait_until
from tests.test_tenants import member_of, tenant_admin

ALL_TOOLS = {"tools_allow": ["*"]}


@pytest.fixture
def tenant(platform):
    name = f"tl{uuid.uuid4().hex[:8]}"
    return name, tenant_admin(platform, name)


def session(platform, headers, rules=ALL_TOOLS) -> str:
    body = {"policy_rules": rules} if rules is not None else {}
    resp = httpx.post(f"{platform.api}/v1/sessions", headers=headers, json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["session_id"]


def invoke(platform, headers, sid, tool, arguments, timeout=60.0, **extra) -> httpx.Response:
    return httpx.post(f"{platform.api}/v1/sessions/{sid}/tools/{tool}/invoke", headers=headers,
                      json={"arguments": arguments}, timeout=timeout, **extra)


def events(platform, headers, sid) -> list[dict]:
    resp = httpx.get(f"{platform.api}/v1/sessions/{sid}/events", headers=headers,
                     params={"limit": 500})
    assert resp.status_code == 200, resp.text
    return resp.json()["events"]


def call_events(platform, headers, sid, call_id) -> list[str]:
    return [e["type"] for e in events(platform, headers, sid)
            if e["data"].get("tool_call_id") == call_id]


def test_definitions_are_checked_versioned_and_listed(platform, tenant) -> None:
    _, admin = tenant
    bad = httpx.post(f"{platform.api}/v1/tools", headers=admin, json={
        "name": "lookup", "builtin": "python",
        "parameters": {"type": "object", "properties": {"q": {"type": "strng"}}}})
    assert bad.status_code == 422, bad.text
    problem = bad.json()
    assert problem["rule"] == "tool.definition"
    assert problem["errors"][0]["field"] == "parameters/properties/q/type"
    hostile = httpx.post(f"{platform.api}/v1/tools", headers=admin, json={
        "name": "lookup", "builtin": "python", "parameters": {
            "type": "object", "properties": {"q": {"type": "string", "pattern": "(a+)+(?=b)"}}}})
    assert hostile.status_code == 422 and "pattern" in hostile.json()["errors"][0]["field"]
    reserved = httpx.post(f"{platform.api}/v1/tools", headers=admin,
                          json={"name": "python", "builtin": "python"})
    assert reserved.status_code == 422 and reserved.json()["errors"][0]["field"] == "name"

    good = {"name": "fetch_docs", "builtin": "http_fetch", "effect": "read_only",
            "permissions": {"network": ["docs.example.org"]}}
    first = httpx.post(f"{platform.api}/v1/tools", headers=admin, json=good)
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["parameters"]["required"] == ["url"]
    second = httpx.post(f"{platform.api}/v1/tools", headers=admin,
                        json={**good, "description": "v2", "expected_version": 1})
    assert second.status_code == 201 and second.json()["version"] == 2
    stale = httpx.post(f"{platform.api}/v1/tools", headers=admin,
                       json={**good, "expected_version": 1})
    assert stale.status_code == 409, stale.text

    shown = httpx.get(f"{platform.api}/v1/tools/fetch_docs", headers=admin).json()
    assert shown["description"] == "v2" and shown["permissions"]["network"] == ["docs.example.org"]
    names = {t["name"]: t["source"] for t in
             httpx.get(f"{platform.api}/v1/tools", headers=admin).json()["tools"]}
    assert names["python"] == "builtin" and names["files.write"] == "builtin"
    assert names["fetch_docs"] == "tenant"
    assert httpx.get(f"{platform.api}/v1/tools/nope", headers=admin).status_code == 404
    _, member = member_of(platform, admin)
    assert httpx.post(f"{platform.api}/v1/tools", headers=member, json=good).status_code == 403


def test_python_runs_on_a_node_and_every_step_is_an_event(platform, tenant) -> None:
    _, admin = tenant
    sid = session(platform, admin)
    resp = invoke(platform, admin, sid, "python",
                  {"code": "print(2 + 3)\nresult = {'answer': 42}"})
    assert resp.status_code == 200, resp.text
    call = resp.json()
    assert call["status"] == "finished" and call["is_error"] is False, call
    assert "5" in call["output"] and call["result"] == {"answer": 42}
    assert call["exit_code"] == 0 and call["node"]
    again = httpx.get(f"{platform.api}/v1/sessions/{sid}/tool-calls/{call['tool_call_id']}",
                      headers=admin).json()
    assert again["status"] == "finished" and again["result"] == {"answer": 42}
    assert again["verdict"] == "allowed" and again["rule"] == "tools.allow"
    assert call_events(platform, admin, sid, call["tool_call_id"]) == [
        "ToolCallRequested", "ToolCallDecided", "ToolCallStarted", "ToolCallFinished"]
    # an Idempotency-Key replays the first answer: the tool does not run twice
    key = {**admin, "Idempotency-Key": uuid.uuid4().hex}
    first = invoke(platform, key, sid, "python", {"code": "print('once')"})
    replay = invoke(platform, key, sid, "python", {"code": "print('once')"})
    assert replay.json()["tool_call_id"] == first.json()["tool_call_id"]
    assert replay.headers.get("Idempotent-Replayed") == "true"


def test_arguments_failing_the_schema_are_a_recorded_denial_and_nothing_runs(platform, tenant) -> None:
    _, admin = tenant
    sid = session(platform, admin)
    resp = invoke(platform, admin, sid, "python", {"code": 12})
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["rule"] == "tool.arguments"
    assert [e["field"] for e in problem["errors"]] == ["arguments/code"]
    [decided] = [e["data"] for e in events(platform, admin, sid) if e["type"] == "ToolCallDecided"]
    assert decided["verdict"] == "denied" and decided["rule"] == "tool.arguments"
    kinds = call_events(platform, admin, sid, decided["tool_call_id"])
    assert kinds == ["ToolCallRequested", "ToolCallDecided", "ToolCallFailed"]  # no Started
    missing = invoke(platform, admin, sid, "files.write", {"path": "a.txt"})
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "arguments/content"


def test_the_policy_decides_which_tools_a_session_may_call(platform, tenant) -> None:
    _, admin = tenant
    files_only = session(platform, admin, {"tools_allow": ["files.*"]})
    denied = invoke(platform, admin, files_only, "python", {"code": "print(1)"})
    assert denied.status_code == 403, denied.text
    assert denied.json()["rule"] == "default.deny_tools"
    no_policy = session(platform, admin, None)
    assert invoke(platform, admin, no_policy, "shell", {"command": "true"}).status_code == 403
    [failed] = [e["data"] for e in events(platform, admin, files_only) if e["type"] == "ToolCallFailed"]
    assert failed["reason"] == "denied"


def test_needs_approval_waits_for_a_human(platform, tenant) -> None:
    _, admin = tenant
    assert httpx.post(f"{platform.api}/v1/tools", headers=admin, json={
        "name": "careful", "builtin": "python", "needs_approval": True}).status_code == 201
    sid = session(platform, admin)
    pending = invoke(platform, admin, sid, "careful", {"code": "print('approved run')"})
    assert pending.status_code == 202, pending.text
    call_id = pending.json()["tool_call_id"]
    url = f"{platform.api}/v1/sessions/{sid}/tool-calls/{call_id}"
    assert httpx.get(url, headers=admin).json()["status"] == "pending_approval"
    _, member = member_of(platform, admin)
    assert httpx.post(f"{url}/approval", headers=member, json={"approve": True}).status_code == 403
    ran = httpx.post(f"{url}/approval", headers=admin, json={"approve": True}, timeout=60)
    assert ran.status_code == 200, ran.text
    assert ran.json()["status"] == "finished" and "approved run" in ran.json()["output"]
    assert httpx.post(f"{url}/approval", headers=admin, json={"approve": True}).status_code == 409

    other = invoke(platform, admin, sid, "careful", {"code": "print('never')"}).json()
    rejected = httpx.post(f"{platform.api}/v1/sessions/{sid}/tool-calls/{other['tool_call_id']}"
                          "/approval", headers=admin, json={"approve": False, "reason": "no"})
    assert rejected.status_code == 200 and rejected.json()["error"] == "rejected"
    assert call_events(platform, admin, sid, other["tool_call_id"]) == [
        "ToolCallRequested", "ToolCallDecided", "ToolCallApprovalGiven", "ToolCallFailed"]


class _Upstream(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        _Upstream.seen.append({"path": self.path, "headers": dict(self.headers)})
        body = json.dumps({"item": self.path.split("?")[0].rsplit("/", 1)[-1]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_http_tool_sends_its_secret_and_nothing_records_it(platform, tenant) -> None:
    _, admin = tenant
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = f"sv-{uuid.uuid4().hex}"
    try:
        put = httpx.put(f"{platform.api}/v1/secrets/inventory_key", headers=admin,
                        json={"value": secret})
        assert put.status_code == 200 and secret not in put.text
        listed = httpx.get(f"{platform.api}/v1/secrets", headers=admin)
        assert [s["name"] for s in listed.json()["secrets"]] == ["inventory_key"]
        assert secret not in listed.text
        port = server.server_address[1]
        defined = httpx.post(f"{platform.api}/v1/tools", headers=admin, json={
            "name": "inventory", "kind": "http", "effect": "read_only",
            "parameters": {"type": "object", "required": ["sku"],
                           "properties": {"sku": {"type": "string"}}},
            "http": {"method": "GET", "url_template": f"http://127.0.0.1:{port}/items/{{sku}}",
                     "headers": {"X-Api-Key": "inventory_key"}}})
        assert defined.status_code == 201, defined.text
        assert secret not in defined.text
        sid = session(platform, admin)
        resp = invoke(platform, admin, sid, "inventory", {"sku": "A-1"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "finished", resp.json()
        assert '"item": "A-1"' in resp.json()["output"] or '"item":"A-1"' in resp.json()["output"]
        [seen] = [s for s in _Upstream.seen if s["path"].startswith("/items/A-1")]
        assert seen["headers"].get("X-Api-Key") == secret  # it reached the server ...
        call = httpx.get(f"{platform.api}/v1/sessions/{sid}/tool-calls/"
                         f"{resp.json()['tool_call_id']}", headers=admin)
        audit = httpx.get(f"{platform.api}/v1/sessions/{sid}/events", headers=admin)
        for text in (resp.text, call.text, audit.text, platform.orchestrator.log(),
                     platform.node.log(), platform.provider.log()):
            assert secret not in text  # ... and nowhere else
        assert httpx.delete(f"{platform.api}/v1/secrets/inventory_key", headers=admin).status_code == 204
        assert httpx.delete(f"{platform.api}/v1/secrets/inventory_key", headers=admin).status_code == 404
    finally:
        server.shutdown()


def test_a_node_killed_mid_call_ends_it_as_node_lost(platform, tenant, tmp_path) -> None:
    _, admin = tenant
    label = uuid.uuid4().hex[:12]
    env = {**{k: v for k, v in platform.node.env.items()},
           "NEXUS_NODE_LABELS": f"tooltest={label}", "NEXUS_METRICS_PORT": free_port_str(),
           "NEXUS_NODE_DATA_DIR": str(tmp_path / "node"), "NEXUS_INSTANCE_ID": f"node-{label}"}
    node = ServiceProc("node", env, tmp_path / "node.log").start()
    try:
        def registered() -> str | None:
            nodes = httpx.get(f"{platform.api}/v1/nodes", headers=platform.admin,
                              params={"label": f"tooltest={label}"}).json()["nodes"]
            return next((n["node_id"] for n in nodes if n["status"] == "online"), None)

        node_id = wait_until(registered, 30, 0.2, "the extra node to register")
        assert httpx.post(f"{platform.api}/v1/tools", headers=admin, json={
            "name": "slow", "builtin": "python", "node_labels": {"tooltest": label},
            "limits": {"timeout_s": 120, "cpu_s": 120}}).status_code == 201
        sid = session(platform, admin)
        answer: dict = {}

        def call() -> None:
            answer["resp"] = invoke(platform, admin, sid, "slow",
                                    {"code": "import time\ntime.sleep(300)"}, timeout=120)

        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: any(e["type"] == "ToolCallStarted" and e["data"]["node"] == node_id
                               for e in events(platform, admin, sid)), 30, 0.1, "the call to start")
        time.sleep(1.0)  # the node has the call in its sandbox
        killed_at = time.monotonic()
        node.kill()
        caller.join(60)
        assert not caller.is_alive(), "the call hung after its node died"
        ended_after = time.monotonic() - killed_at
        resp = answer["resp"]
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "failed" and resp.json()["error"] == "node_lost", resp.text
        [failed] = [e["data"] for e in events(platform, admin, sid) if e["type"] == "ToolCallFailed"]
        assert failed["reason"] == "node_lost" and failed["node"] == node_id
        print(f"node lost noticed {ended_after:.1f}s after the kill")
    finally:
        if node.proc and node.proc.poll() is None:
            node.kill()
        for n in httpx.get(f"{platform.api}/v1/nodes", headers=platform.admin,
                           params={"label": f"tooltest={label}"}).json()["nodes"]:
            httpx.delete(f"{platform.api}/v1/nodes/{n['node_id']}", headers=platform.admin)


def test_tool_read_models_equal_their_rebuild(platform, infra, tenant) -> None:
    name, admin = tenant
    assert httpx.post(f"{platform.api}/v1/tools", headers=admin,
                      json={"name": "gate", "builtin": "shell", "needs_approval": True}).status_code == 201
    sid = session(platform, admin)
    invoke(platform, admin, sid, "shell", {"command": "echo hi"})
    invoke(platform, admin, sid, "gate", {"command": "echo later"})
    invoke(platform, admin, sid, "python", {"code": 1})

    async def compare() -> None:
        pool = await create_pool(infra.database_url, max_size=4)
        try:
            store = EventStore(pool)
            runner = ProjectionRunner(store, [p for p in PROJECTIONS
                                              if p.name in ("tools", "tool_calls")])
            await runner.wait_for(await store.head(), names=("tools", "tool_calls"))
            model = ToolsReadModel(store)
            before = await model.rows_of_tenant(name)
            tools_before = await model.tools_of(name)
            assert len(before) == 3
            await runner.rebuild("tool_calls")
            await runner.rebuild("tools")
            assert await model.rows_of_tenant(name) == before
            assert await model.tools_of(name) == tools_before
        finally:
            await pool.close()

    asyncio.run(compare())


def test_the_cli_lists_shows_and_invokes(platform, tenant, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from tests.support import REPO

    _, admin = tenant
    sid = session(platform, admin)
    port = platform.api.rsplit(":", 1)[1]
    env = {**os.environ, "NEXUS_DATA_DIR": str(tmp_path), "NEXUS_HTTP_HOST": "127.0.0.1",
           "NEXUS_HTTP_PORT": port, "NEXUS_API_KEY": admin["Authorization"].split()[1]}

    def nexus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.cli", "tools", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)

    listed = nexus("list")
    assert listed.returncode == 0, listed.stderr
    assert "files.read" in listed.stdout and "builtin" in listed.stdout
    shown = nexus("show", "shell")
    assert shown.returncode == 0 and json.loads(shown.stdout)["parameters"]["required"] == ["command"]
    ran = nexus("invoke", "shell", "--session", sid, "--args", '{"command": "echo from-cli"}')
    assert ran.returncode == 0, ran.stderr
    assert "from-cli" in json.loads(ran.stdout)["output"]
    bad = nexus("invoke", "shell", "--session", sid, "--args", '{"command": 1}')
    assert bad.returncode != 0 and "arguments/command" in bad.stderr


def test_a_closed_sessions_workspace_is_deleted_and_its_tools_refused(platform, infra,
                                                                      tenant) -> None:
    import nats

    from services.orchestrator.read_models.workspaces import WorkspacesReadModel
    from shared.infra.workspace import WorkspaceStore

    name, admin = tenant
    sid = session(platform, admin)
    wrote = invoke(platform, admin, sid, "files.write", {"path": "notes/a.txt", "content": "x" * 1000})
    assert wrote.status_code == 200 and wrote.json()["status"] == "finished", wrote.text
    ran = invoke(platform, admin, sid, "shell", {"command": "cat notes/a.txt | wc -c > n.txt"})
    assert ran.status_code == 200 and ran.json()["exit_code"] == 0, ran.text

    async def manifest() -> dict:
        nc = await nats.connect(infra.nats_url)
        try:
            return await WorkspaceStore(nc.jetstream(), quota_bytes=1 << 20).manifest(name, sid)
        finally:
            await nc.close()

    assert set(asyncio.run(manifest())) == {"notes/a.txt", "n.txt"}
    closed = httpx.post(f"{platform.api}/v1/sessions/{sid}/close", headers=admin)
    assert closed.status_code == 200, closed.text
    refused = invoke(platform, admin, sid, "files.read", {"path": "notes/a.txt"})
    assert refused.status_code == 409 and "closed" in refused.json()["detail"], refused.text

    deleted = wait_until(lambda: next((e for e in events(platform, admin, sid)
                                       if e["type"] == "WorkspaceDeleted"), None),
                         timeout=30, what="the closed session's workspace to be deleted")
    assert deleted["data"] == {"type": "WorkspaceDeleted", "tenant": name, "session_id": sid,
                               "objects": 3, "bytes": 1000 + 5}  # two blobs, the manifest
    assert asyncio.run(manifest()) == {}
    # recorded once (every orchestrator's janitor tries; one appends), and its read model
    # equals its rebuild
    time.sleep(1.5)
    assert [e["type"] for e in events(platform, admin, sid)].count("WorkspaceDeleted") == 1

    async def compare() -> None:
        pool = await create_pool(infra.database_url, max_size=4)
        try:
            store = EventStore(pool)
            runner = ProjectionRunner(store, [p for p in PROJECTIONS if p.name == "workspaces"])
            await runner.wait_for(await store.head(), names=("workspaces",))
            model = WorkspacesReadModel(store)
            before = await model.rows(name)
            assert [r[0] for r in before] == [sid] and before[0][3] is not None
            await runner.rebuild("workspaces")
            assert await model.rows(name) == before
        finally:
            await pool.close()

    asyncio.run(compare())
