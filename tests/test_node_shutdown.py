"""A node that stops says nothing after `leaving`, never registers again once its shutdown
has begun, and always stops: a cancellation that Python 3.11's `asyncio.wait_for`
swallows (the registration's reply arriving with the cancel) must not keep it running.

The daemon runs in-process on a real NATS connection; the test answers its registrations
as the orchestrator would (`nexus.node.<id>.register`) and records what it says."""

from __future__ import annotations

import asyncio
import sys
import uuid

from services.node.daemon import NodeDaemon
from shared.contracts import subjects
from shared.contracts.messages import (
    NodeRegistration,
    NodeStatusChange,
    RegistrationAck,
    RuntimeInfo,
)
from shared.infra.messaging import Bus
from shared.infra.tasks import stop_tasks


async def test_a_lost_cancellation_does_not_keep_a_task_running() -> None:
    """What hung the node (CPython gh-86296): a reply completing in the same loop
    iteration as the cancel makes `wait_for` return it, and the task goes on to wait
    for something else. One cancel leaves it running; `stop_tasks` stops it."""
    loop = asyncio.get_running_loop()

    async def report(reply: asyncio.Future[str]) -> None:  # report_runtime's shape
        await asyncio.wait_for(reply, 5)  # nats-py's request
        await asyncio.Event().wait()  # the next runtime change, which never comes

    reply: asyncio.Future[str] = loop.create_future()
    task = asyncio.create_task(report(reply), name="report")
    await asyncio.sleep(0)
    reply.set_result("ack")
    task.cancel()  # in the same loop iteration as the reply
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert bool(done) == (sys.version_info >= (3, 12)), "3.11 loses the cancel; 3.12 does not"
    assert await stop_tasks([task], timeout_s=5) == []
    assert task.cancelled()


async def test_a_node_in_its_shutdown_drain_does_not_register_again(infra) -> None:
    node_id = uuid.uuid4().hex
    said: list[str] = []
    bus = await Bus.connect(infra.nats_url, "test-node")
    orchestrator = await Bus.connect(infra.nats_url, "test-orchestrator")

    async def on_register(reg: NodeRegistration, _msg) -> RegistrationAck:
        said.append("register " + ",".join(reg.runtime.models))
        return RegistrationAck(node_id=node_id, status="online", heartbeat_timeout_s=5)

    async def on_status(change: NodeStatusChange, _msg) -> None:
        said.append(change.status)

    await orchestrator.subscribe(subjects.node_register(node_id), NodeRegistration, on_register)
    await orchestrator.subscribe(subjects.node_status(node_id), NodeStatusChange, on_status)
    agent = NodeDaemon(node_id, labels={}, heartbeat_interval_s=0.2,
                       runtime=RuntimeInfo(models=("a",), ready=True))
    try:
        await agent.register(bus, 2)
        agent.start_reporting(bus, 2)
        agent.set_runtime(RuntimeInfo(models=("a", "b"), ready=True))  # a model installed
        await _until(lambda: "register a,b" in said)
        async with agent.track_request():  # in-flight work holds the drain open
            leave = asyncio.create_task(agent.drain_and_leave(bus, 30))
            await _until(lambda: "draining" in said)
            agent.set_runtime(RuntimeInfo(models=("a",), ready=True))  # a model removed
            await asyncio.sleep(0.3)  # room for a (wrong) re-registration to be sent
        await asyncio.wait_for(leave, 10)
        await orchestrator.nc.flush()
        await _until(lambda: "leaving" in said)
        assert said == ["register a", "register a,b", "draining", "leaving"], said
        assert agent._reporting.done() and agent._beating.done()
    finally:
        await agent.stop_reporting()
        await bus.close()
        await orchestrator.close()


async def _until(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)

