"""The dashboard's tenant pages in a real browser (headless Debian chromium, Playwright's
Python API): Sessions (budget gauges, live, and the time slider), Runs (the step
timeline, the live stream, approve on the page), Explain, Agents (edit and apply), and
tenant isolation by URL. Against a real platform as processes (orchestrator, provider,
node) on a NATS and database of their own, in front of the scripted fake upstream
(tests/fake_upstream.py: real HTTP, the OpenAI protocol; `FAKE_AGENT` scripts a run).

Screenshots go to `test-artifacts/dashboard/` (and `docs/screenshots/` with
`NEXUS_UPDATE_SCREENSHOTS=1`), as in tests/test_dashboard.py.
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from services.orchestrator.ui import assets
from shared.infra.settings import get_settings
from tests.conftest import new_database
from tests.llm_cluster import start_llm_cluster
from tests.support import ServiceProc, free_port_str, wait_until
from tests.test_dashboard import CHROMIUM, login, playwright, shot

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, cluster, node: ServiceProc) -> None:
        self.cluster, self.node = cluster, node
        self.api = cluster.api

    def tenant(self, role: str = "admin") -> tuple[str, dict[str, str]]:
        """A new tenant's key: (the key, its headers)."""
        resp = httpx.post(f"{self.api}/v1/keys", headers=self.cluster.admin, json={
            "name": "ui", "role": role, "tenant": f"t{uuid.uuid4().hex[:8]}"})
        assert resp.status_code == 201, resp.text
        key = resp.json()["key"]
        return key, {"Authorization": f"Bearer {key}"}

    def session(self, headers, budget: float = 1.0) -> str:
        resp = httpx.post(f"{self.api}/v1/sessions", headers=headers, json={
            "budget": {"limit_usd": budget}, "policy_rules": {"tools_allow": ["*"]}})
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"]

    def agent(self, headers, name: str, tools: list[str], approval: list[str] = (),
              description: str = "a dashboard test agent") -> str:
        markdown = (f"---\nname: {name}\ndescription: {description}\ntools: [{', '.join(tools)}]\n"
                    f"approval: [{', '.join(approval)}]\nmodel: default\n---\n"
                    "You are a test agent. Use the tools.\n")
        resp = httpx.post(f"{self.api}/v1/agents", headers=headers, json={"markdown": markdown})
        assert resp.status_code == 201, resp.text
        return markdown

    def run(self, headers, sid: str, agent: str, steps: list, answer: str) -> str:
        script = json.dumps({"steps": steps, "answer": answer})
        resp = httpx.post(f"{self.api}/v1/sessions/{sid}/runs", headers=headers, timeout=30,
                          json={"agent": agent, "input": f"do it FAKE_AGENT={script}"})
        assert resp.status_code == 202, resp.text
        return resp.json()["run_id"]

    def run_status(self, headers, run_id: str, *statuses: str) -> dict:
        def get() -> dict | None:
            run = httpx.get(f"{self.api}/v1/runs/{run_id}", headers=headers, timeout=30).json()
            return run if run["status"] in statuses else None
        return wait_until(get, 60, 0.1, f"run {run_id} {statuses}")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def ui(infra, tmp_path_factory):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    if assets.missing(get_settings().cache_dir):
        pytest.fail("the dashboard's assets are not cached: `make test` runs `nexus ui assets`")
    tmp = tmp_path_factory.mktemp("dashboard-pages")
    cluster = start_llm_cluster(infra, tmp, new_database(infra), NEXUS_RUN_SCAN_S="0.2",
                                NEXUS_RUN_APPROVAL_TTL_S="300", NEXUS_HEARTBEAT_INTERVAL_S="0.5",
                                NEXUS_NODE_OFFLINE_AFTER_S="5")
    env = {k: v for k, v in cluster.env.items() if k != "DATABASE_URL"}
    node = ServiceProc("node", {**env, "NEXUS_NODE_DATA_DIR": str(tmp / "node"),
                                "NEXUS_INSTANCE_ID": "node-ui", "NEXUS_METRICS_PORT": free_port_str()},
                       tmp / "node.log").start()
    try:
        wait_until(lambda: any(n["status"] == "online" for n in httpx.get(
            f"{cluster.api}/v1/nodes", headers=cluster.admin).json()["nodes"]), 60, 0.2, "a node")
        yield Cluster(cluster, node)
    finally:
        node.stop()
        cluster.stop()


@pytest.fixture(scope="module")
def browser(ui):
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def py(code: str) -> dict:
    return {"name": "python", "arguments": {"code": code}}


