"""Nodes: self-registration, heartbeats, offline detection, the load view, bad input.

The node daemons and the orchestrator run as real processes against their own NATS
server (registration is a queue group: sharing the session's NATS would split
registrations between orchestrators) and their own database.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest

from shared.contracts import subjects
from shared.contracts.events import RecordedEvent, node_stream
from shared.infra.eventstore import EventStore
from shared.infra.eventstore.store import create_pool
from shared.infra import EmbeddedNats
from shared.infra.messaging import Bus
from tests.conftest import new_database
from tests.fleet import SimFleet
from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok, wait_until

OFFLINE_AFTER = 2.0
AGENT_INTERVAL = 0.3


@dataclass
class Cluster:
    nats: EmbeddedNats
    database_url: str
    api: str
    env: dict[str, str]
    orchestrator: ServiceProc
    tmp: Path
    admin: dict[str, str]

    def start_orchestrator(self, name: str = "orchestrator") -> ServiceProc:
        self.orchestrator = ServiceProc("orchestrator", self.env, self.tmp / f"{name}.log").start()
        wait_http_ok(f"{self.api}/health", proc=self.orchestrator)
        return self.orchestrator

    def nodes(self, **params: str) -> list[dict]:
        resp = httpx.get(f"{self.api}/v1/nodes", params=params, timeout=10, headers=self.admin)
        assert resp.status_code == 200, resp.text
        return resp.json()["nodes"]

    def node(self, node_id: str) -> dict:
        resp = httpx.get(f"{self.api}/v1/nodes/{node_id}", timeout=10, headers=self.admin)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def agent(self, name: str, labels: str) -> ServiceProc:
        env = {**self.env, "NEXUS_NODE_DATA_DIR": str(self.tmp / name),
               "NEXUS_NODE_LABELS": labels, "NEXUS_INSTANCE_ID": name,
               "NEXUS_HEARTBEAT_INTERVAL_S": str(AGENT_INTERVAL)}
        return ServiceProc("node", env, self.tmp / f"{name}.log")

    def node_id_of(self, name: str) -> str:
        return wait_until(lambda: (self.tmp / name / "node_id").read_text().strip(), 20,
                          what=f"{name} to write its id")

    async def events(self, node_id: str) -> list[str]:
        pool = await create_pool(self.database_url, max_size=1)
        try:
            return [e.type for e in await EventStore(pool).read_stream(node_stream(node_id))]
        finally:
            await pool.close()

    async def recorded(self, node_id: str, event_type: str) -> RecordedEvent:
        """The node's last event of `event_type`, as stored."""
        pool = await create_pool(self.database_url, max_size=1)
        try:
            return [e for e in await EventStore(pool).read_stream(node_stream(node_id))
                    if e.type == event_type][-1]
        finally:
            await pool.close()


