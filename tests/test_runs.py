"""Agent runs end to end: a scripted model (tests/fake_upstream.py's FAKE_AGENT, the
OpenAI protocol over real HTTP) drives multi-step runs with real tools in the real
sandbox on a real node; two orchestrator processes share the runs, and the one that
drives a run is killed with SIGKILL at chosen moments.

Everything is real but the hosted model: NATS, Postgres, orchestrators, provider and
node as processes. Each test is its own tenant.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest

from tests.conftest import new_database
from tests.llm_cluster import LLMCluster, start_llm_cluster
from tests.support import ServiceProc, free_port_str, wait_http_ok, wait_until

pytestmark = pytest.mark.slow

CRASH_RUNS = int(os.environ.get("NEXUS_TEST_CRASH_RUNS", "8"))  # `make test-runs-crash`: 20


class _Counter(BaseHTTPRequestHandler):
    """A side-effecting HTTP endpoint that counts each execution, slowly (so a test can
    kill the orchestrator while a call is in flight)."""

    hits: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()
    delay_s = 0.0

    def do_POST(self) -> None:
        key = self.path.rsplit("/", 1)[-1].split("?")[0]
        with _Counter.lock:
            _Counter.hits[key] = _Counter.hits.get(key, 0) + 1
        time.sleep(_Counter.delay_s)
        body = json.dumps({"bumped": key}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Agentic:
    def __init__(self, cluster: LLMCluster, node: ServiceProc, counter: ThreadingHTTPServer) -> None:
        self.cluster = cluster
        self.node = node
        self.counter = counter

    @property
    def api(self) -> str:
        return self.cluster.apis[0]

    def restart_node(self) -> None:
        """SIGKILL the node and start it again (same id, same workspace); back once it runs
        a tool call again."""
        self.node.kill()
        self.node.start()
        key = self.cluster.tenant_key()
        sid = new_session(self, key)

        def serves() -> bool:
            resp = httpx.post(f"{self.api}/v1/sessions/{sid}/tools/python/invoke", headers=key,
                              json={"arguments": {"code": "print(1)"}}, timeout=30)
            return resp.status_code == 200 and resp.json()["status"] == "finished"
        wait_until(serves, 90, 0.5, "the restarted node to run tools")

    def kill_orchestrator(self, i: int = 0) -> None:
        """SIGKILL one orchestrator (a crash: no cleanup), start a fresh one at the end."""
        proc = self.cluster.orchestrators.pop(i)
        self.cluster.apis.pop(i)
        proc.kill()
        self.cluster.start_orchestrator()


@pytest.fixture(scope="module")
def agentic(infra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    cluster = start_llm_cluster(infra, tmp, new_database(infra), orchestrators=2,
                                NEXUS_RUN_LEASE_S="1.5", NEXUS_RUN_SCAN_S="0.2",
                                NEXUS_RUN_APPROVAL_TTL_S="120",
                                NEXUS_ORCHESTRATOR_LOST_AFTER_S="1",
                                NEXUS_NODE_OFFLINE_AFTER_S="4")
    env = {k: v for k, v in cluster.env.items() if k != "DATABASE_URL"}
    node = ServiceProc("node", {**env, "NEXUS_NODE_DATA_DIR": str(tmp / "node"),
                                "NEXUS_INSTANCE_ID": "node-runs", "NEXUS_METRICS_PORT": free_port_str()},
                       tmp / "node.log").start()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_until(lambda: any(n["status"] == "online" for n in httpx.get(
            f"{cluster.api}/v1/nodes", headers=cluster.admin).json()["nodes"]), 60, 0.2, "a node")
        yield Agentic(cluster, node, server)
    finally:
        server.shutdown()
        node.stop()
        cluster.stop()


@pytest.fixture
def tenant(agentic) -> dict[str, str]:
    agentic.cluster.primary.reset()
    agentic.cluster.primary.configure(first_byte_delay_ms=0, token_delay_ms=0)
    _Counter.delay_s = 0.0
    return agentic.cluster.tenant_key()


def define_agent(agentic: Agentic, key, name: str, tools: list[str], **front) -> None:
    lines = [f"name: {name}", "description: a test agent", f"tools: [{', '.join(tools)}]",
             "model: default"] + [f"{k}: {json.dumps(v) if isinstance(v, list) else v}"
                                  for k, v in front.items()]
    markdown = "---\n" + "\n".join(lines) + "\n---\nYou are a test agent. Use the tools.\n"
    resp = httpx.post(f"{agentic.api}/v1/agents", headers=key, json={"markdown": markdown})
    assert resp.status_code == 201, resp.text


def define_bump(agentic: Agentic, key, name: str = "bump", effect: str = "side_effecting") -> None:
    port = agentic.counter.server_address[1]
    resp = httpx.post(f"{agentic.api}/v1/tools", headers=key, json={
        "name": name, "kind": "http", "effect": effect,
        "parameters": {"type": "object", "required": ["key"],
                       "properties": {"key": {"type": "string"}}},
        "http": {"method": "POST", "url_template": f"http://127.0.0.1:{port}/bump/{{key}}"},
        "limits": {"timeout_s": 20}})
    assert resp.status_code == 201, resp.text


def new_session(agentic: Agentic, key, rules=None, budget=5.0) -> str:
    body: dict = {"policy_rules": rules or {"tools_allow": ["*"]}}
    if budget is not None:
        body["budget"] = {"limit_usd": budget}
    resp = httpx.post(f"{agentic.api}/v1/sessions", headers=key, json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["session_id"]


def start(agentic: Agentic, key, sid: str, agent: str, steps: list, answer: str = "all done",
          api: str | None = None, **headers) -> dict:
    script = json.dumps({"steps": steps, "answer": answer})
    resp = httpx.post(f"{api or agentic.api}/v1/sessions/{sid}/runs", headers={**key, **headers},
                      json={"agent": agent, "input": f"please do it FAKE_AGENT={script}"}, timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()


def run_of(agentic: Agentic, key, run_id: str) -> dict:
    resp = httpx.get(f"{agentic.api}/v1/runs/{run_id}", headers=key, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_status(agentic: Agentic, key, run_id: str, *statuses: str, timeout: float = 60) -> dict:
    def done() -> dict | None:
        run = run_of(agentic, key, run_id)
        return run if run["status"] in statuses else None

    return wait_until(done, timeout, 0.1, f"run {run_id} to be {statuses}")  # type: ignore[return-value]


def run_events(agentic: Agentic, sid: str) -> list:
    return agentic.cluster.events(sid)


def types_of(agentic: Agentic, sid: str, prefix: str = "Run") -> list[str]:
    return [e.type for e in run_events(agentic, sid) if e.type.startswith(prefix)]


def py(code: str) -> dict:
    return {"name": "python", "arguments": {"code": code}}


# -- the loop ----------------------------------------------------------------------------


def test_two_step_run_tool_then_answer_and_the_whole_story_is_kept(agentic, tenant) -> None:
    define_agent(agentic, tenant, "calc", ["python"])
    sid = new_session(agentic, tenant)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    run = start(agentic, tenant, sid, "calc", [[py("print(6 * 7)")]], "the answer is {last_tool}",
                **key)
    again = start(agentic, tenant, sid, "calc", [[py("print(6 * 7)")]], "the answer is {last_tool}",
                  **key)
    assert again["run_id"] == run["run_id"]  # the retry did not start a second run
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "finished", done
    assert done["answer"] == "the answer is 42" and done["steps"] == 2
    assert done["tool_calls"][0]["status"] == "finished" and done["cost_usd"] > 0
    assert types_of(agentic, sid) == [
        "RunStarted", "RunStepStarted", "RunLLMCallLinked", "RunModelAnswered",
        "RunToolCallStarted", "RunToolResult", "RunStepStarted", "RunLLMCallLinked",
        "RunModelAnswered", "RunFinished"]
    tool_call = done["tool_calls"][0]["tool_call_id"]
    # the tool path recorded the result with the call's end, in one transaction (joint.py)
    at = {(e.type, e.stream_id): e.recorded_at for e in run_events(agentic, sid)}
    assert at[("RunToolResult", f"run-{run['run_id']}")] == \
        at[("ToolCallFinished", f"toolcall-{tool_call}")]
    assert httpx.get(f"{agentic.api}/v1/sessions/{sid}/tool-calls/{tool_call}",
                     headers=tenant).json()["run_id"] == run["run_id"]
    messages = httpx.get(f"{agentic.api}/v1/sessions/{sid}/messages", headers=tenant).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "python"
    assert messages[2]["tool_call_id"] == messages[1]["tool_calls"][0]["id"]
    assert "42" in messages[2]["content"] and messages[3]["content"] == "the answer is 42"
    listed = httpx.get(f"{agentic.api}/v1/sessions/{sid}/runs", headers=tenant).json()["runs"]
    assert [(r["run_id"], r["status"]) for r in listed] == [(run["run_id"], "finished")]
    # the stream: every event with its version as id; Last-Event-ID resumes after it
    with httpx.stream("GET", f"{agentic.api}/v1/runs/{run['run_id']}/stream", headers=tenant,
                      timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        ids = [int(line[4:]) for line in resp.iter_lines() if line.startswith("id: ")]
    assert ids == list(range(1, 11))
    with httpx.stream("GET", f"{agentic.api}/v1/runs/{run['run_id']}/stream", timeout=30,
                      headers={**tenant, "Last-Event-ID": "7"}) as resp:
        body = resp.read().decode()
    assert "id: 7\n" not in body and "id: 8\n" in body and "event: RunFinished" in body


def test_the_stream_delivers_tokens_live_then_the_final_answer(agentic, tenant) -> None:
    define_agent(agentic, tenant, "talker", ["python"])
    sid = new_session(agentic, tenant)
    # slow enough that the viewer is connected before the first token (deltas are live
    # only: a viewer that connects later reads the answer from RunModelAnswered)
    agentic.cluster.primary.configure(first_byte_delay_ms=2000, token_delay_ms=100)
    try:
        run = start(agentic, tenant, sid, "talker", [], "one two three four five six")
        with httpx.stream("GET", f"{agentic.api}/v1/runs/{run['run_id']}/stream", headers=tenant,
                          timeout=30) as resp:
            lines = list(resp.iter_lines())
    finally:
        agentic.cluster.primary.configure(first_byte_delay_ms=0, token_delay_ms=0)
    events = [line[7:] for line in lines if line.startswith("event: ")]
    deltas = [json.loads(line[6:])["data"]["text"] for line, prev in zip(lines[1:], lines)
              if prev == "event: delta" and line.startswith("data: ")]
    assert events.index("delta") < events.index("RunModelAnswered") < events.index("RunFinished")
    assert "".join(deltas) == "one two three four five six"


def test_parallel_tool_calls_and_a_tool_error_fed_back(agentic, tenant) -> None:
    define_agent(agentic, tenant, "par", ["python"])
    sid = new_session(agentic, tenant)
    run = start(agentic, tenant, sid, "par",
                [[py("print('left')"), py("print('right')")], [py("raise ValueError('boom')")]],
                "saw {last_tool}")
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "finished", done
    assert "ValueError: boom" in done["answer"]  # the error reached the model as the result
    kinds = types_of(agentic, sid)
    first_result = kinds.index("RunToolResult")
    assert kinds[:first_result].count("RunToolCallStarted") == 2  # both started before any ended
    results = [e.event for e in run_events(agentic, sid) if e.type == "RunToolResult"]
    assert sorted(r.content.strip() for r in results[:2]) == ["left", "right"]
    assert results[2].is_error


def test_max_steps_stops_the_run(agentic, tenant) -> None:
    define_agent(agentic, tenant, "loopy", ["python"], max_steps=2)
    sid = new_session(agentic, tenant)
    run = start(agentic, tenant, sid, "loopy", [[py("print(1)")]] * 5)
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "failed" and done["error"] == "max_steps", done
    assert done["steps"] == 2


def test_the_runs_budget_stops_it_mid_run_and_nothing_is_overspent(agentic, tenant) -> None:
    define_agent(agentic, tenant, "spender", ["python"], max_cost_usd=0.004)
    sid = new_session(agentic, tenant)
    run = start(agentic, tenant, sid, "spender", [[py("print(1)")]] * 8)
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "failed" and done["error"] == "budget", done
    assert 1 <= done["steps"] < 8
    answers = [e.event for e in run_events(agentic, sid) if e.type == "RunModelAnswered"]
    # price of fake-small: $1/M in, $2/M out; the usage each answer reported
    spent = sum(a.input_tokens * 1 + a.output_tokens * 2 for a in answers)
    assert spent == round(done["cost_usd"] * 1e6) and spent <= 4000
    budget = [e.event for e in run_events(agentic, sid)
              if e.type == "BudgetExceeded"]
    assert budget and budget[-1].budget_id == f"budget-run-{run['run_id']}"
    # each answer was recorded in the transaction that committed its cost (joint.py)
    recorded = {(e.type, getattr(e.event, "call_id", None)): e.recorded_at
                for e in run_events(agentic, sid)}
    assert all(recorded[("RunModelAnswered", a.call_id)] == recorded[("BudgetCommitted", a.call_id)]
               for a in answers)


def test_a_policy_denied_tool_is_fed_back_and_the_run_goes_on(agentic, tenant) -> None:
    define_agent(agentic, tenant, "denied", ["python", "files.list"])
    sid = new_session(agentic, tenant, rules={"tools_allow": ["files.*"]})
    run = start(agentic, tenant, sid, "denied", [[py("print(1)")]], "{last_tool}")
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "finished", done
    assert done["tool_calls"][0]["status"] == "denied"
    assert "denied by policy" in done["answer"]


# -- approvals ---------------------------------------------------------------------------


def test_approval_pauses_survives_restarts_and_resumes(agentic, tenant) -> None:
    define_bump(agentic, tenant)
    define_agent(agentic, tenant, "gated", ["bump"], approval=["bump"])
    sid = new_session(agentic, tenant)
    k = uuid.uuid4().hex
    run = start(agentic, tenant, sid, "gated", [[{"name": "bump", "arguments": {"key": k}}]],
                "bumped {last_tool}")
    waiting = wait_status(agentic, tenant, run["run_id"], "awaiting_approval")
    [pending] = waiting["pending_approvals"]
    assert pending["tool"] == "bump" and pending["arguments"] == {"key": k}
    assert _Counter.hits.get(k, 0) == 0  # nothing ran
    # not waiting for that: 409; a member cannot approve: 403
    wrong = httpx.post(f"{agentic.api}/v1/runs/{run['run_id']}/approvals", headers=tenant,
                       json={"tool_call_id": "nope", "decision": "approve"})
    assert wrong.status_code == 409, wrong.text
    # every service restarts (kill -9): orchestrators, provider, node; the pause is in the events
    for _ in range(len(agentic.cluster.orchestrators)):
        agentic.kill_orchestrator(0)
    agentic.cluster.providers[0].kill()  # (kept in the list: the next one logs to its own file)
    agentic.cluster.start_provider()
    agentic.restart_node()
    assert run_of(agentic, tenant, run["run_id"])["status"] == "awaiting_approval"
    ok = httpx.post(f"{agentic.api}/v1/runs/{run['run_id']}/approvals", headers=tenant,
                    json={"tool_call_id": pending["tool_call_id"], "decision": "approve",
                          "reason": "fine"})
    assert ok.status_code == 200, ok.text
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "finished" and k in done["answer"], (done["error"], done["detail"])
    assert _Counter.hits[k] == 1


def test_a_rejection_is_fed_back_and_the_tool_never_runs(agentic, tenant) -> None:
    define_bump(agentic, tenant)
    define_agent(agentic, tenant, "gated", ["bump"], approval=["bump"])
    sid = new_session(agentic, tenant)
    k = uuid.uuid4().hex
    run = start(agentic, tenant, sid, "gated", [[{"name": "bump", "arguments": {"key": k}}]],
                "{last_tool}")
    [pending] = wait_status(agentic, tenant, run["run_id"], "awaiting_approval")["pending_approvals"]
    resp = httpx.post(f"{agentic.api}/v1/runs/{run['run_id']}/approvals", headers=tenant,
                      json={"tool_call_id": pending["tool_call_id"], "decision": "reject",
                            "reason": "not today"})
    assert resp.status_code == 200, resp.text
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "finished" and "not today" in done["answer"]
    assert done["tool_calls"][0]["status"] == "rejected"
    assert _Counter.hits.get(k, 0) == 0


def test_an_approval_never_given_expires_and_a_cancel_ends_a_run(agentic, tenant) -> None:
    define_bump(agentic, tenant)
    define_agent(agentic, tenant, "gated", ["bump"], approval=["bump"])
    sid = new_session(agentic, tenant)
    run = start(agentic, tenant, sid, "gated", [[{"name": "bump", "arguments": {"key": "x"}}]])
    wait_status(agentic, tenant, run["run_id"], "awaiting_approval")
    cancelled = httpx.post(f"{agentic.api}/v1/runs/{run['run_id']}/cancel", headers=tenant,
                           json={"reason": "changed my mind"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert httpx.post(f"{agentic.api}/v1/runs/{run['run_id']}/cancel",
                      headers=tenant).status_code == 409
    # expiry: an orchestrator whose NEXUS_RUN_APPROVAL_TTL_S is 2 s asks for the approval;
    # nobody answers, and the run fails approval_expired (whoever takes it up then)
    cluster = agentic.cluster
    port = free_port_str()
    quick = ServiceProc("orchestrator", {**cluster.env, "NEXUS_HTTP_PORT": port,
                                         "NEXUS_INSTANCE_ID": f"orch-quick-{port}",
                                         "NEXUS_RUN_APPROVAL_TTL_S": "2"},
                        cluster.tmp / f"orchestrator-quick-{port}.log").start()
    try:
        api = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{api}/health", timeout=90, proc=quick)  # a busy 2-core machine
        expiring = start(agentic, tenant, sid, "gated",
                         [[{"name": "bump", "arguments": {"key": "y"}}]], api=api)
        done = wait_status(agentic, tenant, expiring["run_id"], "failed", timeout=60)
        assert done["error"] == "approval_expired", done
    finally:
        quick.stop()


def test_a_cancel_interrupts_the_answer_being_generated_and_releases_its_reservation(
        agentic, tenant) -> None:
    """A cancel stops the LLM call in flight at once (the upstream's stream is cut, far
    from its end), through the call path: its reservation is released, not left open."""
    define_agent(agentic, tenant, "rambler", ["python"])
    sid = new_session(agentic, tenant)
    words = [f"w{i}" for i in range(600)]
    agentic.cluster.primary.configure(token_delay_ms=50)
    try:
        run = start(agentic, tenant, sid, "rambler", [], " ".join(words))
        with httpx.stream("GET", f"{agentic.api}/v1/runs/{run['run_id']}/stream", headers=tenant,
                          timeout=60) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line == "event: delta")  # being generated
            # through the other orchestrator: the one driving the run is told over NATS
            cancel = httpx.post(f"{agentic.cluster.apis[-1]}/v1/runs/{run['run_id']}/cancel",
                                headers=tenant, json={"reason": "enough"}, timeout=30)
            assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
            rest = [line[7:] for line in lines if line.startswith("event: ")]
    finally:
        agentic.cluster.primary.configure(token_delay_ms=0)
    assert rest[-1] == "RunCancelled" and "RunModelAnswered" not in rest
    stats = agentic.cluster.primary.wait_for(lambda st: st.in_flight == 0, 30, "the upstream call to end")
    [outcome] = [o for o in stats.outcomes if o["stream"]]
    assert outcome["outcome"] == "cancelled", outcome  # the client went away: cut, not finished
    assert outcome["tokens_sent"] < len(words) // 2, outcome
    [linked] = [e.event for e in run_events(agentic, sid) if e.type == "RunLLMCallLinked"]

    def budget() -> dict:
        return httpx.get(f"{agentic.api}/v1/sessions/{sid}/budget", headers=tenant).json()["session"]

    # admitted from a slice of the session's budget (leases, the default): the call's hold
    # goes with it, nothing is charged, and the idle slice goes back whole
    assert [e.type for e in run_events(agentic, sid)].count("BudgetLeased") == 1
    wait_until(lambda: budget()["leased_usd"] == 0, 30, 0.2, "the idle slice to go back")
    assert not [e for e in run_events(agentic, sid) if e.type == "BudgetCommitted"
                and e.event.call_id == linked.call_id]
    assert budget()["reserved_usd"] == budget()["committed_usd"] == 0
    assert types_of(agentic, sid)[-1] == "RunCancelled"


# -- crashes -----------------------------------------------------------------------------


def _owner_events(agentic: Agentic, sid: str, kind: str) -> bool:
    return any(e.type == kind for e in run_events(agentic, sid))


def test_kill_during_an_llm_call_retries_it_and_leaks_no_reservation(agentic, tenant) -> None:
    define_agent(agentic, tenant, "slow", ["python"])
    sid = new_session(agentic, tenant)
    agentic.cluster.primary.configure(first_byte_delay_ms=2500)
    run = start(agentic, tenant, sid, "slow", [[py("print(5)")]], "{last_tool}")
    wait_until(lambda: _owner_events(agentic, sid, "RunLLMCallLinked"), 20, 0.05, "the LLM call")
    agentic.kill_orchestrator(0)
    agentic.cluster.primary.configure(first_byte_delay_ms=0)
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "finished" and done["answer"] == "5", done
    kinds = types_of(agentic, sid)
    assert "RunResumed" in kinds and kinds.count("RunModelAnswered") == 2  # one per step
    assert kinds.count("RunLLMCallLinked") == 3  # the interrupted call was sent again

    def settled() -> bool:
        budget = httpx.get(f"{agentic.api}/v1/sessions/{sid}/budget", headers=tenant).json()
        return budget["session"]["reserved_usd"] == 0
    wait_until(settled, 20, 0.2, "the interrupted call's reservation to be released")


def test_kill_during_a_side_effecting_tool_call_asks_before_running_it_again(agentic, tenant) -> None:
    define_bump(agentic, tenant)
    define_agent(agentic, tenant, "bumper", ["bump"])
    sid = new_session(agentic, tenant)
    k = uuid.uuid4().hex
    _Counter.delay_s = 2.0
    run = start(agentic, tenant, sid, "bumper", [[{"name": "bump", "arguments": {"key": k}}]],
                "{last_tool}")
    wait_until(lambda: _Counter.hits.get(k), 20, 0.05, "the tool to run")
    agentic.kill_orchestrator(0)
    waiting = wait_status(agentic, tenant, run["run_id"], "awaiting_approval")
    [pending] = waiting["pending_approvals"]
    assert pending["reason"] == "outcome_unknown"
    _Counter.delay_s = 0.0
    resp = httpx.post(f"{agentic.api}/v1/runs/{run['run_id']}/approvals", headers=tenant,
                      json={"tool_call_id": pending["tool_call_id"], "decision": "reject"})
    assert resp.status_code == 200, resp.text
    done = wait_status(agentic, tenant, run["run_id"], "finished", "failed")
    assert done["status"] == "finished" and "outcome is unknown" in done["answer"], done
    assert _Counter.hits[k] == 1  # never run twice


def test_kill_the_owner_of_many_runs_at_every_moment(agentic, tenant) -> None:
    """CRASH_RUNS runs (idempotent reads, side-effecting bumps, approvals) started on one
    orchestrator, killed while they are in flight: every run ends exactly once, no
    side-effecting call ran twice without a human's yes, no reservation stays open."""
    define_bump(agentic, tenant)
    define_bump(agentic, tenant, "peek", effect="read_only")
    define_agent(agentic, tenant, "mixed", ["bump", "peek", "python"], approval=["peek"])
    sid = new_session(agentic, tenant, budget=50)
    _Counter.delay_s = 0.3
    keys = [uuid.uuid4().hex for _ in range(CRASH_RUNS)]
    runs = [start(agentic, tenant, sid, "mixed", [
        [{"name": "bump", "arguments": {"key": k}}, py("print('x')")],
        [{"name": "peek", "arguments": {"key": k + "p"}}],
        [{"name": "bump", "arguments": {"key": k + "b"}}]])["run_id"] for k in keys]
    time.sleep(0.6)  # some in an LLM call, some in tools, some between steps
    agentic.kill_orchestrator(0)
    deadline = time.monotonic() + 120
    ended: dict[str, dict] = {}
    while len(ended) < len(runs) and time.monotonic() < deadline:
        for run_id in runs:
            if run_id in ended:
                continue
            run = run_of(agentic, tenant, run_id)
            for pending in run["pending_approvals"]:  # the human: yes to reads, no to re-runs
                httpx.post(f"{agentic.api}/v1/runs/{run_id}/approvals", headers=tenant, json={
                    "tool_call_id": pending["tool_call_id"],
                    "decision": "approve" if pending["reason"] == "needs_approval" else "reject"})
            if run["status"] in ("finished", "failed", "cancelled"):
                ended[run_id] = run
        time.sleep(0.2)
    _Counter.delay_s = 0.0
    assert len(ended) == len(runs), "every run ends"
    assert all(r["status"] == "finished" for r in ended.values()), ended
    events = run_events(agentic, sid)
    for run_id in runs:
        mine = [e for e in events if getattr(e.event, "run_id", None) == run_id]
        assert sum(e.type in ("RunFinished", "RunFailed", "RunCancelled") for e in mine) == 1
        answered = [e.event.step for e in mine if e.type == "RunModelAnswered"]
        assert len(answered) == len(set(answered)) == 4
    for k in keys:
        assert _Counter.hits.get(k, 0) <= 1 and _Counter.hits.get(k + "b", 0) <= 1
        assert _Counter.hits.get(k, 0) == 1 or _Counter.hits.get(k + "b", 0) <= 1

    def settled() -> bool:
        budget = httpx.get(f"{agentic.api}/v1/sessions/{sid}/budget", headers=tenant).json()
        return budget["session"]["reserved_usd"] == 0
    wait_until(settled, 30, 0.2, "no reservation left open")