def test_approve_a_run_on_the_page_and_watch_it_finish(browser, ui):
    key, h = ui.tenant()
    ui.agent(h, "gated", ["python"], approval=["python"])
    sid = ui.session(h)
    run_id = ui.run(h, sid, "gated", [[py("print(6 * 7)")]], "the answer is {last_tool}")
    ctx, page = login(browser, ui, key)
    page.goto(f"{ui.api}/ui/runs/{run_id}")
    approve = page.get_by_role("button", name="Approve")
    approve.wait_for()  # pushed over SSE once the run waits (or there at once)
    assert page.locator("li.tool[data-tool=python][data-tool-status=awaiting_approval]").count() == 1
    stream = page.locator("#run-stream li[data-type=RunAwaitingApproval]")
    stream.wait_for()  # the live stream replays the run's events so far
    shot(page, "run-approval")
    page.get_by_label("Reason").fill("looks harmless")
    approve.click()
    page.get_by_role("status").filter(has_text="approved").wait_for()
    page.locator("[data-figure=run-status]").filter(has_text="finished").wait_for()  # live
    tool = page.locator("li.tool[data-tool=python]")
    assert tool.get_attribute("data-tool-status") == "finished"
    [node] = httpx.get(f"{ui.api}/v1/nodes", headers=ui.cluster.admin).json()["nodes"]
    assert f"node {node['node_id']}" in tool.inner_text() and "approved by key:" in tool.inner_text()
    llm = page.locator("li.llm[data-call-status=answered]")
    assert llm.count() == 2 and "tokens" in llm.first.inner_text()
    assert page.locator(".answer").inner_text() == "the answer is 42"
    page.locator("#run-stream li[data-type=RunFinished]").wait_for()
    shot(page, "run")
    run = ui.run_status(h, run_id, "finished")  # the API agrees: one approval, one tool call
    assert run["tool_calls"][0]["status"] == "finished" and run["answer"] == "the answer is 42"
    llm.first.locator("a").click()  # the timeline links each LLM call to its explanation
    page.wait_for_url(re.compile(r"/ui/calls/"))
    assert page.locator("[data-outcome=completed]").count() == 1
    assert "primary/fake-small" in page.locator("[data-link=plan]").inner_text()
    assert "allowed" in page.locator("[data-link=policy]").inner_text()
    assert page.locator("[data-link=budget] code").count() >= 1
    shot(page, "explain")
    ctx.close()


def test_a_budget_gauge_moves_after_a_call_and_the_slider_goes_back(browser, ui):
    key, h = ui.tenant()
    sid = ui.session(h, budget=2.0)
    ctx, page = login(browser, ui, key)
    page.goto(f"{ui.api}/ui/sessions")
    page.locator(f"tr[data-session='{sid}'] a").click()
    gauge = page.locator(f"#session-live .gauge[data-budget='budget-session-{sid}']")
    assert gauge.get_attribute("data-committed") == "0"
    resp = httpx.post(f"{ui.api}/v1/sessions/{sid}/messages", headers=h, timeout=30,
                      json={"content": "Hello there"})
    assert resp.status_code == 200, resp.text
    page.wait_for_function(  # pushed over SSE: the page is never reloaded
        "sid => { const g = document.querySelector(`#session-live .gauge[data-budget='budget-session-${sid}']`);"
        " return g && Number(g.dataset.committed) > 0; }", arg=sid)
    committed = int(gauge.get_attribute("data-committed"))
    assert committed > 0 and gauge.get_attribute("data-reserved") == "0"
    budget = httpx.get(f"{ui.api}/v1/sessions/{sid}/budget", headers=h).json()["session"]
    assert round(budget["committed_usd"] * 1_000_000) == committed  # what the API says
    page.locator(".msg-assistant").wait_for()
    assert page.locator(".msg-user .text").inner_text() == "Hello there"
    shot(page, "session")
    # the slider: back to the budget's first change (opened: nothing spent), then to the last
    slider = page.locator("#stop")
    page.wait_for_function(  # the slider's stops grew live: opened, reserved, committed
        "() => { const s = document.querySelector('#stop'); return s && Number(s.max) >= 2; }")
    last = int(slider.get_attribute("max"))

    def slide(to: int) -> None:
        slider.evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
                        str(to))
        page.locator(f"#budget-at .as-of[data-stop='{to}']").wait_for()
    slide(0)
    at = page.locator(f"#budget-at .gauge[data-budget='budget-session-{sid}']")
    assert at.get_attribute("data-committed") == "0"
    assert "BudgetOpened" in page.locator("#budget-at .as-of").inner_text()
    slide(last)
    assert int(at.get_attribute("data-committed")) == committed
    ctx.close()