@pytest.fixture(scope="module")
def cluster(infra, tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    server = EmbeddedNats(tmp / "nats")
    server.start()
    database_url = new_database(infra)
    port = free_port_str()
    admin_key = f"admin-{uuid.uuid4().hex}"
    env = service_env(server.url, database_url, NEXUS_HTTP_PORT=port, NEXUS_ADMIN_KEY=admin_key,
                      NEXUS_NODE_OFFLINE_AFTER_S=str(OFFLINE_AFTER), NEXUS_PROJECTION_POLL_S="0.2")
    c = Cluster(server, database_url, f"http://127.0.0.1:{port}", env, None, tmp,  # type: ignore[arg-type]
                {"Authorization": f"Bearer {admin_key}"})
    c.start_orchestrator()
    try:
        yield c
    finally:
        if c.orchestrator.proc and c.orchestrator.proc.poll() is None:
            c.orchestrator.stop()
        server.stop()


@pytest.fixture
async def bus(cluster: Cluster) -> AsyncIterator[Bus]:
    bus = await Bus.connect(cluster.nats.url, "test-fleet")
    yield bus
    await bus.close()


def by_id(nodes: list[dict]) -> dict[str, dict]:
    return {n["node_id"]: n for n in nodes}


def test_agents_register_go_offline_when_killed_and_come_back(cluster: Cluster) -> None:
    tag = f"agents-{uuid.uuid4().hex[:6]}"
    agents = [cluster.agent(f"{tag}-{i}", f"fleet={tag},rack=r{i}").start() for i in range(3)]
    ids = [cluster.node_id_of(f"{tag}-{i}") for i in range(3)]
    try:
        def all_online() -> dict[str, dict]:
            nodes = by_id(cluster.nodes(label=f"fleet={tag}"))
            ok = len(nodes) == 3 and all(n["status"] == "online" and n["load"]["fresh"]
                                         for n in nodes.values())
            return nodes if ok else {}

        nodes = wait_until(all_online, 20, 0.1, "three agents online with load")
        for node in nodes.values():
            assert node["cpu_count"] >= 1 and node["memory_total_bytes"] > 0
            assert node["gpus"] == []  # no NVML here: an empty list, not a crash
            assert 0 <= node["load"]["cpu_pct"] <= 100 and 0 < node["load"]["memory_pct"] <= 100
        assert cluster.nodes(label="rack=r1", status="online")[0]["node_id"] == ids[1]

        # kill -9: offline after the timeout
        agents[1].kill()
        wait_until(lambda: cluster.node(ids[1])["status"] == "offline", OFFLINE_AFTER + 10, 0.1,
                   "the killed node to go offline")
        # the decision as recorded: its last heartbeat was older than the timeout
        offline = asyncio.run(cluster.recorded(ids[1], "NodeWentOffline"))
        assert offline.event.timeout_s == OFFLINE_AFTER
        assert offline.recorded_at.timestamp() - offline.event.last_heartbeat_at >= OFFLINE_AFTER
        assert {n["node_id"] for n in cluster.nodes(status="online", label=f"fleet={tag}")} == {
            ids[0], ids[2]}

        # restart with the same data dir: same id, online again
        agents[1] = cluster.agent(f"{tag}-1", f"fleet={tag},rack=r1").start()
        assert cluster.node_id_of(f"{tag}-1") == ids[1]
        wait_until(lambda: cluster.node(ids[1])["status"] == "online", 20, 0.1, "node back online")
        trail = asyncio.run(cluster.events(ids[1]))
        assert trail[0] == "NodeRegistered"
        assert trail[trail.index("NodeWentOffline") + 1] == "NodeCameBack"

        detail = cluster.node(ids[0])
        assert len(detail["history"]) >= 2  # recent load from the bounded heartbeat stream
        assert all(0 <= h["cpu_pct"] <= 100 for h in detail["history"])

        # SIGTERM: draining, then left
        agents[2].proc.send_signal(signal.SIGTERM)
        assert agents[2].proc.wait(20) == 0, agents[2].log()
        wait_until(lambda: cluster.node(ids[2])["status"] == "left", 10, 0.1, "node left")
        assert asyncio.run(cluster.events(ids[2]))[-2:] == ["NodeDraining", "NodeLeft"]
    finally:
        for agent in agents:
            if agent.proc and agent.proc.poll() is None:
                agent.kill()


async def test_a_thousand_simulated_nodes(cluster: Cluster, bus: Bus) -> None:
    tag = f"k{uuid.uuid4().hex[:6]}"
    ids = [f"{tag}-{i:04d}" for i in range(1000)]
    fleet = SimFleet(bus, ids, interval=0.5)
    acks = await fleet.register_all()
    assert {a.status for a in acks} == {"online"}
    fleet.start()
    try:
        def online() -> set[str]:
            return {n["node_id"] for n in cluster.nodes(status="online")
                    if n["node_id"].startswith(tag) and n["load"] and n["load"]["fresh"]}

        await asyncio.to_thread(wait_until, lambda: len(online()) == 1000, 60, 0.5,
                                "1000 nodes online with fresh load")
        stopped = set(ids[::10])
        fleet.stopped |= stopped
        await asyncio.to_thread(
            wait_until, lambda: {n["node_id"] for n in cluster.nodes(status="offline")
                                 if n["node_id"].startswith(tag)} == stopped,
            OFFLINE_AFTER + 30, 0.5, "exactly the 100 stopped nodes to go offline")
        assert online() == set(ids) - stopped
    finally:
        await fleet.stop()


async def test_restarted_orchestrator_knows_the_load_without_waiting(cluster: Cluster,
                                                                     bus: Bus) -> None:
    tag = f"r{uuid.uuid4().hex[:6]}"
    ids = [f"{tag}-{i}" for i in range(20)]
    fleet = SimFleet(bus, ids, interval=0.5)
    await fleet.register_all()
    fleet.start()  # beats until the orchestrator has folded a fresh one of every node
    await asyncio.to_thread(wait_until, lambda: all(cluster.node(i)["load"]["fresh"] for i in ids),
                            30, 0.1, "first heartbeats folded")
    await fleet.stop()  # silence from here on
    assert cluster.orchestrator.stop() == 0
    cluster.start_orchestrator("orchestrator-restarted")
    # No heartbeat since the restart: the view comes from the heartbeat stream's replay.
    nodes = by_id(n for n in cluster.nodes() if n["node_id"].startswith(tag))
    assert len(nodes) == 20
    assert all(n["status"] == "online" and n["load"]["cpu_pct"] is not None for n in nodes.values())


async def test_nats_restart_while_nodes_heartbeat(cluster: Cluster) -> None:
    tag = f"n{uuid.uuid4().hex[:6]}"
    ids = [f"{tag}-{i}" for i in range(50)]
    bus = await Bus.connect(cluster.nats.url, "test-fleet-nats")
    fleet = SimFleet(bus, ids, interval=0.3)
    await fleet.register_all()
    fleet.start()
    try:
        def all_fresh() -> bool:
            nodes = [n for n in cluster.nodes(status="online") if n["node_id"].startswith(tag)]
            return len(nodes) == 50 and all(n["load"]["fresh"] for n in nodes)

        await asyncio.to_thread(wait_until, all_fresh, 20, 0.2, "fleet online")
        cluster.nats.kill()
        await asyncio.sleep(OFFLINE_AFTER + 1)  # long enough for the view to call them stale
        cluster.nats.start()
        await asyncio.to_thread(wait_until, all_fresh, 20, 0.2, "fleet online again after NATS restart")
        assert cluster.orchestrator.proc.poll() is None  # it never needed a restart
    finally:
        await fleet.stop()
        await bus.close()


async def test_forged_and_malformed_heartbeats_are_rejected(cluster: Cluster, bus: Bus) -> None:
    tag = f"f{uuid.uuid4().hex[:6]}"
    honest, victim = f"{tag}-a", f"{tag}-b"
    fleet = SimFleet(bus, [honest, victim], interval=0.5)
    await fleet.register_all()
    await fleet.beat_once()
    await asyncio.to_thread(wait_until, lambda: cluster.node(victim)["load"]["fresh"], 10, 0.1,
                            "victim's load")
    before = cluster.node(victim)["load"]

    raw = await nats.connect(cluster.nats.url)
    try:
        dead = await raw.subscribe(f"{subjects.DEADLETTER_PREFIX}.>")
        good = fleet.heartbeat(victim)
        forged = json.dumps({**json.loads(bus_encode(good)), "cpu_pct": 99.5}).encode()
        await raw.publish(subjects.node_heartbeat(honest), forged)  # honest's subject, victim's id
        bad_payloads = [
            {**json.loads(bus_encode(good)), "node_id": honest, "cpu_pct": -5},
            {**json.loads(bus_encode(good)), "node_id": honest, "memory_pct": 250},
            {**json.loads(bus_encode(good)), "node_id": honest, "surprise": True},
        ]
        for payload in bad_payloads:
            await raw.publish(subjects.node_heartbeat(honest), json.dumps(payload).encode())
        await raw.publish(subjects.node_heartbeat(honest), b'{"node_id": "x", "cpu_pct": NaN}')
        await raw.flush()
        letters = [await dead.next_msg(timeout=5) for _ in range(4)]
        assert {m.headers["Nexus-Subject"] for m in letters} == {subjects.node_heartbeat(honest)}
        # positive evidence that the forged one was handled (and dropped) before we look
        await asyncio.to_thread(wait_until, lambda: "forged heartbeat dropped"
                                in cluster.orchestrator.log(), 10, 0.05, "the forgery logged")
        after = cluster.node(victim)["load"]
        assert after["cpu_pct"] == before["cpu_pct"] != 99.5
        assert cluster.node(honest)["load"]["cpu_pct"] >= 0  # the view is intact
    finally:
        await raw.close()


def bus_encode(message) -> bytes:
    import msgspec

    return msgspec.json.encode(message)


def test_bad_node_queries_are_problems(cluster: Cluster) -> None:
    resp = httpx.get(f"{cluster.api}/v1/nodes", params={"status": "sleepy"}, headers=cluster.admin)
    assert resp.status_code == 400 and "status" in resp.json()["detail"]
    resp = httpx.get(f"{cluster.api}/v1/nodes", params={"label": "novalue"}, headers=cluster.admin)
    assert resp.status_code == 400 and "label" in resp.json()["detail"]
    assert httpx.get(f"{cluster.api}/v1/nodes/nope", headers=cluster.admin).status_code == 404
    assert httpx.delete(f"{cluster.api}/v1/nodes/nope", headers=cluster.admin).status_code == 404
    assert httpx.get(f"{cluster.api}/v1/nodes").status_code == 401


async def test_admin_deregisters_a_node(cluster: Cluster, bus: Bus) -> None:
    node_id = f"d{uuid.uuid4().hex[:6]}"
    await SimFleet(bus, [node_id]).register_all()
    assert httpx.delete(f"{cluster.api}/v1/nodes/{node_id}", headers=cluster.admin).status_code == 204
    assert node_id not in by_id(cluster.nodes())
    assert cluster.nodes(status="deregistered") and (await cluster.events(node_id))[-1] == "NodeDeregistered"


async def test_the_registry_answers_what_was_acknowledged_at_once(cluster: Cluster,
                                                                     bus: Bus) -> None:
    """Read-your-writes: a registration acknowledged over NATS is in the next list and the
    next lookup; a node deregistered with 204 is gone from the next list. No waiting (the
    registry is a projection: an answer from before it caught up would show the past)."""
    for _ in range(5):
        node_id = f"ryw{uuid.uuid4().hex[:6]}"
        await SimFleet(bus, [node_id]).register_all()
        listed, found = await asyncio.gather(asyncio.to_thread(cluster.nodes),
                                             asyncio.to_thread(cluster.node, node_id))
        # (online, or offline already: these simulated nodes send no heartbeat)
        assert node_id in by_id(listed) and found["status"] != "deregistered"
        resp = await asyncio.to_thread(httpx.delete, f"{cluster.api}/v1/nodes/{node_id}",
                                       headers=cluster.admin)
        assert resp.status_code == 204
        assert node_id not in by_id(await asyncio.to_thread(cluster.nodes))
        assert (await asyncio.to_thread(cluster.node, node_id))["status"] == "deregistered"


async def test_a_node_just_registered_has_the_whole_timeout_for_its_first_heartbeat(
        cluster: Cluster, bus: Bus) -> None:
    """Offline detection counts from the registration for a node that has not sent a
    heartbeat yet (not from the orchestrator's start: that would take a node offline
    between its registration and its first beat)."""
    node_id = f"late{uuid.uuid4().hex[:6]}"
    await SimFleet(bus, [node_id]).register_all()  # and never a heartbeat
    await asyncio.to_thread(wait_until, lambda: cluster.node(node_id)["status"] == "offline",
                            OFFLINE_AFTER + 15, 0.2, "the silent node to go offline")
    registered = await cluster.recorded(node_id, "NodeRegistered")
    offline = await cluster.recorded(node_id, "NodeWentOffline")
    assert (offline.recorded_at - registered.recorded_at).total_seconds() >= OFFLINE_AFTER


async def test_nexus_nodes_prints_a_table(cluster: Cluster, bus: Bus) -> None:
    import os
    import subprocess
    import sys

    from tests.support import REPO

    node_id = f"cli{uuid.uuid4().hex[:6]}"
    fleet = SimFleet(bus, [node_id])
    await fleet.register_all()
    await fleet.beat_once()
    await asyncio.to_thread(wait_until, lambda: cluster.node(node_id)["load"]["fresh"], 10, 0.1,
                            "heartbeat folded")
    env = {**os.environ, "NEXUS_HTTP_PORT": cluster.api.rsplit(":", 1)[1],
           "NEXUS_API_KEY": cluster.admin["Authorization"].split()[1],
           "NEXUS_DATA_DIR": str(cluster.tmp / "cli-data")}
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ops.cli", "nodes", "--status", "online"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith(node_id)]
    assert line.split()[1] == "online" and f"sim-{node_id}" in line