# -- bad input ---------------------------------------------------------------------------


def test_bad_input_is_a_clear_problem(agentic, tenant) -> None:
    sid = new_session(agentic, tenant)
    unknown = httpx.post(f"{agentic.api}/v1/sessions/{sid}/runs", headers=tenant,
                         json={"agent": "no-such-agent", "input": "hi"})
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["errors"][0]["field"] == "agent"
    other = agentic.cluster.tenant_key()
    theirs = httpx.post(f"{agentic.api}/v1/sessions/{sid}/runs", headers=other,
                        json={"agent": "research", "input": "hi"})
    assert theirs.status_code == 404, theirs.text
    missing = httpx.get(f"{agentic.api}/v1/runs/{uuid.uuid4()}", headers=tenant)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    empty = httpx.post(f"{agentic.api}/v1/sessions/{sid}/runs", headers=tenant,
                       json={"agent": "research"})
    assert empty.status_code == 400 and "input" in empty.text


def test_the_runs_read_model_equals_its_rebuild(agentic, tenant) -> None:
    """The `runs` projection as maintained (after every run of this module, crashes and
    takeovers included, and one of its own) equals a rebuild from the events."""
    import asyncio

    define_agent(agentic, tenant, "plain", ["python"])
    sid = new_session(agentic, tenant)
    run = start(agentic, tenant, sid, "plain", [[py("print(3)")]], "{last_tool}")
    assert wait_status(agentic, tenant, run["run_id"], "finished")["answer"] == "3"

    from services.orchestrator.read_models.runs import RunsProjection, RunsReadModel
    from shared.infra.eventstore import EventStore, ProjectionRunner
    from shared.infra.eventstore.store import create_pool

    async def compare() -> None:
        pool = await create_pool(agentic.cluster.database_url, max_size=2)
        try:
            store = EventStore(pool)
            runner = ProjectionRunner(store, [RunsProjection()])
            await runner.catch_up()
            live = await RunsReadModel(store).all_rows()
            await runner.rebuild("runs")
            assert live and await RunsReadModel(store).all_rows() == live
        finally:
            await pool.close()

    asyncio.run(compare())
