"""A node's supervised runtime that crashes is visible, backs off, and stops after a bound.

Our supervisor (`ManagedLlama` in the real node process) is under test, not llama.cpp:
`NEXUS_LLAMA_SERVER_BIN` points it at a tiny script that kills itself with SIGILL, as a
llama-server built for another CPU does. The orchestrator and the node run as real
processes on their own NATS server and database; what they report is read through the
real API, the event store, `nexus nodes` and `nexus up`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import msgspec
import pytest

from shared.contracts.events import NodeRuntimeChanged, node_stream
from shared.infra.eventstore import EventStore
from shared.infra.eventstore.store import create_pool
from shared.infra import EmbeddedNats
from shared.contracts.messages import NodeRegistration, RuntimeInfo
from shared.domain.nodes import fold_node
from services.orchestrator.fleet import decide_registration
from shared.infra.process import describe_exit, restart_delay
from tests.conftest import new_database
from tests.support import REPO, ServiceProc, free_port_str, service_env, wait_http_ok, wait_until

MAX_RESTARTS = 2
SIGILL_REASON = f"crashed: signal SIGILL (illegal instruction), {MAX_RESTARTS} restarts"


def crashing_binary(directory: Path) -> tuple[Path, Path, Path]:
    """A stand-in for llama-server that notes each start, waits for `go` to exist, then
    dies of SIGILL (the wait lets a test see the node registered first)."""
    directory.mkdir(parents=True, exist_ok=True)
    starts, go = directory / "starts", directory / "go"
    script = directory / "llama-server"
    script.write_text(f"#!/bin/sh\nulimit -c 0\necho \"$@\" >> '{starts}'\n"
                      f"while [ ! -e '{go}' ]; do sleep 0.05; done\nkill -ILL $$\n")
    script.chmod(0o755)
    return script, starts, go


def test_exits_in_words() -> None:
    assert describe_exit(-4) == ("signal SIGILL (illegal instruction)", None, "SIGILL")
    assert describe_exit(-11) == ("signal SIGSEGV (segmentation fault)", None, "SIGSEGV")
    assert describe_exit(1) == ("exit code 1", 1, None)
    assert [restart_delay(n, 1.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_runtime_change_is_its_own_event_and_folds_into_the_registry() -> None:
    reg = NodeRegistration(node_id="n1", hostname="h", cpu_count=2, memory_total_bytes=1,
                           agent_version="1", heartbeat_interval_s=2,
                           runtime=RuntimeInfo(kind="llama.cpp", state="starting"))
    [registered] = decide_registration(None, reg)
    state = fold_node(None, registered, 1)
    assert decide_registration(state, reg) == []  # nothing changed, nothing appended
    crashed = RuntimeInfo(kind="llama.cpp", state="crashed", restarts=1, exit_signal="SIGILL",
                          reason="crashed: signal SIGILL (illegal instruction), 1 restart")
    again = msgspec.structs.replace(reg, runtime=crashed, addresses=("10.0.0.9",))
    assert decide_registration(state, again) == [NodeRuntimeChanged(node_id="n1", runtime=crashed)]
    state = fold_node(state, decide_registration(state, again)[0], 2)
    assert state.registration.runtime == crashed and state.registration.hostname == "h"


@pytest.fixture
def crash_cluster(infra, tmp_path):
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    port = free_port_str()
    admin_key = f"admin-{uuid.uuid4().hex}"
    database_url = new_database(infra)
    env = service_env(server.url, database_url, NEXUS_HTTP_PORT=port, NEXUS_ADMIN_KEY=admin_key,
                      NEXUS_PROJECTION_POLL_S="0.2")
    orchestrator = ServiceProc("orchestrator", env, tmp_path / "orchestrator.log").start()
    api = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{api}/health", proc=orchestrator)
        yield api, env, database_url, {"Authorization": f"Bearer {admin_key}"}, tmp_path
    finally:
        if orchestrator.proc and orchestrator.proc.poll() is None:
            orchestrator.stop()
        server.stop()


def test_a_runtime_that_dies_on_start_is_reported_crashed_then_failed(crash_cluster) -> None:
    api, env, database_url, admin, tmp = crash_cluster
    binary, starts, go = crashing_binary(tmp / "bin")
    node = ServiceProc("node", {
        **env, "NEXUS_RUNTIME": "llama", "NEXUS_LLAMA_SERVER_BIN": str(binary),
        "NEXUS_RUNTIME_MAX_RESTARTS": str(MAX_RESTARTS),
        "NEXUS_RUNTIME_RESTART_BACKOFF_S": "0.05", "NEXUS_NODE_DATA_DIR": str(tmp / "node"),
        "NEXUS_HEARTBEAT_INTERVAL_S": "0.3"}, tmp / "node.log").start()
    try:
        node_id = wait_until(lambda: (tmp / "node" / "node_id").read_text().strip(), 20,
                             what="the node to write its id")

        def runtime_state(state: str) -> dict | None:
            resp = httpx.get(f"{api}/v1/nodes/{node_id}", headers=admin, timeout=10)
            runtime = resp.json()["runtime"] if resp.status_code == 200 else {}
            return runtime if runtime.get("state") == state else None

        wait_until(lambda: runtime_state("starting"), 30, 0.1, "the node registered, starting")
        go.touch()  # from now on the binary dies at once, every time
        runtime = wait_until(lambda: runtime_state("failed"), 60, 0.1,
                             "the runtime to be reported failed")
        assert runtime["exit_signal"] == "SIGILL" and runtime["exit_code"] is None
        assert runtime["restarts"] == MAX_RESTARTS and runtime["ready"] is False
        assert runtime["reason"].startswith(SIGILL_REASON), runtime["reason"]
        assert runtime["models"] == []  # nothing to route to this node

        listed = httpx.get(f"{api}/v1/nodes", headers=admin, timeout=10).json()["nodes"]
        assert [n["runtime"]["state"] for n in listed if n["node_id"] == node_id] == ["failed"]

        # The node's stream tells the story: each crash with its restarts so far, then failed.
        changes = asyncio.run(runtime_changes(database_url, node_id))
        assert [c.state for c in changes] == ["crashed"] * MAX_RESTARTS + ["failed"]
        assert [c.restarts for c in changes] == [*range(MAX_RESTARTS), MAX_RESTARTS]
        assert all(c.exit_signal == "SIGILL" for c in changes)
        assert changes[0].reason == ("crashed: signal SIGILL (illegal instruction), 0 restarts;"
                                     " restarting in 0.05s")
        assert changes[-1].reason == runtime["reason"]

        cli = subprocess.run(
            [sys.executable, "-m", "ops.cli", "nodes"], cwd=REPO, capture_output=True,
            text=True, timeout=60,
            env={**os.environ, "NEXUS_HTTP_PORT": api.rsplit(":", 1)[1],
                 "NEXUS_API_KEY": admin["Authorization"].split()[1],
                 "NEXUS_DATA_DIR": str(tmp / "cli-data")})
        assert cli.returncode == 0, cli.stderr
        lines = cli.stdout.splitlines()
        [row] = [i for i, line in enumerate(lines) if line.startswith(node_id)]
        assert lines[row].split()[-1] == "failed"
        assert lines[row + 1].strip().startswith(f"runtime failed: {SIGILL_REASON}")

        # Stopped after the bound: once the node has exited, the binary had been started
        # exactly once plus MAX_RESTARTS times, with the model and a port each time.
        assert node.stop() == 0, node.log()
        started = starts.read_text().splitlines()
        assert len(started) == MAX_RESTARTS + 1, started
        assert all("--port" in line and "-m" in line for line in started)
        assert "SIGILL" in node.log()
    finally:
        if node.proc and node.proc.poll() is None:
            node.kill()


async def runtime_changes(database_url: str, node_id: str) -> list:
    pool = await create_pool(database_url, max_size=1)
    try:
        return [r.event.runtime for r in await EventStore(pool).read_stream(node_stream(node_id))
                if isinstance(r.event, NodeRuntimeChanged)]
    finally:
        await pool.close()


@pytest.mark.slow
def test_nexus_up_says_the_runtime_crashed_and_why(tmp_path) -> None:
    from tests.test_nexus_up import Up

    binary, starts, go = crashing_binary(tmp_path / "bin")
    go.touch()  # dies at once, every time
    up = Up(tmp_path / "nexus", NEXUS_RUNTIME="llama", NEXUS_LLAMA_SERVER_BIN=str(binary),
            NEXUS_RUNTIME_MAX_RESTARTS="1", NEXUS_RUNTIME_RESTART_BACKOFF_S="0.05").start()
    try:
        expected = ("LLM runtime failed: crashed: signal SIGILL (illegal instruction), 1 restart;"
                    " not restarted again (log: ")
        wait_until(lambda: expected in up.output(), 60, 0.2, "nexus up to say the runtime failed")
        assert "building llama-server" not in up.output()  # the given binary is used as it is
        assert len(starts.read_text().splitlines()) == 2
    finally:
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0, up.output()
