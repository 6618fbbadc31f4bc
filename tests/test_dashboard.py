"""The dashboard (/ui) in a real browser: headless Debian chromium driven by Playwright's
Python API (`executable_path`, never `playwright install`), against a real orchestrator
and node as processes on a NATS of their own (the model store and download progress must
not meet another test's orchestrator) and a fresh database.

Screenshots of each page go to `test-artifacts/dashboard/` (gitignored); with
`NEXUS_UPDATE_SCREENSHOTS=1` they also replace `docs/screenshots/`.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.orchestrator.ui import assets
from shared.infra import EmbeddedNats
from shared.infra.settings import get_settings
from tests.conftest import new_database
from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
DOCS = REPO / "docs" / "screenshots"
MIB = 1024 * 1024
playwright = pytest.importorskip("playwright.sync_api")


class Dash:
    def __init__(self, api: str, admin_key: str, nats_url: str, tmp: Path, env: dict, procs: dict):
        self.api, self.admin_key, self.nats_url, self.tmp = api, admin_key, nats_url, tmp
        self.env, self.procs = env, procs
        self.admin = {"Authorization": f"Bearer {admin_key}"}

    def key(self, tenant: str, role: str = "admin") -> tuple[str, str]:
        resp = httpx.post(f"{self.api}/v1/keys", headers=self.admin,
                          json={"name": "ui", "role": role, "tenant": tenant})
        assert resp.status_code == 201, resp.text
        return resp.json()["key_id"], resp.json()["key"]


@pytest.fixture(scope="module")
def dash(infra, tmp_path_factory):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    if assets.missing(get_settings().cache_dir):
        pytest.fail("the dashboard's assets are not cached: `make test` runs `nexus ui assets`")
    tmp = tmp_path_factory.mktemp("dashboard")
    server = EmbeddedNats(tmp / "nats")
    server.start()
    admin = f"admin-{uuid.uuid4().hex}"
    port = free_port_str()
    env = service_env(server.url, new_database(infra), NEXUS_ADMIN_KEY=admin, NEXUS_HTTP_PORT=port,
                      NEXUS_HEARTBEAT_INTERVAL_S="0.5", NEXUS_PROJECTION_POLL_S="0.2",
                      NEXUS_NODE_OFFLINE_AFTER_S="5", NEXUS_MODEL_PROGRESS_INTERVAL_S="0.25",
                      NEXUS_GRAFANA_URL="http://grafana.test:3000")
    procs = {"orchestrator": ServiceProc("orchestrator", env, tmp / "orchestrator.log").start()}
    api = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{api}/health", timeout=90, proc=procs["orchestrator"])
        yield Dash(api, admin, server.url, tmp, env, procs)
    finally:
        for proc in procs.values():
            if proc.proc and proc.proc.poll() is None:
                proc.stop()
        server.stop()


@pytest.fixture(scope="module")
def browser(dash):
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    if os.environ.get("NEXUS_UPDATE_SCREENSHOTS"):
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / f"{name}.png", DOCS / f"{name}.png")


def login(browser, dash: Dash, key: str, **context):
    ctx = browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context})
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{dash.api}/ui/")
    assert page.url.endswith("/ui/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/ui/$"))
    return ctx, page


def test_wrong_key_is_refused_then_login_and_logout(browser, dash):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(f"{dash.api}/ui/nodes")  # not logged in: the login form
    assert page.url.endswith("/ui/login")
    page.get_by_label("API key").fill("nx_0123456789abcdef_not-a-real-key-at-all")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text().startswith("That key is not valid")
    assert not [c for c in ctx.cookies() if c["name"] == "nexus_ui"]
    shot(page, "login")
    ctx.close()
    ctx, page = login(browser, dash, dash.admin_key)
    [cookie] = [c for c in ctx.cookies() if c["name"] == "nexus_ui"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert dash.admin_key not in cookie["value"]
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(re.compile(r"/ui/login$"))
    page.goto(f"{dash.api}/ui/")
    assert page.url.endswith("/ui/login")
    ctx.close()


def test_a_node_appears_live_and_its_load_moves(browser, dash):
    ctx, page = login(browser, dash, dash.admin_key)
    page.goto(f"{dash.api}/ui/nodes")
    assert page.get_by_text("No node has registered yet.").is_visible()
    node_env = {**{k: v for k, v in dash.env.items() if k != "DATABASE_URL"},
                "NEXUS_NODE_DATA_DIR": str(dash.tmp / "node"), "NEXUS_METRICS_PORT": "0",
                "NEXUS_FAKE_GPU_MEMORY_GIB": "8", "NEXUS_MODEL_PULL_RATE_BPS": str(2 * MIB),
                "NEXUS_RUNTIME": "none"}
    dash.procs["node"] = ServiceProc("node", node_env, dash.tmp / "node.log").start()
    row = page.locator("tr[data-node]")  # pushed over SSE: the page is never reloaded
    row.wait_for(timeout=60_000)
    assert "online" in row.locator(".status").inner_text()
    spark = row.locator("svg.spark polyline")
    spark.wait_for()
    first = spark.get_attribute("points")
    page.wait_for_function(  # the next heartbeats move the load line
        "p => { const el = document.querySelector('tr[data-node] svg.spark polyline');"
        " return el && el.getAttribute('points') !== p; }", arg=first)
    cpu = row.locator("[data-metric=cpu] [role=meter]")
    assert 0 <= float(cpu.get_attribute("aria-valuenow")) <= 100
    assert row.locator("[data-metric=gpu-memory] [role=meter]").count() == 1  # the fake 8 GiB GPU
    shot(page, "nodes")
    page.goto(f"{dash.api}/ui/")
    page.locator("[data-figure=nodes-online]").filter(has_text="1").wait_for()
    shot(page, "overview")
    ctx.close()


def test_distribute_a_model_and_watch_its_progress_to_the_end(browser, dash):
    from ops.models_cli import import_model
    from shared.infra.gguf import write_tiny

    node = wait_until(lambda: httpx.get(f"{dash.api}/v1/nodes", headers=dash.admin,
                                        params={"status": "online"}).json()["nodes"] or None,
                      60, 0.2, "the node online")[0]["node_id"]
    path = dash.tmp / "ui-tiny.gguf"
    write_tiny(path, payload_bytes=6 * MIB, seed=7)
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's loop
        pool.submit(asyncio.run, import_model(path, "ui-tiny", "file ui-tiny.gguf",
                                              nats_url=dash.nats_url, user=None,
                                              password=None)).result()
    ctx, page = login(browser, dash, dash.admin_key)
    page.goto(f"{dash.api}/ui/models")
    page.get_by_label("Model", exact=True).select_option("ui-tiny")
    page.get_by_label("Target", exact=True).select_option(node)
    page.get_by_role("button", name="Distribute").click()
    page.get_by_role("status").filter(has_text="download task(s) started").wait_for()
    cell = page.locator(f"td[data-node='{node}'][data-model='ui-tiny']")
    seen: list[int] = []
    def progress():
        bar = cell.locator("progress")
        if bar.count():
            seen.append(int(bar.get_attribute("value")))
            if len(seen) == 3:
                shot(page, "models")
        return cell.get_attribute("data-state") == "installed" or None
    wait_until(progress, 60, 0.1, "the model installed on the page")
    assert any(0 < v < 100 for v in seen), f"a live progress bar while bytes moved: {seen}"
    assert seen == sorted(seen), f"progress only moves forward: {seen}"
    [task] = [t for t in httpx.get(f"{dash.api}/v1/tasks", headers=dash.admin).json()["tasks"]
              if t["model"] == "ui-tiny"]
    assert task["status"] == "completed" and task["progress"] == 1.0
    assert page.locator(f"li[data-task='{task['task_id']}'][data-status=completed]").count() == 1
    ctx.close()


def test_events_tail_is_live_filtered_and_links_traces(browser, dash):
    tenant = f"ev{uuid.uuid4().hex[:6]}"
    _, key = dash.key(tenant)
    ctx, page = login(browser, dash, dash.admin_key)
    page.goto(f"{dash.api}/ui/events?type=SessionStarted")
    resp = httpx.post(f"{dash.api}/v1/sessions", headers={"Authorization": f"Bearer {key}"},
                      json={"budget": {"limit_usd": 1}})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    row = page.locator(f"tr[data-stream='session-{sid}']")
    row.wait_for()  # pushed live, no reload
    assert page.locator("tr[data-type]:not([data-type=SessionStarted])").count() == 0
    link = row.locator("a")
    assert link.get_attribute("href").startswith("http://grafana.test:3000/explore?")
    shot(page, "events")
    ctx.close()


def test_a_tenant_sees_only_its_own_tenant_even_by_url(browser, dash):
    a, b = f"ta{uuid.uuid4().hex[:6]}", f"tb{uuid.uuid4().hex[:6]}"
    _, key_a = dash.key(a)
    key_b_id, key_b = dash.key(b)
    sessions = {}
    for name, key in (("a", key_a), ("b", key_b)):
        resp = httpx.post(f"{dash.api}/v1/sessions", headers={"Authorization": f"Bearer {key}"},
                          json={"budget": {"limit_usd": 2}})
        assert resp.status_code == 201, resp.text
        sessions[name] = resp.json()["session_id"]
    ctx, page = login(browser, dash, key_b)
    assert page.goto(f"{dash.api}/ui/sessions/{sessions['b']}").status == 200
    resp = page.goto(f"{dash.api}/ui/sessions/{sessions['a']}")  # A's session, by URL
    assert resp.status == 404
    assert page.goto(f"{dash.api}/ui/models").status == 403  # the fleet is the platform's
    assert page.get_by_role("link", name="Models").count() == 0
    page.goto(f"{dash.api}/ui/events")  # B's tail: its own events, none of A's
    streams = page.locator("tr[data-stream]").evaluate_all("rows => rows.map(r => r.dataset.stream)")
    assert f"session-{sessions['b']}" in streams and f"session-{sessions['a']}" not in streams
    # an action without the CSRF token is refused, with the session cookie and all
    cookies = {c["name"]: c["value"] for c in ctx.cookies()}
    forged = httpx.post(f"{dash.api}/ui/logout", cookies=cookies)
    assert forged.status_code == 403
    # revoking B's key ends B's dashboard session (the key cache holds it up to 5 s)
    assert httpx.delete(f"{dash.api}/v1/keys/{key_b_id}", headers=dash.admin).status_code == 204
    wait_until(lambda: page.goto(f"{dash.api}/ui/").url.endswith("/ui/login") or None,
               15, 0.5, "the revoked key's session to end")
    ctx.close()


def test_the_overview_on_a_phone(browser, dash):
    ctx, page = login(browser, dash, dash.admin_key, viewport={"width": 390, "height": 844},
                      is_mobile=True, has_touch=True)
    page.locator("[data-figure=nodes-online]").wait_for()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"no horizontal scrolling on a phone: {width}px"
    page.keyboard.press("Tab")  # keyboard: the skip link comes first, and it is visible
    assert page.evaluate("document.activeElement.className") == "skip"
    shot(page, "overview-phone")
    ctx.close()
