"""Model distribution: the store's catalogue, placement and fit, download tasks.

Task transitions are events on `modeltask-<id>` (the pure fold and decisions are
`shared.domain.downloads`), appended at the stream's version so that of two
orchestrators noticing the same thing one append wins. Each orchestrator keeps every
task in memory (folded from the events at start, then following them) and the latest
progress per task from the nodes' `ModelProgress` telemetry (never stored).

**Nothing stays stuck** (`_watch`, once a second, in every orchestrator):
- a running task with no progress for `NEXUS_MODEL_STALL_S` fails `stalled` (and the
  node is told to stop);
- a node that goes offline fails its pending and running tasks `node offline`; when it
  is back they are resumed (pending again, pulled again: the node continues from the
  bytes it has);
- every few seconds the node is asked which tasks it runs or queues: a task it has
  forgotten (it restarted before anyone noticed) is sent again;
- a task whose model shows up, with the right SHA-256, in the inventory a heartbeat
  carries is completed from there (its completion message was lost);
- an orchestrator that restarts folds the task events again: nothing lives only in
  its memory but the progress, which the next telemetry message restores.

**Ollama nodes** (a node whose runtime is `kind="ollama"`, `NEXUS_RUNTIME_KIND=ollama`)
get their tasks with `source="ollama"`: they pull through Ollama's own `/api/pull`, not
from the store. The model may then also be one the store does not hold (an Ollama
library name such as `qwen2:0.5b`): its size is unknown until Ollama says, so its fit
cannot be checked beforehand (a model in the store is checked as for any node), and the
task completes when Ollama answers `success` (Ollama verifies its own layers' digests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg

from services.orchestrator.fleet import NodeService
from services.orchestrator.read_models.model_tasks import ModelTasksReadModel
from shared.contracts import subjects
from shared.contracts.errors import NotFound, PlacementRefused
from shared.contracts.events import (
    Event,
    Metadata,
    ModelDownloadCompleted,
    ModelDownloadRequested,
    ModelInstalled,
    ModelRemoved,
    modeltask_stream,
    new_id,
    nodemodels_stream,
)
from shared.contracts.messages import (
    Heartbeat,
    InstalledModel,
    ModelCommand,
    ModelCommandReply,
    ModelProgress,
    ModelTaskAck,
    ModelTaskUpdate,
)
from shared.domain import downloads as dl
from shared.domain.nodes import DRAINING, ONLINE, NodeRecord
from shared.domain.placement import (
    ModelArtifact,
    NodeCapacity,
    estimate_memory,
    fit,
    models_for,
    parse_rules,
)
from shared.infra.eventstore import EventStore, ProjectionRunner, WrongExpectedVersion
from shared.infra.messaging import Bus, HandlerError, MessagingError, stop_listening
from shared.infra.model_store import ModelStore, StoredModel

log = logging.getLogger("nexus.orchestrator.models")


class Progress:
    __slots__ = ("at", "bytes_done", "speed_bps", "total", "wall")

    def __init__(self, bytes_done: int, total: int, speed_bps: float) -> None:
        self.bytes_done, self.total, self.speed_bps = bytes_done, total, speed_bps
        self.at = time.monotonic()
        self.wall = time.time()


class ModelService:
    def __init__(self, store: EventStore, bus: Bus, nodes: NodeService, runner: ProjectionRunner,
                 *, context: int, stall_s: float, placement: str = "", poll_s: float = 1.0) -> None:
        self.store = store
        # read-your-writes for the `model_tasks` and `node_models` read models: a read
        # waits for them to apply what is committed (a runner may coalesce appends)
        self.runner = runner
        self.bus = bus
        self.nodes = nodes
        self.context = context
        self.stall_s = stall_s
        self.rules = parse_rules(placement)
        self.poll_s = poll_s
        self.catalogue = ModelStore(bus.js)
        self.read = ModelTasksReadModel(store)
        self.tasks: dict[str, dl.DownloadTask] = {}
        self.progress: dict[str, Progress] = {}
        self.started_at: dict[str, float] = {}  # task -> when it (re)entered in_progress here
        self.inventory: dict[str, tuple[InstalledModel, ...]] = {}
        self.inventory_at: dict[str, float] = {}  # unix seconds: when the node reported it
        self.gpu_used: dict[str, tuple[int, ...]] = {}  # node -> bytes in use per GPU (heartbeat)
        self.artifacts: dict[str, ModelArtifact] = {}  # the store's, as last read
        self.placed: dict[str, object] = {}
        self._checked: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[object] = []

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        position = 0
        types = sorted(dl.TASK_EVENT_TYPES)
        while batch := await self.store.read_all(position, 5000, types=types):
            for rec in batch:
                self._fold(rec.event, rec.stream_version)
            position = batch[-1].position
        self._tasks.append(asyncio.create_task(self._follow(position, types), name="model-tasks"))
        self._subs.append(await self.bus.subscribe(
            subjects.NODE_MODEL_TASK_ALL, ModelTaskUpdate, self.on_update,
            queue=subjects.QUEUE_ORCHESTRATOR, concurrent=True))
        self._subs.append(await self.bus.subscribe(
            subjects.NODE_MODEL_PROGRESS_ALL, ModelProgress, self.on_progress))
        self.nodes.heartbeat_listeners.append(self.on_heartbeat)
        self._tasks.append(asyncio.create_task(self._watch(), name="model-watch"))

    async def stop(self) -> None:
        await stop_listening(self._tasks, self._subs)

    def _fold(self, event: Event, version: int) -> None:
        current = self.tasks.get(event.task_id)
        if current is not None and version <= current.version:
            return
        task = dl.fold_task(current, event, version)
        if task is None:
            return
        if task.status == dl.IN_PROGRESS and (current is None or current.status != dl.IN_PROGRESS):
            self.started_at[task.task_id] = time.monotonic()
        self.tasks[task.task_id] = task
        self._changed.set()

    async def _follow(self, after: int, types: list[str]) -> None:
        async for rec in self.store.follow(after, poll_s=self.poll_s, types=types):
            self._fold(rec.event, rec.stream_version)

    async def transition(self, task_id: str, decide: Callable[[dl.DownloadTask | None], list[Event]],
                         actor: str = "orchestrator", *,
                         with_events: Callable[[list[Event]], list[tuple[str, list[Event], None]]]
                         | None = None) -> dl.DownloadTask | None:
        """Read the task's stream, decide, append at its version; retry on a race.
        `with_events(events)`: appends to other streams that commit with the decided
        events or not at all (a completion and the node's `ModelInstalled`)."""
        stream = modeltask_stream(task_id)
        for _ in range(5):
            state: dl.DownloadTask | None = None
            for rec in await self.store.read_stream(stream):
                state = dl.fold_task(state, rec.event, rec.stream_version)
            events = decide(state)
            if not events:
                return state
            version = state.version if state else 0
            metadata = Metadata(actor=actor, correlation_id=task_id)
            also = with_events(events) if with_events else []
            try:
                if also:
                    await self.store.append_atomic([(stream, events, version), *also],
                                                   metadata=metadata)
                else:
                    await self.store.append(stream, events, expected_version=version,
                                            metadata=metadata)
            except WrongExpectedVersion:
                continue
            for offset, event in enumerate(events, start=1):
                self._fold(event, version + offset)
            return self.tasks.get(task_id)
        raise RuntimeError(f"task {task_id}: too many concurrent transitions")

    # -- catalogue and fit ------------------------------------------------------------

    def capacity(self, record: NodeRecord) -> NodeCapacity:
        """What placement sees of a node: its memory, what its GPUs hold now (the last
        heartbeat) and the models it has loaded (their estimated memory)."""
        reg = record.registration
        loaded = tuple((m.name, self._estimate(m))
                       for m in self.inventory.get(record.node_id, ()) if m.loaded)
        return NodeCapacity(node_id=record.node_id,
                            gpu_memory=tuple(g.memory_total_bytes for g in reg.gpus),
                            memory_total=reg.memory_total_bytes,
                            online=record.status in (ONLINE, DRAINING),
                            gpu_used=self.gpu_used.get(record.node_id, ()), loaded=loaded)

    def _estimate(self, model: InstalledModel) -> int:
        artifact = self.artifacts.get(model.name)
        if artifact is None or artifact.sha256 != model.sha256:  # not from the store: its size
            artifact = ModelArtifact(name=model.name, sha256=model.sha256,
                                     size_bytes=model.size_bytes)
        return estimate_memory(artifact, self.context)

    @staticmethod
    def is_ollama(record: NodeRecord | None) -> bool:
        return record is not None and record.registration.runtime.kind == "ollama"

    def live_nodes(self) -> list[NodeRecord]:
        return [r for r in self.nodes.records.values() if r.status == ONLINE]

    async def available(self) -> list[tuple[StoredModel, int, dict[str, str | None]]]:
        """Each stored model, the memory it needs, and per online node: None if it fits,
        else why not."""
        out = []
        for stored in await self.catalogue.list():
            self.artifacts[stored.artifact.name] = stored.artifact
            fits = {r.node_id: fit(self.capacity(r), stored.artifact, self.context)
                    for r in self.live_nodes()}
            out.append((stored, estimate_memory(stored.artifact, self.context), fits))
        return out

    async def _artifact(self, model: str, *, ollama_only: bool = False) -> ModelArtifact:
        """The store's record of `model`; for Ollama nodes only, a model the store does
        not hold is pulled by its Ollama name (size unknown: `size_bytes` 0)."""
        stored = await self.catalogue.get(model)
        if stored is None:
            if ollama_only:
                return ModelArtifact(name=model, sha256="", size_bytes=0, source="ollama")
            raise NotFound("model", model)
        self.artifacts[model] = stored.artifact
        return stored.artifact

    def _check_node(self, node_id: str, artifact: ModelArtifact) -> NodeRecord:
        record = self.nodes.records.get(node_id)
        if record is None or record.status == "deregistered":
            raise NotFound("node", node_id)
        if record.status != ONLINE:
            raise PlacementRefused(node_id, "node_offline",
                                   f"node {node_id} is {record.status}: it cannot pull {artifact.name} now")
        if not artifact.sha256:  # an Ollama library model: its size is Ollama's to tell
            if not self.is_ollama(record):
                raise NotFound("model", artifact.name)
            return record
        why = fit(self.capacity(record), artifact, self.context)
        if why is not None:
            raise PlacementRefused(node_id, "does_not_fit", f"node {node_id}: {why}")
        return record

    # -- commands ---------------------------------------------------------------------

    async def pull(self, node_id: str, model: str, *, actor: str, reason: str = "manual") -> dl.DownloadTask:
        artifact = await self._artifact(model, ollama_only=self.is_ollama(self.nodes.records.get(node_id)))
        self._check_node(node_id, artifact)
        return await self._request(node_id, artifact, actor=actor, reason=reason)

    async def distribute(self, model: str, target: str, node_ids: tuple[str, ...], *,
                         actor: str) -> list[dl.DownloadTask]:
        if target == "specific":
            ollama_only = bool(node_ids) and all(
                self.is_ollama(self.nodes.records.get(n)) for n in node_ids)
        else:
            ollama_only = any(self.is_ollama(r) for r in self.live_nodes())
        artifact = await self._artifact(model, ollama_only=ollama_only)
        if target == "specific":  # the listed nodes (none listed: no task)
            chosen = list(dict.fromkeys(node_ids))
            for node_id in chosen:  # all or nothing: refuse before creating any task
                self._check_node(node_id, artifact)
        elif not artifact.sha256:  # not in the store: the Ollama nodes pull it by name
            chosen = [r.node_id for r in sorted(self.live_nodes(), key=lambda r: r.node_id)
                      if self.is_ollama(r)]
        else:
            chosen = [r.node_id for r in sorted(self.live_nodes(), key=lambda r: r.node_id)
                      if target == "all" or fit(self.capacity(r), artifact, self.context) is None]
            if target == "all":
                for node_id in chosen:
                    self._check_node(node_id, artifact)
        return [await self._request(n, artifact, actor=actor, reason=f"distribute:{target}")
                for n in chosen]

    async def _request(self, node_id: str, artifact: ModelArtifact, *, actor: str,
                       reason: str) -> dl.DownloadTask:
        existing = next((t for t in self.tasks.values() if t.node_id == node_id
                         and t.model == artifact.name and t.sha256 == artifact.sha256
                         and (t.active or t.resumable)), None)
        if existing is not None:
            return existing  # already on its way
        task_id = new_id()
        source = "ollama" if self.is_ollama(self.nodes.records.get(node_id)) else "store"
        task = await self.transition(task_id, lambda _s: [ModelDownloadRequested(
            task_id=task_id, node_id=node_id, model=artifact.name, sha256=artifact.sha256,
            size_bytes=artifact.size_bytes, reason=reason, source=source, actor=actor)],
            actor=actor)
        assert task is not None
        await self._send_pull(task)
        return task

    async def _send_pull(self, task: dl.DownloadTask) -> ModelCommandReply | None:
        try:
            return await self.bus.request(
                subjects.node_models(task.node_id),
                ModelCommand(op="pull", task_id=task.task_id, model=task.model, sha256=task.sha256,
                             size_bytes=task.size_bytes, source=task.source),
                ModelCommandReply, timeout=5)
        except MessagingError as exc:  # the watchdog sends it again, or fails it offline
            log.warning("pull not delivered: %s", exc, extra={"task_id": task.task_id})
            return None

    async def _tell(self, node_id: str, command: ModelCommand) -> ModelCommandReply | None:
        with contextlib.suppress(MessagingError):
            return await self.bus.request(subjects.node_models(node_id), command,
                                          ModelCommandReply, timeout=5)
        return None

    async def cancel(self, task_id: str, actor: str) -> dl.DownloadTask:
        if task_id not in self.tasks:
            raise NotFound("task", task_id)
        task = await self.transition(task_id, lambda s: dl.decide_cancel(s, actor), actor=actor)
        assert task is not None
        await self._tell(task.node_id, ModelCommand(op="cancel", task_id=task_id))
        return task

    async def _projected(self, name: str) -> None:
        """Wait until the read model `name` has applied every event committed so far
        (what this process has answered from memory, e.g. a task completed, is there)."""
        await self.runner.wait_for_head((name,))

    async def find_tasks(self, *, status: str | None = None,
                         node: str | None = None) -> list[dl.DownloadTask]:
        """Tasks, newest first (the `model_tasks` read model, once it has applied what is
        committed), each as this process knows it now."""
        await self._projected("model_tasks")
        rows = await self.read.find(status=status, node=node)
        return [self.tasks.get(t.task_id, t) for t, _, _ in rows]

    async def _installed_rows(self, node_id: str) -> list:
        await self._projected("node_models")
        return await self.read.installed(node_id)

    async def remove(self, node_id: str, model: str, actor: str) -> None:
        record = self.nodes.records.get(node_id)
        if record is None or record.status == "deregistered":
            raise NotFound("node", node_id)
        installed = {m.name for m in self.inventory.get(node_id, ())}
        known = {r["model"] for r in await self._installed_rows(node_id)}
        if model not in installed | known:
            raise NotFound("model on node", model)
        if record.status != ONLINE:
            raise PlacementRefused(node_id, "node_offline", f"node {node_id} is {record.status}")
        await self._tell(node_id, ModelCommand(op="remove", model=model))
        await self.store.append(nodemodels_stream(node_id),
                                [ModelRemoved(node_id=node_id, model=model, actor=actor)],
                                expected_version=None, metadata=Metadata(actor=actor))
        self.inventory[node_id] = tuple(m for m in self.inventory.get(node_id, ()) if m.name != model)

    async def node_models(self, node_id: str) -> tuple[list[InstalledModel], list[dl.DownloadTask]]:
        record = self.nodes.records.get(node_id)
        if record is None or record.status == "deregistered":
            raise NotFound("node", node_id)
        # what the node last reported (with what is loaded), and what is recorded installed
        # since (a task completed before its next heartbeat: read-your-writes); a model
        # recorded before the report and missing from it is gone from the node
        installed = list(self.inventory.get(node_id, ()))
        seen = {m.name for m in installed}
        reported_at = self.inventory_at.get(node_id, 0.0)
        installed += [InstalledModel(name=r["model"], sha256=r["sha256"], size_bytes=r["size_bytes"])
                      for r in await self._installed_rows(node_id)
                      if r["model"] not in seen and r["installed_at"].timestamp() > reported_at]
        active = [t for t in self.tasks.values() if t.node_id == node_id and t.active]
        return installed, active

    def require(self, task_id: str) -> dl.DownloadTask:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound("task", task_id)
        return task

    # -- node messages ----------------------------------------------------------------

    async def on_update(self, update: ModelTaskUpdate, msg: Msg) -> ModelTaskAck:
        if subjects.node_id_from_subject(msg.subject) != update.node_id:
            raise HandlerError("Forbidden", "a node speaks only for itself")
        task = self.tasks.get(update.task_id)
        if task is None or task.node_id != update.node_id:
            return ModelTaskAck(known=False)
        if update.state == "started":
            self.progress[task.task_id] = Progress(update.bytes_done, update.total_bytes, 0.0)
            task = await self.transition(task.task_id, lambda s: dl.decide_started(s, update.resumed_from),
                                         actor=f"node:{update.node_id}")
        elif update.state == "completed":
            self.progress[task.task_id] = Progress(update.total_bytes, update.total_bytes, 0.0)
            task = await self._complete(task, fetched=update.fetched_bytes, reconciled=False,
                                        total=update.total_bytes)
        else:
            task = await self.transition(task.task_id, lambda s: dl.decide_finished(
                s, ok=False, reason=update.reason or "error", detail=update.detail,
                bytes_done=update.bytes_done), actor=f"node:{update.node_id}")
        return ModelTaskAck(known=True, status=task.status if task else "")

    async def _complete(self, task: dl.DownloadTask, *, fetched: int, reconciled: bool,
                        total: int = 0, sha256: str = "") -> dl.DownloadTask | None:
        """Complete the task; the model is installed on its node in the same commit (so
        whoever sees the task completed finds the model there: a remove right after)."""
        def installed(events: list[Event]) -> list[tuple[str, list[Event], None]]:
            return [(nodemodels_stream(task.node_id), [ModelInstalled(
                node_id=task.node_id, model=task.model, sha256=task.sha256 or sha256,
                size_bytes=e.bytes_total or task.size_bytes, task_id=task.task_id)], None)
                for e in events if isinstance(e, ModelDownloadCompleted)]

        return await self.transition(task.task_id, lambda s: dl.decide_finished(
            s, ok=True, fetched=fetched, reconciled=reconciled, total=total),
            actor=f"node:{task.node_id}", with_events=installed)

    async def on_progress(self, p: ModelProgress, msg: Msg) -> None:
        if subjects.node_id_from_subject(msg.subject) != p.node_id:
            return
        task = self.tasks.get(p.task_id)
        if task is not None and task.node_id == p.node_id:
            self.progress[p.task_id] = Progress(p.bytes_done, p.total_bytes, p.speed_bps)
            self._changed.set()

    def on_heartbeat(self, hb: Heartbeat) -> None:
        self.inventory[hb.node_id] = hb.models
        self.inventory_at[hb.node_id] = hb.sent_at
        self.gpu_used[hb.node_id] = tuple(g.memory_used_bytes
                                          for g in sorted(hb.gpus, key=lambda g: g.index))

    # -- never stuck ------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            try:
                await self.check()
            except Exception:
                log.exception("model task watch failed")

    async def check(self) -> None:
        now = time.monotonic()
        for task in list(self.tasks.values()):
            record = self.nodes.records.get(task.node_id)
            online = record is not None and record.status in (ONLINE, DRAINING)
            held = {m.name: m for m in self.inventory.get(task.node_id, ())}
            mine = held.get(task.model)
            if task.source == "ollama" and mine is None:  # Ollama says `name`, not `name:latest`
                mine = held.get(task.model.removesuffix(":latest"))
            matches = mine is not None and (task.source == "ollama" or mine.sha256 == task.sha256)
            if (task.active or task.resumable or task.error == dl.STALLED) and \
                    matches and task.status != dl.CANCELLED:
                assert mine is not None
                await self._complete(task, fetched=0, reconciled=True,  # lost completion
                                     total=mine.size_bytes, sha256=mine.sha256)
            elif task.active and not online:
                detail = f"node {task.node_id} went {record.status if record else 'away'}"
                await self.transition(task.task_id, lambda s, d=detail: dl.decide_finished(
                    s, ok=False, reason=dl.NODE_OFFLINE, detail=d))
            elif task.resumable and record is not None and record.status == ONLINE:
                resumed = await self.transition(task.task_id, dl.decide_resume)
                if resumed is not None and resumed.status == dl.PENDING:
                    await self._send_pull(resumed)
            elif task.status == dl.IN_PROGRESS:
                seen = self.progress.get(task.task_id)
                last = max(seen.at if seen else 0.0, self.started_at.get(task.task_id, now))
                load = self.nodes.view.nodes.get(task.node_id)
                silent = load is not None and load.last_heartbeat is not None and \
                    now - load.last_heartbeat > self.stall_s / 2
                if now - last > self.stall_s and not silent:  # a silent node: `node offline`
                    done = seen.bytes_done if seen else 0
                    await self.transition(task.task_id, lambda s, b=done: dl.decide_finished(
                        s, ok=False, reason=dl.STALLED,
                        detail=f"no progress for {self.stall_s:g}s", bytes_done=b))
                    await self._tell(task.node_id, ModelCommand(op="cancel", task_id=task.task_id))
        await self._recheck_nodes(now)
        await self._place()

    async def _recheck_nodes(self, now: float) -> None:
        """Ask each node with active tasks what it runs; send again what it forgot."""
        by_node: dict[str, list[dl.DownloadTask]] = {}
        for task in self.tasks.values():
            if task.active:
                by_node.setdefault(task.node_id, []).append(task)
        for node_id, tasks in by_node.items():
            if now - self._checked.get(node_id, 0.0) < 3.0:
                continue
            self._checked[node_id] = now
            record = self.nodes.records.get(node_id)
            if record is None or record.status != ONLINE:
                continue
            reply = await self._tell(node_id, ModelCommand(op="inventory"))
            if reply is None:
                continue
            self.inventory[node_id] = reply.installed
            self.inventory_at[node_id] = time.time()
            known = set(reply.running) | set(reply.queued)
            for task in tasks:
                fresh = self.tasks.get(task.task_id)
                if fresh is not None and fresh.active and fresh.task_id not in known and \
                        now - self.started_at.get(fresh.task_id, 0.0) > 2.0:
                    await self._send_pull(fresh)

    async def _place(self) -> None:
        """Placement rules on registration and hardware changes."""
        if not self.rules:
            return
        for record in self.live_nodes():
            signature = (record.registration.gpus, record.registration.memory_total_bytes)
            if self.placed.get(record.node_id) == signature:
                continue
            self.placed[record.node_id] = signature
            for model in models_for(self.capacity(record), self.rules):
                stored = await self.catalogue.get(model)
                if stored is None:  # not imported yet: try again on the next round
                    self.placed.pop(record.node_id, None)
                    continue
                why = fit(self.capacity(record), stored.artifact, self.context)
                if why is not None:
                    log.warning("placement skipped: %s", why, extra={"node_id": record.node_id})
                    continue
                if any(m.name == model and m.sha256 == stored.artifact.sha256
                       for m in self.inventory.get(record.node_id, ())):
                    continue
                await self._request(record.node_id, stored.artifact, actor="placement",
                                    reason="placement")

    async def wait_changed(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
