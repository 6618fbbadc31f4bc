"""A real model answers: llama.cpp's llama-server with Gemma 3 270M, supervised by a node
agent, reached through orchestrator -> NATS -> provider -> NATS -> node -> runtime.

`make test` prepares the runtime first (`nexus runtime prepare`: built once per machine,
cached). The model is small and a base model: assertions are on protocol, streaming,
usage and events, never on the wording.
"""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from shared.infra import EmbeddedNats
from shared.infra.llama import local_model, server_path
from tests.conftest import new_database
from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok, wait_until

MODEL_NAME = local_model().name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(infra, tmp_path_factory, otlp):
    assert server_path().exists(), (
        f"{server_path()} is missing: run `nexus runtime prepare` (make test does) first")
    tmp = tmp_path_factory.mktemp("real")
    server = EmbeddedNats(tmp / "nats")
    server.start()
    admin = f"admin-{uuid.uuid4().hex}"
    port = free_port_str()
    env = service_env(server.url, new_database(infra), NEXUS_ADMIN_KEY=admin, NEXUS_HTTP_PORT=port,
                      NEXUS_HEARTBEAT_INTERVAL_S="0.5", NEXUS_PROJECTION_POLL_S="0.2",
                      OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint, OTEL_BSP_SCHEDULE_DELAY="100",
                      OTEL_METRIC_EXPORT_INTERVAL="500")
    procs = [
        ServiceProc("orchestrator", env, tmp / "orchestrator.log").start(),
        ServiceProc("provider", {**env, "NEXUS_METRICS_PORT": free_port_str()},
                    tmp / "provider.log").start(),
        ServiceProc("node", {**env, "NEXUS_RUNTIME": "llama", "NEXUS_NODE_DATA_DIR": str(tmp / "node"),
                             "NEXUS_METRICS_PORT": free_port_str(),
                             "NEXUS_NODE_MAX_CONCURRENCY": "1", "NEXUS_NODE_MAX_QUEUE": "0"},
                    tmp / "node.log").start(),
    ]
    api = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {admin}"}
    try:
        wait_http_ok(f"{api}/health", proc=procs[0])

        def ready_node() -> dict | None:
            nodes = httpx.get(f"{api}/v1/nodes", params={"model": MODEL_NAME, "status": "online"},
                              headers=headers).json()["nodes"]
            return nodes[0] if nodes and nodes[0]["runtime"]["ready"] else None

        node = wait_until(ready_node, 120, 0.5, "the node's llama-server to be ready")
        yield api, headers, node, procs
    finally:
        for proc in procs:
            if proc.proc and proc.proc.poll() is None:
                proc.stop(30)
        server.stop()


def test_node_reports_its_runtime(real) -> None:
    _, _, node, _ = real
    assert node["runtime"]["kind"] == "llama.cpp" and node["runtime"]["models"] == [MODEL_NAME]


def test_streamed_chat_through_all_services_and_the_real_model(real) -> None:
    api, headers, node, _ = real
    sdk = openai.OpenAI(base_url=f"{api}/v1", api_key=headers["Authorization"].split()[1],
                        max_retries=0, timeout=120)
    stream = sdk.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
        stream=True, stream_options={"include_usage": True})
    deltas, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        deltas += [c.delta.content for c in chunk.choices if c.delta.content]
    assert len(deltas) >= 2  # streamed, piece by piece
    assert 0 < usage.completion_tokens <= 12 and usage.prompt_tokens > 0

    reply = sdk.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "Count to three."}], max_tokens=8)
    completion = reply.parse()
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    session = reply.headers["x-nexus-session"]
    messages = httpx.get(f"{api}/v1/sessions/{session}/messages", headers=headers).json()["messages"]
    last = messages[-1]
    assert last["role"] == "assistant" and last["node"] == node["node_id"]
    assert last["provider"] == "node" and last["output_tokens"] > 0
    log = httpx.get(f"{api}/v1/sessions/{session}/events", headers=headers).json()["events"]
    completed = [e for e in log if e["type"] == "LLMCallCompleted"]
    assert completed and completed[-1]["data"]["node"] == node["node_id"]
    assert completed[-1]["data"]["usage_estimated"] is False


TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<eos>", "</s>")


def test_the_default_model_answers_in_its_own_template(real) -> None:
    """An instruction-tuned model, prompted with its own chat template, ends its turn:
    the answer is the model's reply alone, with no template tokens and no invented
    next turn, and it stops by itself instead of running to max_tokens."""
    api, headers, _, _ = real
    resp = httpx.post(f"{api}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": "default", "max_tokens": 160, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    answer = choice["message"]["content"]
    assert answer.strip() and not [t for t in TEMPLATE_TOKENS if t in answer], answer
    assert "\nuser" not in answer.lower() and "\nassistant" not in answer.lower(), answer
    assert choice["finish_reason"] == "stop", answer  # ended its turn, not cut off


def test_node_counts_its_requests_in_heartbeats(real) -> None:
    api, headers, node, _ = real

    def latency() -> float | None:  # arrives with the node's next heartbeat
        detail = httpx.get(f"{api}/v1/nodes/{node['node_id']}", headers=headers).json()
        return detail["load"]["avg_response_ms"]

    assert wait_until(latency, 10, 0.2, "the latency EWMA of the relayed calls") > 0


def test_one_trace_from_the_http_call_to_the_runtime(real, otlp) -> None:
    """orchestrator HTTP -> NATS publish -> provider process -> GenAI span -> NATS publish
    -> node process -> relay -> HTTP call to llama-server; the call's events share it."""
    api, headers, node, _ = real
    resp = httpx.post(f"{api}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": "default", "max_tokens": 6,
                            "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 200, resp.text
    call_id = resp.headers["x-nexus-call-id"]

    def genai_span():
        return next((s for s in list(otlp.spans) if s.service == "nexus-provider"
                     and s.name.startswith("chat ") and s.attributes.get("nexus.call_id") == call_id), None)

    genai = wait_until(genai_span, 20, 0.2, "the GenAI span of the call")
    assert genai.name == f"chat {MODEL_NAME}" and genai.kind == 3  # CLIENT
    assert genai.attributes["gen_ai.provider.name"] == "node"
    assert genai.attributes["gen_ai.request.model"] == MODEL_NAME
    assert genai.attributes["gen_ai.response.model"]
    assert genai.attributes["gen_ai.usage.output_tokens"] > 0
    assert genai.attributes["gen_ai.usage.input_tokens"] > 0

    def whole() -> list | None:
        spans = otlp.trace(genai.trace_id)
        names = {(s.service, s.name) for s in spans}
        wanted = {("nexus-node", f"relay {MODEL_NAME}")}
        return spans if wanted <= names and any(s.service == "nexus-orchestrator" and s.kind == 2
                                                for s in spans) else None

    spans = wait_until(whole, 20, 0.2, "spans of all three services")
    by_id = {s.span_id: s for s in spans}

    def chain(span):
        out = [span]
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            out.append(span)
        return out

    runtime_call = [s for s in spans if s.service == "nexus-node" and s.name in ("POST", "HTTP POST")
                    and "chat/completions" in str(s.attributes.get("url.full")
                                                  or s.attributes.get("http.url", ""))]
    assert runtime_call, [(s.name, s.attributes) for s in spans if s.service == "nexus-node"]
    path = [(s.service, s.name) for s in chain(runtime_call[0])]
    services = [svc for svc, _ in path]
    # from the runtime call up to the client's HTTP request, through every process
    assert services[0] == "nexus-node" and services[-1] == "nexus-orchestrator"
    assert ("nexus-node", f"relay {MODEL_NAME}") in path
    assert ("nexus-provider", f"chat {MODEL_NAME}") in path
    assert any(name.endswith(" process") and svc == "nexus-provider" for svc, name in path)
    assert any(name.endswith(" process") and svc == "nexus-node" for svc, name in path)
    assert path[-1][1].startswith("POST /v1/chat/completions")
    nats_spans = [s for s in spans if s.name.endswith((" publish", " process"))]
    assert all(s.attributes["messaging.system"] == "nats" for s in nats_spans)

    log = httpx.get(f"{api}/v1/sessions/{resp.headers['x-nexus-session']}/events",
                    headers=headers).json()["events"]
    mine = [e for e in log if e["data"].get("call_id") == call_id]
    assert {e["type"] for e in mine} >= {"LLMCallStarted", "LLMCallCompleted"}
    assert {e["trace_id"] for e in mine} == {genai.trace_id}
    # and from the trace to its events
    by_trace = httpx.get(f"{api}/v1/events", headers=headers,
                         params={"trace_id": genai.trace_id}).json()["events"]
    assert {e["type"] for e in by_trace} >= {"LLMCallStarted", "LLMCallCompleted", "MessageAppended"}
    assert {e["trace_id"] for e in by_trace} == {genai.trace_id}
    assert httpx.get(f"{api}/v1/events", headers=headers,
                     params={"trace_id": "not-a-trace"}).status_code == 400


def test_metrics_match_the_events(real, otlp) -> None:
    api, headers, _, procs = real
    for _ in range(2):
        assert httpx.post(f"{api}/v1/chat/completions", headers=headers, timeout=120,
                          json={"model": "default", "max_tokens": 4,
                                "messages": [{"role": "user", "content": "Hello"}]}).status_code == 200

    async def totals() -> tuple[int, int]:
        from shared.infra.eventstore.store import create_pool

        url = procs[0].env["DATABASE_URL"]
        pool = await create_pool(url, max_size=1)
        try:
            row = await pool.fetchrow(
                "SELECT sum((data->>'input_tokens')::int) AS i, sum((data->>'output_tokens')::int) AS o,"
                " count(*) AS n FROM events WHERE type = 'LLMCallCompleted'")
            return row["i"], row["o"], row["n"]
        finally:
            await pool.close()

    import asyncio

    events_in, events_out, calls = asyncio.run(totals())

    def exported() -> tuple[int, int, int] | None:
        points = [p for p in otlp.latest("gen_ai.client.token.usage") if p.service == "nexus-provider"]
        by_type = {"input": 0, "output": 0}
        count = 0
        for p in points:
            by_type[p.attributes["gen_ai.token.type"]] += int(p.value)
            count += p.count if p.attributes["gen_ai.token.type"] == "output" else 0
        result = (by_type["input"], by_type["output"], count)
        return result if result == (events_in, events_out, calls) else None

    wait_until(exported, 20, 0.3, "exported token usage to equal the events' totals")
    duration = otlp.latest("gen_ai.client.operation.duration")
    assert sum(p.count for p in duration) == calls and all(p.unit == "s" for p in duration)
    # over OTLP a duration carries exemplars: links to the traces of the calls it measured
    linked = {t for p in list(otlp.points) if p.metric == "gen_ai.client.operation.duration"
              and p.service == "nexus-provider" for t in p.exemplar_trace_ids}
    assert linked
    wait_until(lambda: all(any(s.service == "nexus-provider" for s in otlp.trace(t))
                           for t in linked), 20, 0.3, "the exemplars' traces to be exported")
    names = {p.metric for p in otlp.points}
    assert {"nexus.llm.time_to_first_token", "nexus.llm.cost.usd", "nexus.node.cpu.utilization",
            "nexus.nodes", "nexus.nats.reconnects"} <= names
    cpu = otlp.latest("nexus.node.cpu.utilization")
    assert cpu and all(0 <= p.value <= 100 and "node" in p.attributes for p in cpu)


def prometheus_names(point) -> set[str]:
    """The names an exported OTLP metric has in Prometheus (OTel's compatibility rules:
    dots to underscores, unit suffix, `{...}` units dropped, `_total` on monotonic sums,
    `_bucket`/`_sum`/`_count` for histograms)."""
    import re

    base = re.sub(r"[^a-zA-Z0-9_:]", "_", point.metric)
    unit = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "%": "percent",
            "1": "ratio"}.get(point.unit, "" if point.unit.startswith("{") else point.unit)
    if unit and not base.endswith(unit):
        base = f"{base}_{unit}"
    if point.kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    if point.kind == "sum" and point.monotonic:
        return {f"{base}_total"}
    return {base}


def test_dashboards_only_query_metrics_the_services_export(real, otlp) -> None:
    import json
    import re
    from pathlib import Path

    api, headers, _, _ = real
    # exercise what the budget and policy panels show: a commit, a denial, a policy verdict
    sid = httpx.post(f"{api}/v1/sessions", headers=headers, json={
        "budget": {"limit_tokens": 60}, "policy_rules": {"max_tokens_per_call": 16}}).json()["session_id"]
    ask = {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(f"{api}/v1/chat/completions", headers={**headers, "X-Nexus-Session": sid},
                      json={**ask, "max_tokens": 8}, timeout=120).status_code == 200
    assert httpx.post(f"{api}/v1/chat/completions", headers={**headers, "X-Nexus-Session": sid},
                      json={**ask, "max_tokens": 32}, timeout=120).status_code == 403
    assert httpx.post(f"{api}/v1/chat/completions", headers={**headers, "X-Nexus-Session": sid},
                      json={**ask, "max_tokens": 16}, timeout=120).status_code in (200, 402)
    for _ in range(3):
        httpx.post(f"{api}/v1/chat/completions", headers={**headers, "X-Nexus-Session": sid},
                   json={**ask, "max_tokens": 16}, timeout=120)

    dashboards = sorted((Path(__file__).parents[1] / "observability/grafana/dashboards").glob("*.json"))
    assert len(dashboards) == 4
    wanted: set[str] = set()
    for path in dashboards:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = re.sub(r"\{[^}]*\}", "", target["expr"])  # label matchers
                expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)  # grouping labels
                names = set(re.findall(r"\b((?:nexus|gen_ai|http)_[a-z0-9_]+)\b", expr))
                assert names, f"{path.name}: panel {panel['title']!r} queries no metric"
                wanted |= names

    # Only observable with a GPU, and this machine has none (NVML finds no device, so the
    # node reports no utilisation rather than a made-up 0).
    needs_gpu = {"nexus_node_gpu_utilization_percent"}

    def missing() -> set[str]:
        exported: set[str] = set()
        for point in list(otlp.points):
            exported |= prometheus_names(point)
        return wanted - exported - needs_gpu

    try:
        wait_until(lambda: not missing(), 20, 0.5, "every dashboard metric to be exported")
    except AssertionError:
        exported = sorted({n for p in otlp.points for n in prometheus_names(p)})
        raise AssertionError(f"dashboards query {sorted(missing())}, not exported; "
                             f"exported: {exported}") from None

    # ... and the same names are served to Prometheus by the services' own /metrics.
    _, _, _, procs = real
    scrape_urls = [f"{api}/metrics"] + [
        f"http://127.0.0.1:{proc.env['NEXUS_METRICS_PORT']}/metrics" for proc in procs[1:]]

    def scraped() -> set[str]:
        from prometheus_client.parser import text_string_to_metric_families

        names: set[str] = set()
        for url in scrape_urls:
            text = httpx.get(url, timeout=5).raise_for_status().text
            names |= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        return names

    not_served = wanted - needs_gpu - scraped()
    assert not not_served, f"dashboards query {sorted(not_served)}, not served on /metrics"


def test_a_busy_node_answers_429_and_nothing_hangs(real) -> None:
    """The node runs one request at a time and queues none: concurrent calls beyond
    that are refused by the node (NodeBusy), retried by the provider with backoff, and
    end either answered or as a clear 429, never hung or a 5xx."""
    import concurrent.futures

    api, headers, _, _ = real

    def call(i: int) -> int:
        return httpx.post(f"{api}/v1/chat/completions", headers=headers, timeout=120, json={
            "model": "default", "max_tokens": 24,
            "messages": [{"role": "user", "content": f"Tell a story {i}"}]}).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(call, range(4)))
    assert set(codes) <= {200, 429} and 200 in codes

    async def busy_attempts() -> int:
        from shared.infra.eventstore.store import create_pool

        pool = await create_pool(real[3][0].env["DATABASE_URL"], max_size=1)
        try:
            return await pool.fetchval("SELECT count(*) FROM events WHERE type = 'LLMCallFailed'"
                                       " AND data ->> 'error' = 'NodeBusy'")
        finally:
            await pool.close()

    import asyncio

    assert asyncio.run(busy_attempts()) >= 1


