"""Tenant isolation on every route: a key only ever sees its own tenant.

The routes come from the served OpenAPI document, so a new route is covered the day it
is added: every path parameter must be known here as tenant-owned (another tenant's id
is a 404, exactly like an id that does not exist: never a 403, never a 2xx) or as
explicitly not tenant-owned (with the reason), else this test fails and asks.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import wait_until
from tests.test_tenants import member_of, tenant_admin

# path parameter -> how to get the other tenant's (B's) id from the setup below
OWNED = {"session_id", "key_id", "name", "call_id", "run_id"}
# a route's parameter that names no tenant's resource, and why it is not checked here
NOT_OWNED = {
    "node_id": "nodes are the platform's shared machines, not a tenant's resource",
    "task_id": "model download tasks are the platform's fleet work: every /v1/tasks route "
               "is the platform admin's alone (a tenant key gets 403: checked below)",
    "model": "models on nodes are the platform's: the route is the platform admin's alone",
    "tenant": "the route is the platform admin's alone (a tenant key gets 403 for any "
              "tenant, its own included: checked below, nothing is learnt about others)",
}
# bodies that pass validation, so that ownership is what decides the answer
BODIES = {
    ("post", "/v1/sessions/{session_id}/messages"): {"content": "hello"},
    ("put", "/v1/tenants/{tenant}/budget"): {"limit_usd": 1},
    ("post", "/v1/sessions/{session_id}/tools/{name}/invoke"): {"arguments": {}},
    ("post", "/v1/sessions/{session_id}/tool-calls/{call_id}/approval"): {"approve": True},
    ("post", "/v1/calls/{call_id}/feedback"): {"score": 0.5},
    ("post", "/v1/sessions/{session_id}/runs"): {"agent": "research", "input": "hi"},
    ("post", "/v1/runs/{run_id}/approvals"): {"tool_call_id": "x", "decision": "approve"},
}
# routes whose answer to another tenant's id is not a 404, and why
UPSERTS = {("put", "/v1/secrets/{name}"): "sets the caller's own secret of that name"}


@pytest.fixture(scope="module")
def world(platform):
    """Tenant A (the prober) and tenant B (whose ids A tries), each with a session, a
    member key and a named policy."""
    a, b = f"ia{uuid.uuid4().hex[:6]}", f"ib{uuid.uuid4().hex[:6]}"
    admin_a, admin_b = tenant_admin(platform, a), tenant_admin(platform, b)
    key_b, _ = member_of(platform, admin_b)
    policy = {"name": "b-secret", "rules": {"models_deny": ["b-only-*"]}}
    assert httpx.post(f"{platform.api}/v1/policies", headers=admin_b,
                      json=policy).status_code == 201
    session_b = httpx.post(f"{platform.api}/v1/sessions", headers=admin_b,
                           json={"policy": "b-secret", "budget": {"limit_usd": 3}})
    assert session_b.status_code == 201, session_b.text
    sid_b = session_b.json()["session_id"]
    # B's tool, secret and tool call (all under one name where a route takes `{name}`)
    assert httpx.post(f"{platform.api}/v1/tools", headers=admin_b, json={
        "name": "bthing", "builtin": "python", "needs_approval": True}).status_code == 201
    assert httpx.put(f"{platform.api}/v1/secrets/bthing", headers=admin_b,
                     json={"value": "b-value"}).status_code == 200
    # B's agent (GET /v1/agents/{name}: A gets a 404, though B's is there)
    assert httpx.post(f"{platform.api}/v1/agents", headers={**admin_b, "Content-Type": "text/markdown"},
                      content=b"---\nname: bthing\ndescription: B's own\n---\nB only.\n"
                      ).status_code == 201
    # B's MCP server (a stdio one: it runs in the node's sandbox, nothing else to start)
    stdio = (Path(__file__).parent / "mcp_stdio_server.py").read_text()
    assert httpx.post(f"{platform.api}/v1/mcp-servers", headers=admin_b, timeout=30, json={
        "name": "bthing", "command": ["/usr/bin/python3", "-I", "-S", "-c", stdio]}
        ).status_code == 201
    assert httpx.post(f"{platform.api}/v1/sessions/{sid_b}/tools/bthing/invoke", headers=admin_b,
                      json={"arguments": {"code": "1"}}).status_code == 403  # recorded, denied
    call_b = next(e["data"]["tool_call_id"] for e in httpx.get(
        f"{platform.api}/v1/sessions/{sid_b}/events", headers=admin_b).json()["events"]
        if e["type"] == "ToolCallRequested")
    # B's agent run (a system agent; it fails for want of a model here, which is fine)
    run_b = httpx.post(f"{platform.api}/v1/sessions/{sid_b}/runs", headers=admin_b, timeout=30,
                       json={"agent": "research", "input": "hello"})
    assert run_b.status_code == 202, run_b.text
    # B's skill (GET /v1/skills/{name}) and B's LLM call (the run's: /v1/calls/{call_id}/...)
    assert httpx.post(f"{platform.api}/v1/skills", headers=admin_b, json={
        "name": "bthing", "description": "B's own", "llm_routing": {"preferred": "default"}}
        ).status_code == 201
    llm_call_b = wait_until(lambda: next((e["data"]["call_id"] for e in httpx.get(
        f"{platform.api}/v1/sessions/{sid_b}/events", headers=admin_b).json()["events"]
        if e["type"] == "RunLLMCallLinked"), None), 30, 0.2, "B's run to make its LLM call")
    assert httpx.get(f"{platform.api}/v1/calls/{llm_call_b}/explain",
                     headers=admin_b).status_code == 200  # it is there, for B
    return {"platform": platform, "a": a, "b": b, "admin_a": admin_a, "admin_b": admin_b,
            "ids_b": {"session_id": sid_b, "key_id": key_b, "name": "bthing",
                      "call_id": call_b, "run_id": run_b.json()["run_id"]},
            "llm_call_b": llm_call_b}


def ids_for(world, path: str) -> dict[str, str]:
    """B's ids for a route: `{call_id}` is a tool call's under a session, an LLM call's
    under /v1/calls/."""
    ids = dict(world["ids_b"])
    if path.startswith("/v1/calls/"):
        ids["call_id"] = world["llm_call_b"]
    return ids


def routes(platform) -> list[tuple[str, str, list[str]]]:
    doc = httpx.get(f"{platform.api}/schema/openapi.json", timeout=10).json()
    out = []
    for path, item in doc["paths"].items():
        for method in ("get", "post", "put", "patch", "delete"):
            if method in item:
                out.append((method, path, re.findall(r"{(\w+)}", path)))
    return out


def test_the_openapi_document_lists_the_tenant_routes(platform) -> None:
    found = {(m, p) for m, p, _ in routes(platform)}
    assert ("get", "/v1/sessions/{session_id}") in found
    assert ("delete", "/v1/keys/{key_id}") in found


# routes the app serves outside the OpenAPI document, and where their isolation is checked
OUTSIDE_THE_DOCUMENT = {
    "/metrics": "Prometheus exposition of the platform's own instruments, no tenant data",
    "/v1/ws/sessions/{session_id}": "WebSocket: another tenant's session closes 4404 (below)",
    "/v1/mcp": "MCP gateway: another tenant's X-Nexus-Session is a 404 (below)",
    "/schema": "the OpenAPI document and its renderers",
    "/ui": "the dashboard's HTML pages: another tenant's session is a 404 page (below, "
           "and in a browser in tests/test_dashboard.py)",
}


def app_routes() -> set[str]:
    """Every path the orchestrator's app serves (built in-process, not started)."""
    from services.orchestrator.app import create_app
    from shared.infra.settings import Settings

    app = create_app(Settings())
    return {re.sub(r":\w+}", "}", r.path) for r in app.routes}


