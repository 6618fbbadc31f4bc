"""The node daemon: identity, registration, heartbeats, drain and leave.

`NodeDaemon` holds the node's state (active requests, response-time EWMA) and builds
its messages; `run()` drives it on a `Bus`. Inference relaying (the LLM path) plugs
into `track_request`, which feeds active requests and latency into the heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from shared import __version__
from shared.contracts import subjects
from shared.contracts.messages import (
    Heartbeat,
    NodeDrainAck,
    NodeDrainCommand,
    NodeRegistration,
    NodeStatusChange,
    RegistrationAck,
    RuntimeInfo,
)
from shared.infra.messaging import Bus, MessagingError
from shared.infra.tasks import stop_tasks
from services.node import hardware

log = logging.getLogger("nexus.node")

class NodeDaemon:
    def __init__(self, node_id: str, *, labels: dict[str, str], heartbeat_interval_s: float,
                 runtime: RuntimeInfo | None = None, gpus: hardware.Gpus | None = None) -> None:
        self.node_id = node_id
        self.labels = labels
        self.interval = heartbeat_interval_s
        self.runtime = runtime or RuntimeInfo()
        self.registered_runtime: RuntimeInfo | None = None  # what the orchestrator last accepted
        self._runtime_changes: list[RuntimeInfo] = []  # not yet reported, oldest first
        self._runtime_changed = asyncio.Event()
        self.gpus = gpus or hardware.Gpus()
        self.installed_models = lambda: ()  # the inventory heartbeats carry (services.node.models)
        self.active_requests = 0
        self.queue_depth = 0
        self.avg_response_ms: float | None = None
        self.draining = False
        self.leaving = False  # shutting down: never registers again (`drain_and_leave`)
        self._reporting: asyncio.Task[None] | None = None
        self._beating: asyncio.Task[None] | None = None
        self.seq = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def registration(self, runtime: RuntimeInfo | None = None) -> NodeRegistration:
        return NodeRegistration(
            node_id=self.node_id, hostname=socket.gethostname(),
            addresses=hardware.host_addresses(), labels=self.labels,
            cpu_count=hardware.cpu_count(), memory_total_bytes=hardware.memory_total(),
            gpus=self.gpus.info, runtime=runtime or self.runtime, agent_version=__version__,
            heartbeat_interval_s=self.interval,
        )

    def sample(self) -> Heartbeat:
        """Blocking (psutil/NVML): call through `asyncio.to_thread`."""
        cpu, mem = hardware.sample_host()
        self.seq += 1
        return Heartbeat(
            node_id=self.node_id, seq=self.seq, sent_at=time.time(), cpu_pct=cpu,
            memory_pct=mem, gpus=self.gpus.sample(), active_requests=self.active_requests,
            queue_depth=self.queue_depth, avg_response_ms=self.avg_response_ms,
            draining=self.draining, models=tuple(self.installed_models()),
        )

    @contextlib.asynccontextmanager
    async def track_request(self):
        """Wrap each inference request: counts it as active and feeds the latency EWMA."""
        self.active_requests += 1
        self._idle.clear()
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed_ms = (time.monotonic() - started) * 1000
            self.avg_response_ms = (elapsed_ms if self.avg_response_ms is None
                                    else 0.8 * self.avg_response_ms + 0.2 * elapsed_ms)
            self.active_requests -= 1
            if self.active_requests == 0:
                self._idle.set()

    def set_runtime(self, info: RuntimeInfo) -> None:
        """The runtime changed (starting, ready, crashed, failed): serve with it now, and
        report it (`report_runtime`)."""
        self.runtime = info
        self._runtime_changes.append(info)
        self._runtime_changed.set()

    async def report_runtime(self, bus: Bus, timeout: float) -> None:
        """After the first registration: re-register with every runtime change, one at a
        time and in order (the orchestrator appends a `NodeRuntimeChanged` for each), so
        no crash goes unrecorded however fast they come."""
        pending = self._runtime_changes
        while not self.leaving:
            # Whatever the last registration carried, and everything before it, is known.
            for i in range(len(pending) - 1, -1, -1):
                if pending[i] is self.registered_runtime:
                    del pending[:i + 1]
                    break
            if not pending:
                self._runtime_changed.clear()
                await self._runtime_changed.wait()
            elif pending[0] == self.registered_runtime:
                pending.pop(0)
            else:
                await self.register(bus, timeout, runtime=pending[0])

    async def register(self, bus: Bus, timeout: float,
                       runtime: RuntimeInfo | None = None) -> RegistrationAck:
        """Ask the orchestrator to accept us; retry (with backoff) until it answers."""
        delay = 0.2
        while not self.leaving:
            try:
                registration = self.registration(runtime)
                ack = await bus.request(subjects.node_register(self.node_id), registration,
                                        RegistrationAck, timeout=timeout)
                self.registered_runtime = registration.runtime
                log.info("registered", extra={"node_id": self.node_id, "status": ack.status})
                return ack
            except MessagingError as exc:
                log.warning("registration not answered, retrying: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise asyncio.CancelledError("the node is leaving")

    def start_reporting(self, bus: Bus, timeout: float) -> None:
        """Once registered: heartbeats, and a re-registration with each runtime change."""
        self._reporting = asyncio.create_task(self.report_runtime(bus, timeout),
                                              name="report-runtime")
        self._beating = asyncio.create_task(self.heartbeat_loop(bus), name="heartbeats")

    async def stop_reporting(self) -> None:
        """No registration and no heartbeat from now on (idempotent)."""
        self.leaving = True
        await stop_tasks([self._reporting, self._beating])

    async def heartbeat_loop(self, bus: Bus) -> None:
        hardware.sample_host()  # prime psutil's cpu_percent baseline
        while True:
            started = time.monotonic()
            try:
                beat = await asyncio.to_thread(self.sample)
                await bus.publish(subjects.node_heartbeat(self.node_id), beat, traced=False)
            except Exception as exc:  # NATS down: keep beating, it reconnects
                log.warning("heartbeat not sent: %s", exc)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def on_drain(self, command: NodeDrainCommand, _msg: object) -> NodeDrainAck:
        """The operator drains the node (or resumes it): no new work is routed here while
        the heartbeats say `draining`; what runs finishes. A restart resumes."""
        self.draining = command.drain
        log.info("drain requested" if command.drain else "resumed",
                 extra={"node_id": self.node_id, "reason": command.reason,
                        "active_requests": self.active_requests})
        return NodeDrainAck(node_id=self.node_id, draining=self.draining,
                            active_requests=self.active_requests)

    async def drain_and_leave(self, bus: Bus, deadline_s: float) -> None:
        """Announce draining, wait for in-flight work (up to the deadline), announce leaving.

        Shutdown begins by stopping the re-registrations (a runtime change now, e.g. a
        model just removed, must not register the node again), and awaiting that task:
        a registration in flight ends before the node says anything else. Heartbeats go
        on through the drain (they say `draining`) and stop before `leaving`, which is
        the last thing the node says."""
        self.leaving = True
        await stop_tasks([self._reporting])
        self.draining = True
        with contextlib.suppress(Exception):
            await bus.publish(subjects.node_status(self.node_id),
                              NodeStatusChange(node_id=self.node_id, status="draining",
                                               reason="agent stopping"))
        try:
            await asyncio.wait_for(self._idle.wait(), deadline_s)
            reason = "stopped"
        except TimeoutError:
            reason = f"stopped with {self.active_requests} requests still running after {deadline_s:g}s"
        await self.stop_reporting()
        with contextlib.suppress(Exception):
            await bus.publish(subjects.node_status(self.node_id),
                              NodeStatusChange(node_id=self.node_id, status="leaving", reason=reason))
            await bus.nc.flush(timeout=2)
        log.info("left", extra={"node_id": self.node_id, "reason": reason})