def test_back_to_back_completions_on_the_nodes_llama_server_all_answer(real) -> None:
    """llama-server announces keep-alive, then closes the connection after each streamed
    completion: a request sent at once after the previous one lands on that closing
    connection (measured before the fix: every second call, ServerDisconnectedError or
    "Can not write request body"). The relay's adapter sends it again on a new
    connection: none fails. (A busy node's retried call met this race and ended 502.)"""
    import asyncio

    from shared.contracts.messages import ChatMessage, CompletionRequest
    from shared.infra.upstreams import OpenAIAdapter, UpstreamConfig

    _, _, node, _ = real
    base_url = node["runtime"]["base_url"]
    assert base_url

    async def back_to_back() -> list[str]:
        adapter = OpenAIAdapter(UpstreamConfig(name="node", kind="openai", base_url=base_url))
        request = CompletionRequest(call_id="c", session_id="s", tenant="t", model=MODEL_NAME,
                                    messages=(ChatMessage(role="user", content="Hi"),),
                                    max_tokens=2)
        try:
            ends = []
            for _ in range(6):  # no pause between them: each reuses the pooled connection
                pieces = [p async for p in adapter.stream(MODEL_NAME, request, request.messages)]
                ends.append(pieces[-1].finish_reason)
            return ends
        finally:
            await adapter.close()

    assert len(asyncio.run(back_to_back())) == 6  # each ended with a finish reason

