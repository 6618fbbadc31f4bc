"""`/v1/nodes`: the registry (projection) joined with live load (in-memory view)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from litestar import Controller, delete, get, post
from litestar.params import Parameter

from shared.domain.nodes import STATUSES, NodeLoad
from services.orchestrator.auth import require_platform
from services.orchestrator.keys import Caller
from services.orchestrator.fleet import NodeService
from services.orchestrator.problems import Problem, problem_for
from shared.contracts.errors import NexusError
from services.orchestrator.read_models.node_registry import RegisteredNode
from services.orchestrator.schemas import LoadSample, NodeDetail, NodeList, NodeLoadOut, NodeOut


def _load(node: NodeLoad | None, fresh_within_s: float) -> NodeLoadOut | None:
    if node is None:
        return None
    now = time.monotonic()
    age = None if node.last_heartbeat is None else round(now - node.last_heartbeat, 3)
    return NodeLoadOut(
        fresh=node.fresh(now, fresh_within_s), heartbeat_age_s=age, cpu_pct=node.cpu_pct,
        memory_pct=node.memory_pct, gpu_util_pct=node.gpu_util_pct,
        gpu_memory_used_bytes=node.gpu_memory_used_bytes,
        gpu_memory_total_bytes=node.gpu_memory_total_bytes,
        active_requests=node.active_requests + node.dispatched, queue_depth=node.queue_depth,
        avg_response_ms=node.avg_response_ms, draining=node.draining,
    )


def _node_out(node: RegisteredNode, nodes: NodeService) -> dict:
    reg = node.registration
    return dict(
        node_id=node.node_id, status=node.status, hostname=reg.hostname,
        addresses=reg.addresses, labels=reg.labels, cpu_count=reg.cpu_count,
        memory_total_bytes=reg.memory_total_bytes,
        gpus=tuple(msgspec.structs.asdict(g) for g in reg.gpus),
        runtime=msgspec.structs.asdict(reg.runtime), agent_version=reg.agent_version,
        registered_at=node.registered_at, status_changed_at=node.status_changed_at,
        load=_load(nodes.view.nodes.get(node.node_id), nodes.offline_after_s),
    )


def _label(label: str | None) -> tuple[str, str] | None:
    if label is None:
        return None
    key, sep, value = label.partition("=")
    if not sep or not key:
        raise Problem(400, "validation", "label: expected key=value",
                      errors=[{"field": "label", "message": "expected key=value"}])
    return key, value


class NodesController(Controller):
    path = "/v1/nodes"

    @get("/")
    async def list_nodes(
        self, nodes: NodeService,
        status: Literal[STATUSES] | None = None,  # type: ignore[valid-type]
        label: Annotated[str | None, Parameter(
            description="key=value", pattern=r"^[^=\u0000]+=[^\u0000]*$", max_length=400)] = None,
        model: Annotated[str | None, Parameter(min_length=1, max_length=200)] = None,
    ) -> NodeList:
        found = await nodes.find(status=status, label=_label(label), model=model)
        out = tuple(NodeOut(**_node_out(node, nodes)) for node in found)
        return NodeList(nodes=out, total=len(out))

    @get("/{node_id:str}")
    async def get_node(self, node_id: str, nodes: NodeService) -> NodeDetail:
        node = await nodes.registered(node_id)
        if node is None:
            raise Problem(404, "not-found", f"node {node_id!r} not found")
        history = tuple(
            LoadSample(sent_at=h.sent_at, cpu_pct=h.cpu_pct, memory_pct=h.memory_pct,
                       gpu_util_pct=(sum(g.utilization_pct for g in h.gpus) / len(h.gpus))
                       if h.gpus else None,
                       gpu_memory_used_bytes=sum(g.memory_used_bytes for g in h.gpus),
                       active_requests=h.active_requests, avg_response_ms=h.avg_response_ms)
            for h in await nodes.history(node_id)
        )
        return NodeDetail(**_node_out(node, nodes), history=history)

    @delete("/{node_id:str}", status_code=204)
    async def deregister_node(self, node_id: str, nodes: NodeService, caller: Caller) -> None:
        require_platform(caller)
        if not await nodes.deregister(node_id, actor=caller.actor):
            raise Problem(404, "not-found", f"node {node_id!r} not found")

    @post("/{node_id:str}/drain", status_code=200)
    async def drain_node(self, node_id: str, nodes: NodeService, caller: Caller) -> NodeOut:
        """Drain a node (platform): no new work goes to it, what runs finishes; the node
        is told over NATS. Unknown: 404; offline or left: 409. Draining twice is harmless."""
        return await _drain(nodes, caller, node_id, True)

    @post("/{node_id:str}/undrain", status_code=200)
    async def undrain_node(self, node_id: str, nodes: NodeService, caller: Caller) -> NodeOut:
        """Resume a drained node (platform): it takes work again. Unknown: 404; offline or
        left: 409."""
        return await _drain(nodes, caller, node_id, False)


async def _drain(nodes: NodeService, caller: Caller, node_id: str, drain: bool) -> NodeOut:
    require_platform(caller)
    try:
        record = await nodes.drain(node_id, drain, actor=caller.actor)
    except NexusError as exc:
        raise problem_for(exc) from None
    node = await nodes.registered(node_id)
    if node is None:  # the registry projection has not seen the node yet
        raise Problem(409, "conflict", f"node {node_id!r} is still registering; retry")
    return NodeOut(**{**_node_out(node, nodes), "status": record.status})