def test_every_route_the_app_serves_is_covered(platform) -> None:
    """A route outside the document escapes the enumeration above: each is named here."""
    documented = {p for _, p, _ in routes(platform)}
    outside = sorted(p for p in app_routes() - documented
                     if not any(p == known or p.startswith(known + "/")
                                for known in OUTSIDE_THE_DOCUMENT))
    assert not outside, (f"routes outside the OpenAPI document unknown to this test: {outside}; "
                         "add them to OUTSIDE_THE_DOCUMENT with where their isolation is checked")


def test_another_tenants_session_is_not_found_on_the_dashboard(world) -> None:
    """Logged in to /ui with A's key, B's session is a 404 page, typed as a URL; the
    fleet's pages are the platform admin's (403)."""
    api = world["platform"].api
    key_a = world["admin_a"]["Authorization"].removeprefix("Bearer ")
    with httpx.Client(base_url=api, timeout=30) as ui:
        assert ui.post("/ui/login", data={"key": key_a}).status_code == 303
        assert ui.get(f"/ui/sessions/{world['ids_b']['session_id']}").status_code == 404
        assert ui.get("/ui/sessions/no-such-session").status_code == 404
        assert ui.get("/ui/models").status_code == 403
        assert ui.get("/ui/").status_code == 200
        # the tenant pages (DASH-PAGES): B's session, run and LLM call are 404 pages, and a
        # `?tenant=` naming B is ignored for a tenant's key (only the platform admin picks)
        ids = world["ids_b"]
        for path in (f"/ui/sessions/{ids['session_id']}/budget?stop=0",
                     f"/ui/live/sessions/{ids['session_id']}", f"/ui/runs/{ids['run_id']}",
                     f"/ui/live/runs/{ids['run_id']}", f"/ui/live/runs/{ids['run_id']}/stream",
                     f"/ui/calls/{world['llm_call_b']}",
                     f"/ui/runs/{ids['run_id']}?tenant={world['b']}",
                     f"/ui/sessions/{ids['session_id']}?tenant={world['b']}"):
            resp = ui.get(path)
            assert resp.status_code == 404, (path, resp.status_code)
            assert world["b"] not in resp.text, path
        for path in (f"/ui/runs?tenant={world['b']}", f"/ui/sessions?tenant={world['b']}",
                     f"/ui/agents?tenant={world['b']}"):
            resp = ui.get(path)
            assert resp.status_code == 200 and ids["run_id"] not in resp.text, path
            assert ids["session_id"] not in resp.text and "bthing" not in resp.text, path
        assert ui.get("/ui/agents/bthing").status_code == 404  # B's agent, by name
        csrf = re.search(r'name="csrf" value="([^"]+)"', ui.get("/ui/sessions").text).group(1)
        assert ui.post(f"/ui/runs/{ids['run_id']}/approvals", data={
            "csrf": csrf, "tool_call_id": "x", "decision": "approve"}).status_code == 404
        assert ui.post("/ui/nodes/nope/drain", data={"csrf": csrf}).status_code == 403