def test_an_agent_run_answers_a_one_step_task_with_the_real_model(real) -> None:
    """An agent without tools, run in a session: one LLM call through the whole path to
    llama-server, the run finishes with the model's answer, cost and tokens counted,
    and the conversation tells the story."""
    api, headers, _, _ = real
    agent = ("---\nname: greeter\ndescription: answers in one short sentence\nmodel: inherit\n"
             "tools: []\nmax_steps: 2\n---\nYou answer in one short sentence.\n")
    defined = httpx.post(f"{api}/v1/agents", headers={**headers, "Content-Type": "text/markdown"},
                         content=agent.encode(), timeout=30)
    assert defined.status_code == 201, defined.text
    sid = httpx.post(f"{api}/v1/sessions", headers=headers, json={"agent": "greeter"},
                     timeout=30).json()["session_id"]
    started = httpx.post(f"{api}/v1/sessions/{sid}/runs", headers=headers, timeout=30,
                         json={"agent": "greeter", "input": "Say hello."})
    assert started.status_code == 202, started.text

    def ended() -> dict | None:
        run = httpx.get(f"{api}/v1/runs/{started.json()['run_id']}", headers=headers,
                        timeout=30).json()
        return run if run["status"] in ("finished", "failed", "cancelled") else None

    run = wait_until(ended, 180, 0.5, "the run to end")
    assert run["status"] == "finished", run
    assert run["steps"] == 1 and run["answer"], run
    assert run["output_tokens"] > 0 and run["input_tokens"] > 0
    messages = httpx.get(f"{api}/v1/sessions/{sid}/messages", headers=headers,
                         timeout=30).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == run["answer"]
