"""Real NATS and Postgres for the whole test session, started once.

Embedded servers (random ports, temporary dirs) unless NATS_URL / DATABASE_URL are
set. Tests isolate themselves by naming: unique stream ids and subjects, and a fresh
database (`fresh_db`) for tests that need the global event order to themselves.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from shared.infra.eventstore import EventStore
from shared.infra.eventstore.store import create_pool
from shared.infra import EmbeddedNats, EmbeddedPostgres
from shared.infra.migrate import migrate
import httpx

from tests.support import OtlpReceiver, ServiceProc, free_port_str, service_env, wait_http_ok, wait_until


@dataclass(frozen=True)
class Infra:
    nats_url: str
    database_url: str
    nats: EmbeddedNats | None
    postgres: EmbeddedPostgres | None
    tmp: Path


def database_url_named(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    tmp = tmp_path_factory.mktemp("infra")
    nats = pg = None
    nats_url = os.environ.get("NATS_URL")
    database_url = os.environ.get("DATABASE_URL")
    if not nats_url:
        nats = EmbeddedNats(tmp / "nats")
        nats.start()
        nats_url = nats.url
    if not database_url:
        pg = EmbeddedPostgres(tmp / "postgres", ephemeral=True)
        pg.start()
        database_url = pg.url("nexus_test")
    migrate(database_url)
    try:
        yield Infra(nats_url, database_url, nats, pg, tmp)
    finally:
        if nats:
            nats.stop()
        if pg:
            pg.stop()


def new_database(infra: Infra) -> str:
    url = database_url_named(infra.database_url, f"t_{uuid.uuid4().hex[:16]}")
    migrate(url)
    return url


@pytest.fixture
def fresh_db(infra: Infra) -> str:
    """A new, migrated database of its own for this test (named, not restarted)."""
    return new_database(infra)


@pytest.fixture
async def pool(infra: Infra) -> AsyncIterator:
    pool = await create_pool(infra.database_url, max_size=60)
    yield pool
    await pool.close()


@pytest.fixture
async def store(pool) -> AsyncIterator[EventStore]:
    store = EventStore(pool)
    yield store
    await store.close()


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@dataclass(frozen=True)
class Platform:
    api: str
    orchestrator: ServiceProc
    provider: ServiceProc
    node: ServiceProc
    env: dict[str, str]
    admin_key: str

    @property
    def admin(self) -> dict[str, str]:
        """Headers of the platform admin (acting for tenant `default`)."""
        return {"Authorization": f"Bearer {self.admin_key}"}


@pytest.fixture(scope="session")
def platform(infra: Infra, otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The three services as real processes, exporting traces to the test's receiver.

    Each gets only the credentials it needs, as under `nexus up`: the admin key only the
    orchestrator, the database URL not the node."""
    logs = tmp_path_factory.mktemp("platform")
    port = free_port_str()
    admin_key = f"admin-{uuid.uuid4().hex}"
    env = service_env(
        infra.nats_url, infra.database_url,
        NEXUS_HTTP_PORT=port,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRIC_EXPORT_INTERVAL="500",
        NEXUS_LOG_LEVEL="INFO",
    )
    own = {"orchestrator": {**env, "NEXUS_ADMIN_KEY": admin_key},  # /metrics on its API port
           "provider": {**env, "NEXUS_METRICS_PORT": free_port_str()},
           "node": {**{k: v for k, v in env.items() if k != "DATABASE_URL"},
                    "NEXUS_METRICS_PORT": free_port_str()}}
    procs = {
        name: ServiceProc(name, {**own[name], "NEXUS_INSTANCE_ID": f"{name}-test"},
                          logs / f"{name}.log").start()
        for name in ("orchestrator", "provider", "node")
    }
    api = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{api}/health", proc=procs["orchestrator"])
        # the node registers with backoff: tests that need a node (tools, MCP) find it
        wait_until(lambda: httpx.get(f"{api}/v1/nodes", params={"status": "online"},
                                     headers={"Authorization": f"Bearer {admin_key}"},
                                     timeout=5).json()["nodes"] or None,
                   30, 0.2, "the platform's node to be online")
        yield Platform(api, procs["orchestrator"], procs["provider"], procs["node"], env, admin_key)
    finally:
        for proc in procs.values():
            if proc.proc and proc.proc.poll() is None:
                proc.stop()