def test_another_tenants_session_is_not_found_on_the_websocket_and_mcp_gateway(world) -> None:
    import asyncio

    import websockets

    platform, sid_b = world["platform"], world["ids_b"]["session_id"]
    url = platform.api.replace("http://", "ws://") + f"/v1/ws/sessions/{sid_b}"

    async def closed_code() -> int | None:
        async with websockets.connect(url, additional_headers=world["admin_a"]) as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        return closed.value.rcvd.code if closed.value.rcvd else None

    assert asyncio.run(closed_code()) == 4404
    resp = httpx.post(f"{platform.api}/v1/mcp", timeout=30,
                      headers={**world["admin_a"], "X-Nexus-Session": sid_b,
                               "Accept": "application/json, text/event-stream"},
                      json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert resp.status_code == 404, resp.text
    assert world["b"] not in resp.text


def test_another_tenants_ids_are_not_found_on_every_route(world) -> None:
    platform, admin_a = world["platform"], world["admin_a"]
    checked = []
    for method, path, params in routes(platform):
        if not params:
            continue
        unknown = [p for p in params if p not in OWNED and p not in NOT_OWNED]
        assert not unknown, (f"{method.upper()} {path}: path parameter(s) {unknown} unknown to "
                             "this test; add them to OWNED (with B's id) or NOT_OWNED (why)")
        if not set(params) & OWNED or (method, path) in UPSERTS:
            continue
        theirs = path.format(**ids_for(world, path))
        nobody = path.format(**{p: f"missing-{uuid.uuid4().hex[:8]}" for p in params})
        body = BODIES.get((method, path))
        answers = {}
        for label, url in (("theirs", theirs), ("nobody", nobody)):
            resp = httpx.request(method, f"{platform.api}{url}", headers=admin_a, json=body,
                                 timeout=30)
            answers[label] = resp.status_code
            assert resp.status_code == 404, (method, url, resp.status_code, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert world["b"] not in resp.text  # nothing about the other tenant
        checked.append((method, path))
    assert len(checked) >= 24, checked  # every route with a tenant's id in its path (24 today)

    # and B's things are untouched by all that
    sid = world["ids_b"]["session_id"]
    session = httpx.get(f"{platform.api}/v1/sessions/{sid}", headers=world["admin_b"]).json()
    assert session["status"] != "closed" and session["tenant"] == world["b"]
    keys = httpx.get(f"{platform.api}/v1/keys", headers=world["admin_b"]).json()["keys"]
    assert any(k["key_id"] == world["ids_b"]["key_id"] and not k["revoked_at"] for k in keys)


def test_platform_only_routes_refuse_a_tenant_whatever_the_tenant(world) -> None:
    platform, admin_a = world["platform"], world["admin_a"]
    for tenant in (world["b"], world["a"], f"missing-{uuid.uuid4().hex[:6]}"):
        resp = httpx.put(f"{platform.api}/v1/tenants/{tenant}/budget", headers=admin_a,
                         json={"limit_usd": 1})
        assert resp.status_code == 403, resp.text
    assert httpx.delete(f"{platform.api}/v1/nodes/nope", headers=admin_a).status_code == 403
    for action in ("drain", "undrain"):  # the operator's drain (DASH-PAGES)
        assert httpx.post(f"{platform.api}/v1/nodes/nope/{action}",
                          headers=admin_a).status_code == 403
    # model distribution: the fleet is the platform's, whatever ids a tenant names
    for method, path, body in (
            ("get", "/v1/models/available", None),
            ("post", "/v1/models/distribute", {"model": "m", "target": "all"}),
            ("get", "/v1/nodes/nope/models", None),
            ("post", "/v1/nodes/nope/models/pull", {"model": "m"}),
            ("delete", "/v1/nodes/nope/models/m", None),
            ("get", "/v1/tasks", None), ("get", "/v1/tasks/nope", None),
            ("delete", "/v1/tasks/nope", None), ("get", "/v1/tasks/nope/stream", None)):
        resp = httpx.request(method, f"{platform.api}{path}", headers=admin_a, json=body)
        assert resp.status_code == 403, (method, path, resp.text)


def test_chat_in_another_tenants_session_is_not_found(world) -> None:
    platform = world["platform"]
    resp = httpx.post(f"{platform.api}/v1/chat/completions", timeout=30,
                      headers={**world["admin_a"], "X-Nexus-Session": world["ids_b"]["session_id"]},
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 404, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")


def test_policies_are_per_tenant_by_name(world) -> None:
    platform, admin_a = world["platform"], world["admin_a"]
    names = [p["name"] for p in httpx.get(f"{platform.api}/v1/policies", headers=admin_a).json()]
    assert "b-secret" not in names
    # A cannot pin B's policy: to A, no policy has that name
    resp = httpx.post(f"{platform.api}/v1/sessions", headers=admin_a, json={"policy": "b-secret"})
    assert resp.status_code == 400 and "b-secret" in resp.json()["detail"]
    assert "b-only" not in resp.text  # ... and nothing of its rules shows
    # the same name in A is A's own policy, version 1; B's stays as it was
    mine = httpx.post(f"{platform.api}/v1/policies", headers=admin_a,
                      json={"name": "b-secret", "rules": {"max_tokens_per_call": 10}})
    assert mine.status_code == 201 and mine.json()["version"] == 1
    [theirs] = [p for p in httpx.get(f"{platform.api}/v1/policies",
                                     headers=world["admin_b"]).json() if p["name"] == "b-secret"]
    assert theirs["version"] == 1 and theirs["rules"]["models_deny"] == ["b-only-*"]
