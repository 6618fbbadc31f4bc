"""Agent definitions and the session WebSocket.

The parser is pure (`shared.domain.agents`); the API, versioning, pinning, the system
agents and the CLI run against the session's `platform` (real processes, real NATS and
Postgres; each test its own tenant). The WebSocket chat needs a model that answers: it
runs against an LLM cluster of this module (the fake OpenAI/Anthropic upstreams over
real HTTP, `tests/llm_cluster.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from services.orchestrator.agents import SYSTEM_AGENTS_DIR, AgentService
from services.orchestrator.read_models import PROJECTIONS
from shared.contracts.errors import AgentInvalid
from shared.contracts.events import SYSTEM_AGENTS, agent_stream
from shared.domain.agents import MAX_MARKDOWN_BYTES, parse_agent_markdown
from shared.infra.eventstore import EventStore, ProjectionRunner
from shared.infra.eventstore.store import create_pool
from tests.conftest import new_database
from tests.fake_upstream import reply_text
from tests.llm_cluster import LLMCluster, start_llm_cluster
from tests.test_tenants import member_of, tenant_admin

REPO = Path(__file__).resolve().parents[1]
MD = {"Content-Type": "text/markdown"}

# A subagent file as coding agents write them, byte for byte.
CODE_REVIEWER = """---
name: code-reviewer
description: Expert code review specialist. Proactively reviews code for quality, security, and maintainability. Use immediately after writing or modifying code.
tools: Read, Grep, Glob, Bash
model: sonnet
color: blue
---

You are a senior code reviewer ensuring high standards of code quality and security.

