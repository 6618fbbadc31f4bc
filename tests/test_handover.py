"""Work moves on when whoever holds it cannot go on: a provider lost before the first
token (the orchestrator retries once, on another provider instance), and a busy node
(the provider hands the call to the orchestrator's spare node). Real processes, real
NATS and Postgres; the upstreams / runtimes are fakes speaking the OpenAI protocol."""

from __future__ import annotations

import asyncio
import threading
import uuid

import httpx
import msgspec
import nats
import pytest

from shared.contracts import subjects
from shared.infra import EmbeddedNats
from shared.contracts.messages import CompletionRequest
from tests.conftest import new_database
from tests.fake_upstream import FakeUpstream, reply_text
from tests.llm_cluster import start_llm_cluster
from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok, wait_until

pytestmark = pytest.mark.slow


def in_background(fn) -> threading.Thread:
    """Run `fn` in a daemon thread; a call still held when the test tears the platform
    down ends with a connection error nobody waits for."""
    def run() -> None:
        try:
            fn()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_provider_lost_before_the_first_token_is_retried_once(infra, tmp_path) -> None:
    llm = start_llm_cluster(infra, tmp_path, new_database(infra), providers=0)
    # the provider would wait a minute for the first token: only its death ends the wait
    llm.env["NEXUS_PROVIDERS"] = (llm.env["NEXUS_PROVIDERS"]
                                  .replace("first_token_timeout_s = 3", "first_token_timeout_s = 60")
                                  .replace("\ntimeout_s = 3\n", "\ntimeout_s = 60\n"))
    try:
        doomed = llm.start_provider()
        key = llm.tenant_key()
        llm.primary.script({"hang": True})
        answers: list[httpx.Response] = []
        in_background(lambda: answers.append(httpx.post(
            f"{llm.api}/v1/chat/completions", headers=key, timeout=120, json={
                "model": "primary/fake-small", "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}]})))
        llm.primary.wait_for(lambda s: s.in_flight == 1, 30, "the call to reach the upstream")
        llm.start_provider()  # the survivor
        doomed.kill()  # holding the call, no token sent yet

        wait_until(lambda: answers, 60, 0.1, "the answer")
        [answer] = answers
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == reply_text(3)
        stats = llm.primary.wait_for(lambda s: s.completed == 1, 10, "the retried call")
        assert [o["outcome"] for o in stats.outcomes] == ["cancelled", "completed"]
        assert any("provider lost before the first token; retrying once" in o.log()
                   for o in llm.orchestrators)
    finally:
        llm.stop()


NODE_PROVIDERS = """
[retry]
max_attempts = 1
first_token_timeout_s = 120

[[providers]]
name = "node"
kind = "node"
hosted = false
timeout_s = 120
[[providers.models]]
name = "fake-small"
context = 4096

[[routes]]
model = "default"
targets = ["node/fake-small"]
"""


def test_a_busy_node_hands_the_call_to_its_spare(infra, tmp_path) -> None:
    """Two nodes that each run one request and queue none. While one is busy, a call
    whose first choice is that node is refused by it (NodeBusy) and served by the spare
    the orchestrator named with it."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    runtimes = {name: FakeUpstream(models=("fake-small",), reply_tokens=4).start()
                for name in ("a", "b")}
    port = free_port_str()
    admin = {"Authorization": f"Bearer admin-{uuid.uuid4().hex}"}
    env = service_env(server.url, new_database(infra), NEXUS_HTTP_PORT=port,
                      NEXUS_ADMIN_KEY=admin["Authorization"].split()[1],
                      NEXUS_PROVIDERS=NODE_PROVIDERS, NEXUS_NODE_SELECTION="round_robin",
                      NEXUS_PROJECTION_POLL_S="0.2")
    procs = [ServiceProc("orchestrator", env, tmp_path / "orchestrator.log").start(),
             ServiceProc("provider", env, tmp_path / "provider.log").start()]
    for name, fake in runtimes.items():
        procs.append(ServiceProc("node", {
            **env, "NEXUS_RUNTIME_URL": fake.openai_base_url, "NEXUS_INSTANCE_ID": f"node-{name}",
            "NEXUS_NODE_DATA_DIR": str(tmp_path / f"node-{name}"),
            "NEXUS_NODE_MAX_CONCURRENCY": "1", "NEXUS_NODE_MAX_QUEUE": "0",
            "NEXUS_HEARTBEAT_INTERVAL_S": "0.3"}, tmp_path / f"node-{name}.log").start())
    api = f"http://127.0.0.1:{port}"
    node_of = {name: lambda n=name: (tmp_path / f"node-{n}" / "node_id").read_text().strip()
               for name in runtimes}
    try:
        wait_http_ok(f"{api}/health", proc=procs[0])
        wait_until(lambda: "provider ready" in procs[1].log(), 30, 0.1, "provider ready")
        wait_until(lambda: len([n for n in httpx.get(f"{api}/v1/nodes", headers=admin, params={
            "status": "online", "model": "fake-small"}).json()["nodes"]
            if n["runtime"]["ready"]]) == 2, 30, 0.1, "two nodes online with their runtime")

        def chat(content: str) -> httpx.Response:
            return httpx.post(f"{api}/v1/chat/completions", headers=admin, timeout=120, json={
                "model": "default", "max_tokens": 4,
                "messages": [{"role": "user", "content": content}]})

        # make one node busy: its runtime holds the first call's first byte
        for fake in runtimes.values():
            fake.configure(first_byte_delay_ms=600_000)
        in_background(lambda: chat("hold the line"))
        wait_until(lambda: sum(f.stats.in_flight for f in runtimes.values()) == 1, 30, 0.05,
                   "one node busy")
        busy = next(n for n, f in runtimes.items() if f.stats.in_flight == 1)
        spare = next(n for n in runtimes if n != busy)
        runtimes[spare].configure(first_byte_delay_ms=0)

        async def call_seen_on_the_bus() -> tuple[httpx.Response, CompletionRequest]:
            nc = await nats.connect(server.url)
            try:
                sub = await nc.subscribe(subjects.PROVIDER_COMPLETE)  # a listener, not a responder
                await nc.flush()
                answer = await asyncio.to_thread(chat, "who serves me?")
                msg = await sub.next_msg(timeout=10)
                return answer, msgspec.json.decode(msg.data, type=CompletionRequest)
            finally:
                await nc.close()

        answer, request = asyncio.run(call_seen_on_the_bus())
        # the orchestrator named the busy node first and the spare second ...
        assert request.nodes["fake-small"] == (node_of[busy](), node_of[spare]())
        # ... the busy node refused, the spare answered
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == reply_text(4)
        assert runtimes[spare].stats.completed == 1
        assert runtimes[busy].stats.count("/v1/chat/completions") == 1  # only the held call
    finally:
        for proc in reversed(procs):
            proc.kill()
        for fake in runtimes.values():
            fake.stop()
        server.stop()
