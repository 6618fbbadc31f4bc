"""The node registry: registration, liveness and the in-memory load view.

Durable facts (registered, capabilities changed, offline, back, draining, left,
deregistered) are events on `node-<id>`, appended with the stream's expected version,
so when several orchestrators see the same silence exactly one `NodeWentOffline` is
written. Heartbeats never touch Postgres: they arrive through an ordered JetStream
consumer (last heartbeat of every node first, so a restarted orchestrator knows at
once who is alive) and are folded into `NodeView`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from shared.contracts import subjects
from shared.contracts.events import (
    Event,
    Metadata,
    NodeCameBack,
    NodeCapabilitiesChanged,
    NodeDeregistered,
    NodeDraining,
    NodeLeft,
    NodeRegistered,
    NodeRuntimeChanged,
    NodeWentOffline,
    node_stream,
)
from shared.infra.eventstore import EventStore, ProjectionRunner, WrongExpectedVersion
from shared.contracts.errors import Conflict, NotFound
from shared.contracts.messages import (
    Heartbeat,
    NodeDrainAck,
    NodeDrainCommand,
    NodeRegistration,
    NodeStatusChange,
    RegistrationAck,
    RuntimeInfo,
)
from shared.infra.messaging import Bus, HandlerError, MessagingError, stop_listening
from shared.domain.nodes import (
    DEREGISTERED,
    DRAINING,
    LEFT,
    NODE_EVENT_TYPES,
    OFFLINE,
    ONLINE,
    NodeRecord,
    NodeView,
    fold_node,
)
from services.orchestrator.read_models.node_registry import NodeRegistryReadModel, RegisteredNode

log = logging.getLogger("nexus.orchestrator.nodes")


# -- decisions (pure) ---------------------------------------------------------------------


def decide_registration(state: NodeRecord | None, reg: NodeRegistration) -> list[Event]:
    if state is None or state.status == DEREGISTERED:
        return [NodeRegistered(node_id=reg.node_id, registration=reg)]
    events: list[Event] = []
    if _capabilities(state.registration) != _capabilities(reg):
        events.append(NodeCapabilitiesChanged(node_id=reg.node_id, registration=reg))
    if state.registration.runtime != reg.runtime:  # crashed, ready, ...: its own event
        events.append(NodeRuntimeChanged(node_id=reg.node_id, runtime=reg.runtime))
    if state.status != ONLINE:
        events.append(NodeCameBack(node_id=reg.node_id, via="registration"))
    return events


def _capabilities(reg: NodeRegistration) -> NodeRegistration:
    """Registration minus what may change between restarts without meaning anything, and
    minus the runtime (its changes are `NodeRuntimeChanged`)."""
    return msgspec.structs.replace(reg, addresses=(), runtime=RuntimeInfo())


def decide_status(state: NodeRecord | None, change: NodeStatusChange) -> list[Event]:
    if state is None or state.status in (LEFT, DEREGISTERED):
        return []
    if change.status == "draining" and state.status != DRAINING:
        return [NodeDraining(node_id=state.node_id, reason=change.reason)]
    if change.status == "leaving":
        return [NodeLeft(node_id=state.node_id, reason=change.reason)]
    return []


def decide_offline(state: NodeRecord | None, last_heartbeat_at: float | None,
                   timeout_s: float) -> list[Event]:
    if state is None or state.status not in (ONLINE, DRAINING):
        return []
    return [NodeWentOffline(node_id=state.node_id, last_heartbeat_at=last_heartbeat_at,
                            timeout_s=timeout_s)]


def decide_operator_drain(state: NodeRecord | None, node_id: str, drain: bool,
                          actor: str) -> list[Event]:
    """The operator drains a node (or resumes a drained one). Unknown or deregistered:
    `NotFound`; offline or left: `Conflict` (nothing there to drain or resume). Draining
    twice, or resuming an online node, changes nothing."""
    if state is None or state.status == DEREGISTERED:
        raise NotFound("node", node_id)
    if state.status in (OFFLINE, LEFT):
        raise Conflict(f"node {state.node_id!r} is {state.status}: only an online node drains")
    if drain:
        return [] if state.status == DRAINING else [
            NodeDraining(node_id=state.node_id, reason=f"drain requested by {actor}")]
    return [NodeCameBack(node_id=state.node_id, via="undrain")] if state.status == DRAINING else []


def decide_came_back(state: NodeRecord | None) -> list[Event]:
    if state is None or state.status != OFFLINE:
        return []
    return [NodeCameBack(node_id=state.node_id, via="heartbeat")]


# -- the service --------------------------------------------------------------------------


class NodeService:
    def __init__(self, store: EventStore, bus: Bus, view: NodeView, runner: ProjectionRunner, *,
                 offline_after_s: float, poll_s: float = 1.0) -> None:
        self.store = store
        self.bus = bus
        self.view = view
        self.runner = runner
        self.registry = NodeRegistryReadModel(store)
        self.offline_after_s = offline_after_s
        self.poll_s = poll_s
        self.records: dict[str, NodeRecord] = {}
        self.last_heartbeat_wall: dict[str, float] = {}
        self.started = time.monotonic()
        # when each node last became online in this process's view (registered, back): it
        # has the whole timeout from then to send a heartbeat
        self.online_since: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[str] = set()
        self._subs: list[object] = []
        self.heartbeat_listeners: list[Callable[[Heartbeat], None]] = []  # e.g. model inventory

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        position = 0
        while batch := await self.store.read_all(position, 5000, types=sorted(NODE_EVENT_TYPES)):
            for rec in batch:
                self._fold(rec.event, rec.stream_version)
            position = batch[-1].position
        self._tasks.append(asyncio.create_task(self._follow(position), name="node-events"))
        self._subs.append(await self.bus.subscribe(
            subjects.NODE_REGISTER_ALL, NodeRegistration, self.on_register,
            queue=subjects.QUEUE_ORCHESTRATOR, concurrent=True))
        self._subs.append(await self.bus.subscribe(
            subjects.NODE_STATUS_ALL, NodeStatusChange, self.on_status,
            queue=subjects.QUEUE_ORCHESTRATOR))  # in order: draining before leaving
        self._subs.append(await self.bus.subscribe_stream(
            subjects.NODE_HEARTBEAT_ALL, Heartbeat, self.on_heartbeat,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT))
        self._tasks.append(asyncio.create_task(self._liveness(), name="node-liveness"))

    async def stop(self) -> None:
        await stop_listening(self._tasks, self._subs)

    # -- folding ----------------------------------------------------------------------

    def _fold(self, event: Event, version: int) -> None:
        node_id = event.node_id
        current = self.records.get(node_id)
        if current is not None and version <= current.version:
            return  # already folded (our own append, seen again by the follower)
        record = fold_node(current, event, version)
        if record is None:
            return
        self.records[node_id] = record
        if record.status == ONLINE and (current is None or current.status != ONLINE):
            self.online_since[node_id] = time.monotonic()
        if record.status == DEREGISTERED:
            self.view.remove(node_id)
        else:
            self.view.apply_record(record)

    async def _follow(self, after: int) -> None:
        """Fold node events appended by any orchestrator into this process's view."""
        async for rec in self.store.follow(after, poll_s=self.poll_s,
                                           types=sorted(NODE_EVENT_TYPES)):
            self._fold(rec.event, rec.stream_version)

    async def transition(self, node_id: str,
                         decide: Callable[[NodeRecord | None], list[Event]],
                         actor: str = "orchestrator") -> NodeRecord | None:
        """Read the node's stream, decide, append at its version; retry on a race."""
        stream = node_stream(node_id)
        for _ in range(5):
            state: NodeRecord | None = None
            for rec in await self.store.read_stream(stream):
                state = fold_node(state, rec.event, rec.stream_version)
            events = decide(state)
            if not events:
                return state
            version = state.version if state else 0
            try:
                await self.store.append(stream, events, expected_version=version,
                                        metadata=Metadata(actor=actor, correlation_id=node_id))
            except WrongExpectedVersion:
                continue  # another orchestrator moved first: decide again on its result
            for offset, event in enumerate(events, start=1):
                self._fold(event, version + offset)
            return self.records.get(node_id)
        raise RuntimeError(f"node {node_id}: too many concurrent transitions")

    # -- handlers ---------------------------------------------------------------------

    @staticmethod
    def _check_sender(claimed: str, msg: Msg) -> None:
        sender = subjects.node_id_from_subject(msg.subject)
        if claimed != sender:
            raise HandlerError("Forbidden", f"node {sender} may not speak for node {claimed}")

    async def on_register(self, reg: NodeRegistration, msg: Msg) -> RegistrationAck:
        self._check_sender(reg.node_id, msg)
        record = await self.transition(reg.node_id, lambda s: decide_registration(s, reg),
                                       actor=f"node:{reg.node_id}")
        assert record is not None
        return RegistrationAck(node_id=reg.node_id, status=record.status,
                               heartbeat_timeout_s=self.offline_after_s)

    async def on_status(self, change: NodeStatusChange, msg: Msg) -> None:
        self._check_sender(change.node_id, msg)
        await self.transition(change.node_id, lambda s: decide_status(s, change),
                              actor=f"node:{change.node_id}")

    async def on_heartbeat(self, hb: Heartbeat, msg: Msg) -> None:
        sender = subjects.node_id_from_subject(msg.subject)
        if hb.node_id != sender:
            log.warning("forged heartbeat dropped",
                        extra={"subject": msg.subject, "claimed_node_id": hb.node_id})
            return
        # Age from the server's receive time: right for live and for replayed heartbeats.
        received = msg.metadata.timestamp.timestamp() if msg.metadata else time.time()
        age = max(0.0, time.time() - received)
        if self.view.apply_heartbeat(hb, now=time.monotonic() - age) is None:
            return  # not (or no longer) registered
        self.last_heartbeat_wall[hb.node_id] = received
        for listener in self.heartbeat_listeners:
            listener(hb)
        record = self.records.get(hb.node_id)
        if record and record.status == OFFLINE and age < self.offline_after_s:
            self._spawn_once(hb.node_id, decide_came_back)

    def _spawn_once(self, node_id: str, decide: Callable[[NodeRecord | None], list[Event]]) -> None:
        if node_id in self._pending:
            return
        self._pending.add(node_id)

        async def run() -> None:
            try:
                await self.transition(node_id, decide)
            except Exception:
                log.exception("node transition failed", extra={"node_id": node_id})
            finally:
                self._pending.discard(node_id)

        task = asyncio.create_task(run())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _liveness(self) -> None:
        interval = max(0.1, min(1.0, self.offline_after_s / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for node_id, record in list(self.records.items()):
                if record.status not in (ONLINE, DRAINING):
                    continue
                node = self.view.nodes.get(node_id)
                beat = node.last_heartbeat if node and node.last_heartbeat is not None else self.started
                last = max(beat, self.online_since.get(node_id, 0.0))
                if now - last > self.offline_after_s:
                    wall = self.last_heartbeat_wall.get(node_id)
                    self._spawn_once(node_id, lambda s, w=wall: decide_offline(s, w, self.offline_after_s))

    # -- queries ----------------------------------------------------------------------

    async def find(self, *, status: str | None = None, label: tuple[str, str] | None = None,
                   model: str | None = None) -> list[RegisteredNode]:
        """Registered nodes (the `nodes` read model), see `NodeRegistryReadModel.find`;
        read-your-writes: every node event committed before the call is in the answer (a
        registration acknowledged over NATS, a deregistration answered 204, by any
        orchestrator)."""
        await self.runner.wait_for_head(("nodes",))
        return await self.registry.find(status=status, label=label, model=model)

    async def registered(self, node_id: str) -> RegisteredNode | None:
        """The node as registered, with every event of its stream committed before the call."""
        if not await self.runner.wait_for_stream(node_stream(node_id), ("nodes",)):
            return None
        return await self.registry.get(node_id)

    async def deregister(self, node_id: str, actor: str) -> bool:
        def decide(state: NodeRecord | None) -> list[Event]:
            if state is None or state.status == DEREGISTERED:
                return []
            return [NodeDeregistered(node_id=node_id, actor=actor)]

        existed = node_id in self.records and self.records[node_id].status != DEREGISTERED
        await self.transition(node_id, decide, actor=actor)
        return existed

    async def drain(self, node_id: str, drain: bool, actor: str) -> NodeRecord:
        """The operator's drain (or resume): recorded (`NodeDraining` / `NodeCameBack`
        via "undrain"; the selector skips a draining node from then on), then the node is
        told over NATS so its heartbeats agree; an unreachable node is drained all the
        same (it gets no work), and a restart resumes it."""
        if node_id not in self.records:
            raise NotFound("node", node_id)
        record = await self.transition(node_id, lambda s: decide_operator_drain(s, node_id, drain, actor),
                                       actor=actor)
        assert record is not None
        try:
            await self.bus.request(subjects.node_drain(node_id), NodeDrainCommand(
                node_id=node_id, drain=drain, reason=f"by {actor}"), NodeDrainAck, timeout=2.0)
        except MessagingError as exc:
            log.warning("drain not acknowledged by the node", extra={"node_id": node_id,
                                                                     "error": str(exc)})
        return record

    async def history(self, node_id: str, limit: int = 150) -> list[Heartbeat]:
        """The node's recent heartbeats from the bounded JetStream stream."""
        sub = await self.bus.js.subscribe(subjects.node_heartbeat(node_id), ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.ALL)
        beats: list[Heartbeat] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except Exception:
                    break
                with contextlib.suppress(msgspec.DecodeError):
                    beats.append(msgspec.json.decode(msg.data, type=Heartbeat))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return beats[-limit:]
