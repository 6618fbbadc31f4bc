"""What each dashboard page shows, gathered from the use cases and read models the API
uses (no SQL here). Each function returns a plain dict for its template."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import msgspec
from litestar.datastructures import State

from shared.domain import downloads as dl
from shared.domain.dashboard import sparkline
from shared.domain.nodes import NodeLoad
from services.orchestrator.keys import Caller
from services.orchestrator.read_models.runs import RunsReadModel
from services.orchestrator.ui.live import LiveHub

GIB = 1024 ** 3


def pct(value: float | None) -> float | None:
    return None if value is None else round(max(0.0, min(100.0, value)), 1)


def usd(micro: int) -> str:
    return f"${micro / 1_000_000:,.4f}"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


async def overview(state: State, hub: LiveHub, viewer: Caller) -> dict[str, Any]:
    tenant = None if viewer.role == "platform" else viewer.tenant
    statuses = [r.status for r in state.nodes.records.values() if r.status != "deregistered"]
    runs = RunsReadModel(state.runtime.store)
    counts = await (runs.count_all_by_status() if tenant is None else runs.count_by_status(tenant))
    today = hub.usage.today(tenant, datetime.now(timezone.utc))
    lag = max(state.runner.lag_s.values(), default=0.0)
    downloads = (sum(1 for t in state.models.tasks.values() if t.active)
                 if viewer.role == "platform" else None)
    return dict(
        nodes_online=statuses.count("online"),
        nodes_offline=sum(1 for s in statuses if s != "online"),
        calls_per_s=round(hub.usage.calls_per_s(tenant, time.time()), 2),
        calls_today=today.calls, tokens_today=today.tokens, spend_today=usd(today.cost_micro_usd),
        runs_active=counts.get("running", 0), runs_waiting=counts.get("awaiting_approval", 0),
        downloads=downloads, projection_lag_ms=round(lag * 1000),
    )


def _load(node: NodeLoad | None, fresh_within_s: float) -> dict[str, Any]:
    if node is None or not node.fresh(time.monotonic(), fresh_within_s):
        return dict(fresh=False)
    used, total = node.gpu_memory_used_bytes, node.gpu_memory_total_bytes
    return dict(fresh=True, cpu=pct(node.cpu_pct), memory=pct(node.memory_pct),
                gpu=pct(node.gpu_util_pct),
                gpu_memory=pct(used / total * 100) if used is not None and total else None,
                gpu_memory_text=f"{size(used)} / {size(total)}" if total else "",
                active=node.active_requests + node.dispatched, queue=node.queue_depth)


async def nodes(state: State, hub: LiveHub) -> list[dict[str, Any]]:
    service = state.nodes
    out = []
    for node in await service.find():
        if node.node_id not in hub.loads:
            hub.seed_load(node.node_id, await service.history(node.node_id, limit=60))
        points = [cpu for _, cpu in hub.loads.get(node.node_id, ())]
        installed = [m.name for m in state.models.inventory.get(node.node_id, ())]
        out.append(dict(
            node_id=node.node_id, hostname=node.registration.hostname, status=node.status,
            runtime=node.registration.runtime.state, models=installed,
            load=_load(service.view.nodes.get(node.node_id), service.offline_after_s),
            spark=sparkline(points), spark_last=points[-1] if points else None))
    return out


_CATALOGUE: dict[str, Any] = {"at": 0.0, "models": []}


async def _catalogue(state: State) -> list[dict[str, Any]]:
    """The model store's listing, re-read at most every 5 s (a live page asks often)."""
    if time.monotonic() - _CATALOGUE["at"] > 5:
        _CATALOGUE["models"] = [
            dict(name=s.artifact.name, size=size(s.artifact.size_bytes), need=size(need))
            for s, need, _ in await state.models.available()]
        _CATALOGUE["at"] = time.monotonic()
    return _CATALOGUE["models"]


def forget_catalogue() -> None:
    _CATALOGUE["at"] = 0.0


async def models(state: State) -> dict[str, Any]:
    """The node x model matrix, and the tasks (newest first)."""
    service = state.models
    catalogue = await _catalogue(state)
    names = [m["name"] for m in catalogue]
    latest: dict[tuple[str, str], dl.DownloadTask] = {}
    for task in service.tasks.values():  # in event order: the newest task per (node, model)
        latest[(task.node_id, task.model)] = task
    rows = []
    records = [r for r in state.nodes.records.values() if r.status != "deregistered"]
    for record in sorted(records, key=lambda r: r.node_id):
        inventory = {m.name: m for m in service.inventory.get(record.node_id, ())}
        cells = []
        for name in names + sorted({m for (n, m) in latest if n == record.node_id} - set(names)):
            task = latest.get((record.node_id, name))
            cell: dict[str, Any] = dict(model=name, state="absent")
            if task is not None and task.active:
                p = service.progress.get(task.task_id)
                done = p.bytes_done if p else task.bytes_done
                cell.update(state="downloading", task_id=task.task_id,
                            progress=round(100 * done / task.size_bytes) if task.size_bytes else 0,
                            speed=size(int(p.speed_bps)) + "/s" if p else "")
            elif name in inventory:
                cell.update(state="loaded" if inventory[name].loaded else "installed")
            elif task is not None and task.status == dl.COMPLETED:
                cell.update(state="installed")
            elif task is not None and task.status == dl.FAILED:
                cell.update(state="failed", reason=task.error or task.detail or "failed")
            cells.append(cell)
        rows.append(dict(node_id=record.node_id, hostname=record.registration.hostname,
                         status=record.status, cells=cells))
    columns = names + sorted({m for (_, m) in latest} - set(names))
    tasks = list(reversed(service.tasks.values()))[:30]
    return dict(columns=columns, rows=rows, catalogue=catalogue, tasks=[
        dict(task_id=t.task_id, node_id=t.node_id, model=t.model, status=t.status,
             active=t.active, error=t.error or "") for t in tasks])


def visible(rec, viewer: Caller) -> bool:
    return viewer.role == "platform" or rec.metadata.tenant == viewer.tenant


def matches(rec, stream: str, type_: str, trace_id: str) -> bool:
    return ((not stream or rec.stream_id.startswith(stream))
            and (not type_ or rec.type == type_)
            and (not trace_id or rec.metadata.trace_id == trace_id))


def trace_link(grafana_url: str, datasource: str, trace_id: str | None) -> str | None:
    if not grafana_url or not trace_id:
        return None
    pane = {"a": {"datasource": datasource, "queries": [
        {"refId": "A", "datasource": {"type": "tempo", "uid": datasource},
         "queryType": "traceql", "query": trace_id}]}}
    return (f"{grafana_url.rstrip('/')}/explore?schemaVersion=1&panes="
            f"{quote(json.dumps(pane, separators=(',', ':')))}")


def event_row(rec, settings) -> dict[str, Any]:
    data = json.dumps(msgspec.to_builtins(rec.event), separators=(", ", ": "))
    return dict(position=rec.position, at=rec.recorded_at.strftime("%H:%M:%S.%f")[:-3],
                stream=rec.stream_id, type=rec.type, tenant=rec.metadata.tenant or "",
                trace_id=rec.metadata.trace_id or "",
                trace_url=trace_link(settings.grafana_url, settings.grafana_tempo_datasource,
                                     rec.metadata.trace_id),
                data=data if len(data) <= 400 else data[:400] + "...")