When invoked:
1. Run git diff to see recent changes
2. Focus on modified files
3. Begin review immediately
"""


def agent_md(name: str, *, tools: str = "[python]", model: str = "inherit",
             prompt: str = "You answer briefly.", extra: str = "") -> str:
    return (f"---\nname: {name}\ndescription: test agent\nmodel: {model}\ntools: {tools}\n"
            f"max_steps: 5\nmax_cost_usd: 0.25\ntemperature: 0.3\n{extra}---\n{prompt}\n")


@pytest.fixture
def tenant(platform):
    name = f"ag{uuid.uuid4().hex[:8]}"
    return name, tenant_admin(platform, name)


def define(platform, headers, markdown: str, **kw) -> httpx.Response:
    return httpx.post(f"{platform.api}/v1/agents", headers={**headers, **MD},
                      content=markdown.encode(), timeout=30, **kw)


# -- the file format (pure) ---------------------------------------------------------------


def test_a_coding_agent_subagent_file_parses_unchanged() -> None:
    definition, lines = parse_agent_markdown(CODE_REVIEWER)
    assert definition.name == "code-reviewer"
    assert definition.tools == ("files.read", "shell", "files.list")  # Read, Grep+Bash, Glob
    assert definition.model == "sonnet" and definition.route is None  # resolved by the orchestrator
    assert definition.system_prompt.startswith("You are a senior code reviewer")
    assert lines["tools"] == 4 and lines["model"] == 5
    listed, _ = parse_agent_markdown(agent_md("x", tools="\n  - python\n  - files.read\n"
                                              "  - mcp__github__search\n  - TodoWrite"))
    assert listed.tools == ("python", "files.read", "mcp.github.search")
    assert listed.ignored_tools == ("TodoWrite",)
    assert (listed.max_steps, listed.max_cost_usd, listed.temperature) == (5, 0.25, 0.3)


@pytest.mark.parametrize("markdown, field, line", [
    ("---\nname: x\ntools: [python\ndescription: y\n---\nhi\n", "front_matter", 3),
    ("---\nname: x\n  bad: indent\n---\nhi\n", "front_matter", 3),
    ("no front matter at all\n", "front_matter", 1),
    ("---\nname: x\n", "front_matter", 2),
    ("---\nname: X Y\n---\nhi\n", "name", 2),
    ("---\nname: x\nmax_steps: 0\n---\nhi\n", "max_steps", 3),
    ("---\nname: x\ndescription: d\ntemperature: 9\n---\nhi\n", "temperature", 4),
    ("---\nname: x\nmax_cost_usd: -1\n---\nhi\n", "max_cost_usd", 3),
    ("---\nname: x\nmax_step: 3\n---\nhi\n", "max_step", 3),  # a typo never passes
    ("---\nname: x\ntools: python\napproval: shell\n---\nhi\n", "approval", 4),
    ("---\nname: x\n---\n\n", "system_prompt", 4),
    ("---\nname: x\na: &a [1, 2]\nb: [*a, *a, *a]\n---\nhi\n", "front_matter", 3),  # alias bombs
    ("---\nname: x\nk: " + "[" * 50 + "]" * 50 + "\n---\nhi\n", "front_matter", 3),
    ("---\nname: x\ntools: !!python/object:os.system {}\n---\nhi\n", "tools", 3),
])
def test_problems_name_the_field_and_the_line(markdown: str, field: str, line: int) -> None:
    with pytest.raises(AgentInvalid) as info:
        parse_agent_markdown(markdown)
    assert {"field": field, "line": line} in [{"field": e["field"], "line": e["line"]}
                                              for e in info.value.errors], info.value.errors


def test_size_is_bounded_before_any_parsing() -> None:
    huge = "---\nname: x\n---\n" + "a" * MAX_MARKDOWN_BYTES
    with pytest.raises(AgentInvalid) as info:
        parse_agent_markdown(huge)
    assert info.value.errors[0]["field"] == "markdown"
    front = "---\nname: x\n" + "".join(f"k{i}: v\n" for i in range(3000)) + "---\nhi\n"
    with pytest.raises(AgentInvalid) as info:
        parse_agent_markdown(front)
    assert info.value.errors[0]["field"] == "front_matter"


# -- definitions over HTTP ------------------------------------------------------------------


def test_define_version_read_and_list(platform, tenant) -> None:
    _, admin = tenant
    first = define(platform, admin, agent_md("helper"))
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["version"], body["source"], body["tools"]) == (1, "tenant", ["python"])
    assert body["system_prompt"] == "You answer briefly."
    again = define(platform, admin, agent_md("helper"))  # the same file: nothing new
    assert again.status_code == 201 and again.json()["version"] == 1
    second = httpx.post(f"{platform.api}/v1/agents", headers=admin, timeout=30,  # JSON form
                        json={"markdown": agent_md("helper", prompt="You answer at length.")})
    assert second.status_code == 201 and second.json()["version"] == 2, second.text

    current = httpx.get(f"{platform.api}/v1/agents/helper", headers=admin).json()
    assert current["version"] == 2 and current["system_prompt"] == "You answer at length."
    old = httpx.get(f"{platform.api}/v1/agents/helper", headers=admin, params={"version": 1})
    assert old.status_code == 200 and old.json()["system_prompt"] == "You answer briefly."
    assert old.json()["markdown"] == agent_md("helper")
    missing = httpx.get(f"{platform.api}/v1/agents/helper", headers=admin, params={"version": 3})
    assert missing.status_code == 404 and missing.headers["content-type"].startswith(
        "application/problem+json")

    listed = {a["name"]: a for a in httpx.get(f"{platform.api}/v1/agents", headers=admin).json()["agents"]}
    assert listed["helper"]["version"] == 2
    assert {"research", "data-analysis", "coder"} <= {n for n, a in listed.items()
                                                      if a["source"] == "system"}
    assert listed["research"]["tools"] == ["http_fetch"]
    assert listed["coder"]["approval"] == ["shell"]

    _, member = member_of(platform, admin)
    assert define(platform, member, agent_md("helper")).status_code == 403


def test_bad_definitions_are_422_naming_field_and_line(platform, tenant) -> None:
    _, admin = tenant
    unknown_tool = define(platform, admin, agent_md("a1", tools="[python, teleport]"))
    assert unknown_tool.status_code == 422, unknown_tool.text
    problem = unknown_tool.json()
    assert problem["rule"] == "agent.definition"
    assert problem["errors"] == [{"field": "tools", "line": 5, "message": problem["errors"][0]["message"]}]
    assert "teleport" in problem["errors"][0]["message"]

    unknown_model = define(platform, admin, agent_md("a2", model="gpt-nowhere"))
    assert unknown_model.status_code == 422
    assert [(e["field"], e["line"]) for e in unknown_model.json()["errors"]] == [("model", 4)]

    malformed = define(platform, admin, "---\nname: a3\ntools: [python\n---\nhi\n")
    assert malformed.status_code == 422
    assert malformed.json()["errors"][0] | {"message": ""} == {"field": "front_matter", "line": 3,
                                                               "message": ""}
    too_large = define(platform, admin, agent_md("a4", prompt="x" * (MAX_MARKDOWN_BYTES + 1)))
    assert too_large.status_code == 422 and too_large.json()["errors"][0]["field"] == "markdown"
    json_bad = httpx.post(f"{platform.api}/v1/agents", headers=admin, json={"md": "x"})
    assert json_bad.status_code == 400 and json_bad.json()["errors"][0]["field"] == "md"
    # `auto`, `skill:` and the coding agents' aliases need no route of their own
    for i, model in enumerate(("auto", "skill:summarise", "haiku")):
        assert define(platform, admin, agent_md(f"m{i}", model=model)).status_code == 201
    names = {a["name"] for a in httpx.get(f"{platform.api}/v1/agents", headers=admin).json()["agents"]}
    assert not {"a1", "a2", "a3", "a4"} & names


def test_a_coding_agent_file_loads_unchanged_over_http(platform, tenant) -> None:
    _, admin = tenant
    resp = define(platform, admin, CODE_REVIEWER)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["markdown"] == CODE_REVIEWER
    assert body["tools"] == ["files.read", "shell", "files.list"]
    # no route serves "sonnet" here: the agent runs on the session's model (inherit)
    assert body["model"] == "sonnet" and body["route"] is None


def test_sessions_pin_the_version_they_start_with(platform, tenant) -> None:
    _, admin = tenant
    assert define(platform, admin, agent_md("pinned")).status_code == 201
    started = httpx.post(f"{platform.api}/v1/sessions", headers=admin, json={"agent": "pinned"})
    assert started.status_code == 201
    sid = started.json()["session_id"]
    assert (started.json()["agent_version"], started.json()["agent_source"]) == (1, "tenant")
    assert define(platform, admin, agent_md("pinned", prompt="v2")).json()["version"] == 2
    session = httpx.get(f"{platform.api}/v1/sessions/{sid}", headers=admin).json()
    assert (session["agent"], session["agent_version"], session["agent_source"]) == ("pinned", 1, "tenant")
    run = httpx.post(f"{platform.api}/v1/sessions/{sid}/runs", headers=admin,
                     json={"agent": "pinned", "input": "hello"})
    assert run.status_code == 202, run.text
    assert run.json()["agent_version"] == 1  # a run of the session's agent uses the pinned version
    later = httpx.post(f"{platform.api}/v1/sessions", headers=admin, json={"agent": "pinned"}).json()
    assert later["agent_version"] == 2
    system = httpx.post(f"{platform.api}/v1/sessions", headers=admin, json={"agent": "coder"}).json()
    assert system["agent_source"] == "system" and system["agent_version"] >= 1
    label = httpx.post(f"{platform.api}/v1/sessions", headers=admin, json={"agent": "no-such"}).json()
    assert label["agent"] == "no-such" and label["agent_version"] is None


async def test_resolve_follows_the_pin_after_a_redefinition(platform, tenant, infra) -> None:
    """What the agent runner calls: `pinned(caller, session)`, the version at start."""
    from services.orchestrator.keys import Caller
    from services.orchestrator.sessions import SessionService

    name, admin = tenant
    assert define(platform, admin, agent_md("runner", prompt="first")).status_code == 201
    sid = httpx.post(f"{platform.api}/v1/sessions", headers=admin, json={"agent": "runner"}).json()["session_id"]
    assert define(platform, admin, agent_md("runner", prompt="second")).json()["version"] == 2
    pool = await create_pool(infra.database_url, max_size=4)
    try:
        store = EventStore(pool)
        runner = ProjectionRunner(store, PROJECTIONS)
        agents = AgentService(store, runner, tools=None, models=None)  # type: ignore[arg-type]
        caller = Caller(tenant=name, key_id="test", role="admin")
        session = await SessionService(store, runner, None).require(caller, sid)  # type: ignore[arg-type]
        pinned = await agents.pinned(caller, session)
        assert (pinned.version, pinned.system_prompt) == (1, "first")
        current = await agents.resolve(caller, "runner")
        assert (current.version, current.source, current.system_prompt) == (2, "tenant", "second")
        assert (await agents.resolve(caller, "research")).source == "system"
    finally:
        await pool.close()


def test_system_agents_are_everyones_and_shadowed_per_tenant(platform) -> None:
    a, b = (tenant_admin(platform, f"sh{uuid.uuid4().hex[:6]}") for _ in range(2))
    own = define(platform, a, agent_md("research", tools="[python]", prompt="A's own research"))
    assert own.status_code == 201 and own.json()["version"] == 1
    mine = httpx.get(f"{platform.api}/v1/agents/research", headers=a).json()
    theirs = httpx.get(f"{platform.api}/v1/agents/research", headers=b).json()
    assert (mine["source"], mine["system_prompt"]) == ("tenant", "A's own research")
    assert theirs["source"] == "system" and theirs["tools"] == ["http_fetch"]
    listed = [x for x in httpx.get(f"{platform.api}/v1/agents", headers=a).json()["agents"]
              if x["name"] == "research"]
    assert [x["source"] for x in listed] == ["tenant"]
    # A's agent is nobody else's: B sees the system one, and A's own names are 404 to B
    assert define(platform, a, agent_md("a-private")).status_code == 201
    assert httpx.get(f"{platform.api}/v1/agents/a-private", headers=b).status_code == 404


async def test_system_agents_load_once_across_restarts_and_orchestrators(infra, tmp_path) -> None:
    pool = await create_pool(new_database(infra), max_size=8)
    try:
        store = EventStore(pool)

        def service() -> AgentService:
            return AgentService(store, ProjectionRunner(store, PROJECTIONS), tools=None,  # type: ignore[arg-type]
                                models=None)  # type: ignore[arg-type]

        # two orchestrators starting at once, then a restart: each file is one version
        await asyncio.gather(service().load_system(), service().load_system())
        await service().load_system()
        for name in ("research", "data-analysis", "coder"):
            assert await store.stream_version(agent_stream(SYSTEM_AGENTS, name)) == 1
        # a changed file is a new version, once
        (tmp_path / "research.md").write_text(
            (SYSTEM_AGENTS_DIR / "research.md").read_text() + "\nAlways cite.\n")
        (tmp_path / "broken.md").write_text("---\nname: broken\ntools: [teleport]\n---\nhi\n")
        await asyncio.gather(service().load_system(tmp_path), service().load_system(tmp_path))
        assert await store.stream_version(agent_stream(SYSTEM_AGENTS, "research")) == 2
        assert await store.stream_version(agent_stream(SYSTEM_AGENTS, "broken")) == 0
    finally:
        await pool.close()


def test_cli_apply_list_show(platform, tenant, tmp_path) -> None:
    _, admin = tenant
    env = {**os.environ, "NEXUS_HTTP_PORT": platform.api.rsplit(":", 1)[1],
           "NEXUS_API_KEY": admin["Authorization"].split()[1], "NEXUS_DATA_DIR": str(tmp_path)}

    def nexus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.cli", "agents", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60)

    good = tmp_path / "reviewer.md"
    good.write_text(CODE_REVIEWER)
    applied = nexus("apply", str(good))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip() == "agent code-reviewer version 1"
    bad = tmp_path / "bad.md"
    bad.write_text(agent_md("bad", tools="[python, teleport]"))
    refused = nexus("apply", str(bad))
    assert refused.returncode != 0 and f"{bad}:5: tools: unknown tool 'teleport'" in refused.stderr
    listed = nexus("list")
    assert listed.returncode == 0 and "code-reviewer" in listed.stdout and "research" in listed.stdout
    shown = nexus("show", "code-reviewer")
    assert shown.returncode == 0 and json.loads(shown.stdout)["markdown"] == CODE_REVIEWER


# -- the session WebSocket ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(infra, tmp_path_factory):
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("agents-llm"), new_database(infra))
    try:
        yield cluster
    finally:
        cluster.stop()


def ws_url(api: str, session_id: str) -> str:
    return f"{api.replace('http://', 'ws://')}/v1/ws/sessions/{session_id}"


async def receive(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 30))


async def answer(ws) -> tuple[str, dict]:
    text = ""
    while True:
        frame = await receive(ws)
        if frame["type"] == "delta":
            text += frame["content"]
        else:
            return text, frame


async def test_chat_over_the_websocket(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    sid = llm.session(key, budget={"limit_usd": 5})
    async with connect(ws_url(llm.api, sid), additional_headers=key) as ws:
        await ws.send(json.dumps({"type": "message", "content": "hello there"}))
        text, done = await answer(ws)
        assert done["type"] == "done", done
        assert text == reply_text(8)
        assert done["usage"]["completion_tokens"] == 8 and done["cost_usd"] > 0
        # bad frames: an error naming the field, and the socket goes on
        for frame, field in ((b"not json", "body"), ({"type": "message"}, "content"),
                             ({"type": "shout"}, "type"),
                             ({"type": "message", "content": "x", "colour": 1}, "colour"),
                             ({"type": "message", "content": "x", "max_tokens": 0}, "max_tokens")):
            await ws.send(frame if isinstance(frame, bytes) else json.dumps(frame))
            error = await receive(ws)
            assert error["type"] == "error" and error["status"] == 400, error
            assert error["errors"][0]["field"] == field, error
        await ws.send(json.dumps({"type": "message", "content": "hi", "model": "no-such-model"}))
        error = await receive(ws)
        assert (error["type"], error["status"]) == ("error", 404) and "no-such-model" in error["detail"]
        await ws.send(json.dumps({"type": "ping"}))
        assert (await receive(ws))["type"] == "pong"
    messages = httpx.get(f"{llm.api}/v1/sessions/{sid}/messages", headers=key).json()["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", "hello there"),
                                                              ("assistant", reply_text(8))]


async def test_a_websocket_is_closed_1008_when_its_key_is_revoked(llm: LLMCluster) -> None:
    """A key revoked after the upgrade closes the socket (policy violation, with a
    reason); a socket of another key of the tenant goes on."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    key, kept = llm.tenant_key(tenant), llm.tenant_key(tenant)
    sid = llm.session(key)
    key_id = key["Authorization"].split()[1].split("_")[1]
    async with connect(ws_url(llm.api, sid), additional_headers=key) as ws, \
            connect(ws_url(llm.api, sid), additional_headers=kept) as other:
        await ws.send(json.dumps({"type": "ping"}))
        assert (await receive(ws))["type"] == "pong"
        revoked = await asyncio.to_thread(httpx.delete, f"{llm.api}/v1/keys/{key_id}",
                                          headers=llm.admin)
        assert revoked.status_code == 204, revoked.text
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            for _ in range(300):  # pings answered until the check sees the revocation
                await ws.send(json.dumps({"type": "ping"}))
                assert (await receive(ws))["type"] == "pong"
                await asyncio.sleep(0.2)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "revoked" in closed.value.rcvd.reason
        await other.send(json.dumps({"type": "ping"}))
        assert (await receive(other))["type"] == "pong"
    with pytest.raises(websockets.exceptions.InvalidStatus):  # and it cannot come back
        async with connect(ws_url(llm.api, sid), additional_headers=key):
            pass


async def test_websocket_auth_by_subprotocol_and_tenant_isolation(llm: LLMCluster) -> None:
    key, other = llm.tenant_key(), llm.tenant_key()
    sid = llm.session(key)
    token = key["Authorization"].split()[1]
    async with connect(ws_url(llm.api, sid), subprotocols=["nexus.v1", f"bearer.{token}"]) as ws:
        assert ws.subprotocol == "nexus.v1"
        await ws.send(json.dumps({"type": "ping"}))
        assert (await receive(ws))["type"] == "pong"
    for headers in ({}, {"Authorization": "Bearer nx_nope_nope"}):
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with connect(ws_url(llm.api, sid), additional_headers=headers):
                pass
    for session in (sid, str(uuid.uuid4())):  # another tenant's session is not found
        async with connect(ws_url(llm.api, session), additional_headers=other) as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
            assert llm.admin_key not in closed.value.rcvd.reason