def test_a_tenant_cannot_see_another_tenants_session_or_run_even_by_url(browser, ui):
    _, ha = ui.tenant()
    key_b, hb = ui.tenant()
    ui.agent(ha, "plain", ["python"])
    sid_a = ui.session(ha)
    run_a = ui.run(ha, sid_a, "plain", [], "done")
    ui.run_status(ha, run_a, "finished")
    [call_a] = [m["call_id"] for m in httpx.get(f"{ui.api}/v1/sessions/{sid_a}/messages",
                                                headers=ha).json()["messages"] if m["call_id"]]
    sid_b = ui.session(hb)
    ctx, page = login(browser, ui, key_b)
    assert page.goto(f"{ui.api}/ui/sessions/{sid_b}").status == 200
    for path in (f"/ui/sessions/{sid_a}", f"/ui/runs/{run_a}", f"/ui/calls/{call_a}",
                 f"/ui/sessions/{sid_a}/budget?stop=0"):
        resp = page.goto(f"{ui.api}{path}")
        assert resp.status == 404, path
        assert page.locator(".gauge, .msg, .timeline, [data-link], .as-of").count() == 0, path
        assert "not found" in page.get_by_role("alert").inner_text()
    page.goto(f"{ui.api}/ui/runs")
    assert page.locator(f"tr[data-run='{run_a}']").count() == 0
    page.goto(f"{ui.api}/ui/sessions")
    assert page.locator(f"tr[data-session='{sid_a}']").count() == 0
    page.goto(f"{ui.api}/ui/sessions/{sid_b}")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    cookies = {c["name"]: c["value"] for c in ctx.cookies()}
    for path in (f"/ui/live/runs/{run_a}", f"/ui/live/sessions/{sid_a}", f"/ui/live/runs/{run_a}/stream"):
        assert httpx.get(f"{ui.api}{path}", cookies=cookies).status_code == 404, path
    answer = httpx.post(f"{ui.api}/ui/runs/{run_a}/approvals", cookies=cookies, data={
        "csrf": csrf, "tool_call_id": "x", "decision": "approve"})
    assert answer.status_code == 404
    ctx.close()


def test_edit_an_agent_apply_it_and_a_bad_one_shows_its_field_and_line(browser, ui):
    key, h = ui.tenant()
    ui.agent(h, "writer", ["python"], description="writes things")
    ctx, page = login(browser, ui, key)
    page.goto(f"{ui.api}/ui/agents")
    page.locator("tr[data-agent=writer] a").click()
    text = page.get_by_label("Markdown", exact=False)
    assert "description: writes things" in text.input_value()
    text.fill(text.input_value().replace("writes things", "writes better things"))
    page.get_by_role("button", name="Apply").click()
    page.get_by_role("status").filter(has_text="agent writer is at version 2").wait_for()
    got = httpx.get(f"{ui.api}/v1/agents/writer", headers=h).json()
    assert got["version"] == 2 and got["description"] == "writes better things"
    bad = text.input_value().replace("tools: [python]", "tools: [python, no_such_tool]")
    text.fill(bad)
    page.get_by_role("button", name="Apply").click()
    problem = page.locator("#agent-problems li[data-field=tools]")
    problem.wait_for()
    assert problem.get_attribute("data-line") == "4" and "no_such_tool" in problem.inner_text()
    assert text.input_value() == bad  # the text is kept for fixing
    assert httpx.get(f"{ui.api}/v1/agents/writer", headers=h).json()["version"] == 2
    shot(page, "agent")
    for path, marker in (("/ui/tools", "tr[data-tool=python]"), ("/ui/skills", "h1"),
                         ("/ui/policies", "h1")):
        assert page.goto(f"{ui.api}{path}").status == 200
        assert page.locator(marker).count() >= 1, path
    ctx.close()


def test_drain_a_node_on_the_nodes_page_then_resume_it(browser, ui):
    """The operator's drain: the API's rules (404, 403), the button, no new work goes to
    the node while it drains (a tool call finds no node), and Resume brings it back."""
    admin = ui.cluster.admin
    [node] = httpx.get(f"{ui.api}/v1/nodes", headers=admin).json()["nodes"]
    nid = node["node_id"]
    _, h = ui.tenant()
    sid = ui.session(h)
    assert httpx.post(f"{ui.api}/v1/nodes/missing-node/drain", headers=admin).status_code == 404
    assert httpx.post(f"{ui.api}/v1/nodes/{nid}/drain", headers=h).status_code == 403
    ctx, page = login(browser, ui, ui.cluster.admin_key)
    page.goto(f"{ui.api}/ui/nodes")
    row = page.locator(f"tr[data-node='{nid}']")
    row.get_by_role("button", name="Drain").click()
    page.get_by_role("status").filter(has_text=f"node {nid} draining").wait_for()
    row.locator(".status").filter(has_text="draining").wait_for()  # live
    shot(page, "nodes-draining")
    wait_until(lambda: httpx.get(f"{ui.api}/v1/nodes/{nid}", headers=admin).json()["load"]["draining"],
               15, 0.2, "the node's heartbeats to say draining")
    invoke = f"{ui.api}/v1/sessions/{sid}/tools/python/invoke"
    resp = httpx.post(invoke, headers=h, timeout=30, json={"arguments": {"code": "print(1)"}})
    assert resp.status_code == 503, resp.text  # no new work for a draining node
    again = httpx.post(f"{ui.api}/v1/nodes/{nid}/drain", headers=admin)
    assert again.status_code == 200 and again.json()["status"] == "draining"  # harmless
    row.get_by_role("button", name="Resume").click()
    page.get_by_role("status").filter(has_text=f"node {nid} resumed").wait_for()
    row.locator(".status").filter(has_text="online").wait_for()
    wait_until(lambda: not httpx.get(f"{ui.api}/v1/nodes/{nid}", headers=admin).json()["load"]["draining"],
               15, 0.2, "the node's heartbeats to say it takes work")
    resp = httpx.post(invoke, headers=h, timeout=30, json={"arguments": {"code": "print(1)"}})
    assert resp.status_code == 200 and resp.json()["status"] == "finished", resp.text
    ctx.close()
