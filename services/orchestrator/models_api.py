"""`/v1/models/...`, `/v1/nodes/{id}/models...`, `/v1/tasks...`: model distribution.

The fleet is the platform's: every route needs the platform admin key (a tenant key is
a 403). Handlers only translate; `ModelService` decides (services/orchestrator/models.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import msgspec
from litestar import Controller, delete, get, post
from litestar.params import Parameter
from litestar.response import Stream

from services.orchestrator.auth import require_platform
from services.orchestrator.keys import Caller
from services.orchestrator.models import ModelService
from services.orchestrator.schemas import (
    AvailableModel,
    AvailableModels,
    DistributeIn,
    ModelFit,
    NodeModelOut,
    NodeModels,
    PullIn,
    TaskIds,
    TaskList,
    TaskOut,
)
from shared.domain import downloads as dl

_enc = msgspec.json.Encoder()
ModelPath = Annotated[str, Parameter(min_length=1, max_length=128,
                                     pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._:-]*$")]


def task_out(task: dl.DownloadTask, models: ModelService) -> TaskOut:
    p = models.progress.get(task.task_id)
    # an Ollama pull's size is known once Ollama says (its progress, then the completion)
    total = task.size_bytes or (task.bytes_done if task.status == dl.COMPLETED else 0) or \
        (p.total if p else 0)
    done = total if task.status == dl.COMPLETED else (p.bytes_done if p else task.bytes_done)
    if task.status == dl.PENDING and not p:
        done = task.resumed_from
    return TaskOut(task_id=task.task_id, node_id=task.node_id, model=task.model,
                   status=task.status,
                   progress=round(min(done / total, 1.0), 4) if total else
                   (1.0 if task.status == dl.COMPLETED else 0.0),
                   bytes_done=done, total_bytes=total,
                   speed_bps=p.speed_bps if p and task.status == dl.IN_PROGRESS else 0.0,
                   error=task.error, detail=task.detail, attempt=task.attempt,
                   resumed_from=task.resumed_from, fetched_bytes=task.fetched_bytes,
                   reason=task.reason,
                   reconciled=task.reconciled, progress_at=p.wall if p else None)


class ModelsController(Controller):
    path = "/v1/models"

    @get("/available")
    async def available_models(self, caller: Caller, model_service: ModelService) -> AvailableModels:
        """The model store: each model's size, GGUF metadata, the memory it needs and
        whether it fits each online node (and why not)."""
        require_platform(caller)
        out = []
        for stored, need, fits in await model_service.available():
            a = stored.artifact
            out.append(AvailableModel(
                name=a.name, sha256=a.sha256, size_bytes=a.size_bytes, architecture=a.architecture,
                parameters=a.parameters, quantization=a.quantization,
                context_length=a.context_length, memory_needed_bytes=need, source=a.source,
                fit=[ModelFit(node_id=n, fits=why is None, reason=why) for n, why in sorted(fits.items())]))
        return AvailableModels(models=out)

    @post("/distribute", status_code=202)
    async def distribute_model(self, data: DistributeIn, caller: Caller,
                               model_service: ModelService) -> TaskIds:
        """Put a model on `all` online nodes, `specific` ones (`node_ids`) or `auto`
        (every online node it fits). An offline node or one it does not fit: 409 naming
        the node and the reason, and no task is created."""
        require_platform(caller)
        tasks = await model_service.distribute(data.model, data.target, tuple(data.node_ids),
                                               actor=caller.actor)
        return TaskIds(task_ids=[t.task_id for t in tasks],
                       tasks=[task_out(t, model_service) for t in tasks])


class NodeModelsController(Controller):
    path = "/v1/nodes/{node_id:str}/models"

    @get("/")
    async def node_models(self, node_id: str, caller: Caller, model_service: ModelService) -> NodeModels:
        require_platform(caller)
        installed, active = await model_service.node_models(node_id)
        return NodeModels(node_id=node_id, installed=[
            NodeModelOut(name=m.name, sha256=m.sha256, size_bytes=m.size_bytes, loaded=m.loaded)
            for m in installed], downloading=[task_out(t, model_service) for t in active])

    @post("/pull", status_code=202)
    async def pull_model(self, node_id: str, data: PullIn, caller: Caller,
                         model_service: ModelService) -> TaskOut:
        require_platform(caller)
        task = await model_service.pull(node_id, data.model, actor=caller.actor)
        return task_out(task, model_service)

    @delete("/{model:str}", status_code=204)
    async def remove_model(self, node_id: str, model: ModelPath, caller: Caller,
                           model_service: ModelService) -> None:
        require_platform(caller)
        await model_service.remove(node_id, model, caller.actor)


class TasksController(Controller):
    path = "/v1/tasks"

    @get("/")
    async def list_tasks(
        self, caller: Caller, model_service: ModelService,
        status: Literal["pending", "in_progress", "completed", "failed", "cancelled"] | None = None,
        node: Annotated[str | None, Parameter(min_length=1, max_length=64,
                                              pattern=r"^[A-Za-z0-9_-]+$")] = None,
    ) -> TaskList:
        """Download tasks, newest first (the `model_tasks` read model, live progress)."""
        require_platform(caller)
        tasks = await model_service.find_tasks(status=status, node=node)
        return TaskList(tasks=[task_out(t, model_service) for t in tasks])

    @get("/{task_id:str}")
    async def get_task(self, task_id: str, caller: Caller, model_service: ModelService) -> TaskOut:
        require_platform(caller)
        return task_out(model_service.require(task_id), model_service)

    @delete("/{task_id:str}", status_code=204)
    async def cancel_task(self, task_id: str, caller: Caller, model_service: ModelService) -> None:
        """Cancel a pending or running task (a finished one stays as it is)."""
        require_platform(caller)
        await model_service.cancel(task_id, caller.actor)

    @get("/{task_id:str}/stream", media_type="text/event-stream")
    async def stream_task(self, task_id: str, caller: Caller, model_service: ModelService) -> Stream:
        """SSE: the task now, then each change (progress at least once a second while bytes
        move), until it is completed, failed or cancelled. A client that reconnects gets
        the current state at once: nothing is lost by a dropped connection."""
        require_platform(caller)
        model_service.require(task_id)

        async def events() -> AsyncIterator[bytes]:
            last = None
            seq = 0
            while True:
                task = model_service.tasks.get(task_id)
                if task is None:
                    return
                out = task_out(task, model_service)
                if out != last:
                    seq += 1
                    yield b"id: %d\nevent: task\ndata: %s\n\n" % (seq, _enc.encode(out))
                    last = out
                if not (task.active or task.resumable):
                    return
                await asyncio.sleep(0.25)

        return Stream(events(), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache"})
