"""Nodes as the orchestrator knows them: the registry fold and the in-memory load view.

Two sources, kept apart on purpose:

- **Registry state** (`NodeRecord`) is durable: a fold of the `node-<id>` stream's
  events (registered, capabilities changed, runtime changed, offline, back, draining, left,
  deregistered). The `nodes` projection stores the same fold in Postgres.
- **Load** is telemetry: heartbeats folded into `NodeView`, in memory, per
  orchestrator process. Selection reads only this view and never waits on I/O.

Listeners registered with `NodeView.subscribe` hear about every change, so a selector
can keep its own indexes up to date instead of scanning all nodes per request.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from shared.contracts.events import (
    Event,
    NodeCameBack,
    NodeCapabilitiesChanged,
    NodeDeregistered,
    NodeDraining,
    NodeLeft,
    NodeRegistered,
    NodeRuntimeChanged,
    NodeWentOffline,
)
from shared.contracts.messages import Heartbeat, NodeRegistration

ONLINE, OFFLINE, DRAINING, LEFT, DEREGISTERED = "online", "offline", "draining", "left", "deregistered"
STATUSES = (ONLINE, OFFLINE, DRAINING, LEFT, DEREGISTERED)
NODE_EVENT_TYPES = frozenset(
    t.__name__ for t in (NodeRegistered, NodeCapabilitiesChanged, NodeRuntimeChanged,
                         NodeWentOffline, NodeCameBack, NodeDraining, NodeLeft, NodeDeregistered)
)


def load_or_create_node_id(data_dir: Path) -> str:
    """The node's stable id, kept in `data_dir/node_id` (created once, atomically)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "node_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    node_id = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    os.replace(tmp, path)
    return path.read_text().strip()


@dataclass(frozen=True)
class NodeRecord:
    """Registry state of one node: the fold of its stream."""

    node_id: str
    status: str
    registration: NodeRegistration
    version: int


def fold_node(state: NodeRecord | None, event: Event, version: int) -> NodeRecord | None:
    """Apply one node event (at stream `version`) to the registry state."""
    match event:
        case NodeRegistered(node_id=node_id, registration=reg):
            return NodeRecord(node_id, ONLINE, reg, version)
        case NodeCapabilitiesChanged(registration=reg) if state is not None:
            return NodeRecord(state.node_id, state.status, reg, version)
        case NodeRuntimeChanged(runtime=runtime) if state is not None:
            reg = msgspec.structs.replace(state.registration, runtime=runtime)
            return NodeRecord(state.node_id, state.status, reg, version)
        case NodeWentOffline() if state is not None:
            return NodeRecord(state.node_id, OFFLINE, state.registration, version)
        case NodeCameBack() if state is not None:
            return NodeRecord(state.node_id, ONLINE, state.registration, version)
        case NodeDraining() if state is not None:
            return NodeRecord(state.node_id, DRAINING, state.registration, version)
        case NodeLeft() if state is not None:
            return NodeRecord(state.node_id, LEFT, state.registration, version)
        case NodeDeregistered() if state is not None:
            return NodeRecord(state.node_id, DEREGISTERED, state.registration, version)
    return state


@dataclass(slots=True)
class NodeLoad:
    """What selection needs about one node, updated in place."""

    node_id: str
    status: str = OFFLINE
    labels: dict[str, str] = field(default_factory=dict)
    models: frozenset[str] = frozenset()
    gpu_memory_total_bytes: int = 0
    gpu_memory_used_bytes: int = 0
    gpu_util_pct: float | None = None
    cpu_pct: float | None = None
    memory_pct: float | None = None
    active_requests: int = 0
    queue_depth: int = 0
    avg_response_ms: float | None = None
    draining: bool = False
    last_heartbeat: float | None = None  # time.monotonic() of arrival
    dispatched: int = 0  # selected since the last heartbeat (not yet in active_requests)

    @property
    def gpu_memory_free_bytes(self) -> int:
        return max(0, self.gpu_memory_total_bytes - self.gpu_memory_used_bytes)

    def fresh(self, now: float, max_age_s: float) -> bool:
        return self.last_heartbeat is not None and now - self.last_heartbeat <= max_age_s

    @property
    def eligible(self) -> bool:
        """Online and not draining; freshness is the selector's business."""
        return self.status == ONLINE and not self.draining


Listener = Callable[[NodeLoad], None]


class NodeView:
    """All nodes' load, in memory. Not thread-safe: use from one event loop."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeLoad] = {}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _changed(self, node: NodeLoad) -> None:
        for listener in self._listeners:
            listener(node)

    def apply_record(self, record: NodeRecord) -> NodeLoad:
        """Registry state changed (from events): status, labels, models, GPU totals."""
        node = self.nodes.get(record.node_id)
        if node is None:
            node = self.nodes[record.node_id] = NodeLoad(record.node_id)
        reg = record.registration
        node.status = record.status
        node.labels = dict(reg.labels)
        node.models = frozenset(reg.runtime.models)
        node.gpu_memory_total_bytes = sum(g.memory_total_bytes for g in reg.gpus)
        if record.status != ONLINE:
            node.dispatched = 0
        self._changed(node)
        return node

    def apply_heartbeat(self, hb: Heartbeat, now: float | None = None) -> NodeLoad | None:
        """Fold a heartbeat (NATS keeps one publisher's order); unknown nodes are ignored."""
        node = self.nodes.get(hb.node_id)
        if node is None:
            return None
        node.last_heartbeat = time.monotonic() if now is None else now
        node.cpu_pct = hb.cpu_pct
        node.memory_pct = hb.memory_pct
        node.active_requests = hb.active_requests
        node.queue_depth = hb.queue_depth
        node.avg_response_ms = hb.avg_response_ms
        node.draining = hb.draining
        node.gpu_memory_used_bytes = sum(g.memory_used_bytes for g in hb.gpus)
        node.gpu_util_pct = (sum(g.utilization_pct for g in hb.gpus) / len(hb.gpus)) if hb.gpus else None
        node.dispatched = 0  # the node's own count now includes what we sent it
        self._changed(node)
        return node

    def remove(self, node_id: str) -> None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            node.status = DEREGISTERED
            self._changed(node)

    def note_dispatch(self, node_id: str) -> None:
        """A request was just sent to this node (counts until its next heartbeat)."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.dispatched += 1
            self._changed(node)
