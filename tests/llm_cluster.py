"""A platform for LLM-path tests: own NATS, database, orchestrator and providers, in
front of fake hosted upstreams (real HTTP, real protocols; tests/fake_upstream.py)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.infra.eventstore import EventStore
from shared.infra.eventstore.store import create_pool
from shared.infra import EmbeddedNats
from tests.fake_upstream import FakeUpstream
from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok, wait_until

PRIMARY_KEY = "sk-test-primary-0123456789abcdefghij"
BACKUP_KEY = "sk-ant-test-backup-0123456789abcdefgh"


def providers_toml(primary: FakeUpstream, backup: FakeUpstream) -> str:
    return f"""
[retry]
max_attempts = 2
base_delay_s = 0.05
max_delay_s = 0.3
first_token_timeout_s = 3

[[providers]]
name = "primary"
kind = "openai"
base_url = "{primary.openai_base_url}"
api_key_env = "FAKE_PRIMARY_KEY"
timeout_s = 3
max_concurrency = 32
max_queue = 256
[[providers.models]]
name = "fake-small"
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0
context = 4096

[[providers]]
name = "backup"
kind = "anthropic"
base_url = "{backup.anthropic_base_url}"
api_key_env = "FAKE_BACKUP_KEY"
timeout_s = 3
[[providers.models]]
name = "fake-large"
input_usd_per_mtok = 3.0
output_usd_per_mtok = 6.0
context = 8192

[[providers]]
name = "local"
kind = "ollama"
base_url = "{backup.ollama_base_url}"
hosted = false
[[providers.models]]
name = "fake-small"
context = 4096

[[providers]]
name = "tiny"
kind = "openai"
base_url = "{primary.openai_base_url}"
api_key_env = "FAKE_PRIMARY_KEY"
max_concurrency = 1
max_queue = 0
[[providers.models]]
name = "fake-small"
context = 4096

[[routes]]
model = "default"
targets = ["primary/fake-small", "backup/fake-large"]

[[routes]]
model = "ollama-chat"
targets = ["local/fake-small"]

[[routes]]
model = "local-first"
targets = ["local/fake-small", "primary/fake-small"]
"""


@dataclass
class LLMCluster:
    tmp: Path
    nats: EmbeddedNats
    database_url: str
    primary: FakeUpstream
    backup: FakeUpstream
    env: dict[str, str]
    admin_key: str
    orchestrators: list[ServiceProc] = field(default_factory=list)
    providers: list[ServiceProc] = field(default_factory=list)
    apis: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.apis[0]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def start_orchestrator(self) -> str:
        port = free_port_str()
        proc = ServiceProc("orchestrator", {**self.env, "NEXUS_HTTP_PORT": port,
                                            "NEXUS_INSTANCE_ID": f"orch-{port}"},
                           self.tmp / f"orchestrator-{port}.log").start()
        api = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{api}/health", timeout=90, proc=proc)  # a busy 2-core machine
        self.orchestrators.append(proc)
        self.apis.append(api)
        return api

    def start_provider(self) -> ServiceProc:
        n = len(self.providers)
        proc = ServiceProc("provider", {**self.env, "NEXUS_INSTANCE_ID": f"provider-{n}"},
                           self.tmp / f"provider-{n}.log").start()
        wait_until(lambda: "provider ready" in proc.log(), 90, 0.1, "provider ready")
        self.providers.append(proc)
        return proc

    def tenant_key(self, tenant: str | None = None) -> dict[str, str]:
        tenant = tenant or f"t{uuid.uuid4().hex[:8]}"
        resp = httpx.post(f"{self.api}/v1/keys", headers=self.admin,
                          json={"name": "test", "role": "admin", "tenant": tenant})
        assert resp.status_code == 201, resp.text
        return {"Authorization": f"Bearer {resp.json()['key']}"}

    def session(self, key: dict[str, str], **body) -> str:
        resp = httpx.post(f"{self.api}/v1/sessions", headers=key, json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"]

    def events(self, session_id: str) -> list:
        async def read() -> list:
            pool = await create_pool(self.database_url, max_size=1)
            try:
                rows = await pool.fetch(
                    "SELECT position FROM events WHERE metadata ->> 'correlation_id' = $1"
                    " ORDER BY position", session_id)
                store = EventStore(pool)
                out = []
                for r in rows:
                    out += await store.read_all(r["position"] - 1, 1)
                return out
            finally:
                await pool.close()

        return asyncio.run(read())

    def stop(self) -> None:
        for proc in self.orchestrators + self.providers:
            if proc.proc and proc.proc.poll() is None:
                proc.stop()
        self.nats.stop()
        self.primary.stop()
        self.backup.stop()


def start_llm_cluster(infra, tmp: Path, database_url: str, *, orchestrators: int = 1,
                      providers: int = 1, **extra_env: str) -> LLMCluster:
    primary = FakeUpstream(models=("fake-small",), reply_tokens=8, api_key=PRIMARY_KEY).start()
    backup = FakeUpstream(models=("fake-large", "fake-small"), reply_tokens=8,
                          api_key=BACKUP_KEY).start()
    server = EmbeddedNats(tmp / "nats")
    server.start()
    admin_key = f"admin-{uuid.uuid4().hex}"
    env = service_env(server.url, database_url, NEXUS_ADMIN_KEY=admin_key,
                      NEXUS_PROVIDERS=providers_toml(primary, backup),
                      FAKE_PRIMARY_KEY=PRIMARY_KEY, FAKE_BACKUP_KEY=BACKUP_KEY,
                      NEXUS_PROJECTION_POLL_S="0.2", **extra_env)
    cluster = LLMCluster(tmp, server, database_url, primary, backup, env, admin_key)
    for _ in range(providers):
        cluster.start_provider()
    for _ in range(orchestrators):
        cluster.start_orchestrator()
    return cluster
