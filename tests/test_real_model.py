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
from shared.infra.llama import MODEL_NAME, server_path
from tests.conftest import new_database
from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(infra, tmp_path_factory):
    assert server_path().exists(), (
        f"{server_path()} is missing: run `nexus runtime prepare` (make test does) first")
    tmp = tmp_path_factory.mktemp("real")
    server = EmbeddedNats(tmp / "nats")
    server.start()
    admin = f"admin-{uuid.uuid4().hex}"
    port = free_port_str()
    env = service_env(server.url, new_database(infra), NEXUS_ADMIN_KEY=admin, NEXUS_HTTP_PORT=port,
                      NEXUS_HEARTBEAT_INTERVAL_S="0.5", NEXUS_PROJECTION_POLL_S="0.2")
    procs = [
        ServiceProc("orchestrator", env, tmp / "orchestrator.log").start(),
        ServiceProc("provider", env, tmp / "provider.log").start(),
        ServiceProc("node", {**env, "NEXUS_RUNTIME": "llama", "NEXUS_NODE_DATA_DIR": str(tmp / "node")},
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


def test_node_counts_its_requests_in_heartbeats(real) -> None:
    api, headers, node, _ = real
    detail = httpx.get(f"{api}/v1/nodes/{node['node_id']}", headers=headers).json()
    assert detail["load"]["avg_response_ms"] is not None  # latency EWMA from the relayed calls
