"""The `model_tasks` read model (download tasks, the pure `fold_task` applied to rows)
and the `node_models` read model (what each node has installed)."""

from __future__ import annotations

import dataclasses

import asyncpg

from shared.contracts.events import ModelInstalled, ModelRemoved, RecordedEvent
from shared.domain.downloads import TASK_EVENT_TYPES, DownloadTask, fold_task
from shared.infra.eventstore import EventStore, Projection

_FIELDS = [f.name for f in dataclasses.fields(DownloadTask)]
_COLUMNS = ", ".join(_FIELDS)


def _task(row: asyncpg.Record | None) -> DownloadTask | None:
    return DownloadTask(**{k: row[k] for k in _FIELDS}) if row else None


class ModelTasksProjection(Projection):
    name = "model_tasks"
    handles = TASK_EVENT_TYPES
    tables = ("model_tasks",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        task_id = rec.event.task_id
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM model_tasks WHERE task_id = $1", task_id)
        task = fold_task(_task(row), rec.event, rec.stream_version)
        if task is None:
            return
        values = [getattr(task, k) for k in _FIELDS]
        updates = ", ".join(f"{k} = EXCLUDED.{k}" for k in _FIELDS if k != "task_id")
        marks = ", ".join(f"${i}" for i in range(1, len(_FIELDS) + 1))
        n = len(_FIELDS)
        await conn.execute(
            f"INSERT INTO model_tasks ({_COLUMNS}, created_at, updated_at)"
            f" VALUES ({marks}, ${n + 1}, ${n + 1})"
            f" ON CONFLICT (task_id) DO UPDATE SET {updates}, updated_at = EXCLUDED.updated_at",
            *values, rec.recorded_at)


class NodeModelsProjection(Projection):
    name = "node_models"
    handles = frozenset({"ModelInstalled", "ModelRemoved"})
    tables = ("node_models",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        e = rec.event
        if isinstance(e, ModelInstalled):
            await conn.execute(
                "INSERT INTO node_models (node_id, model, sha256, size_bytes, installed_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (node_id, model) DO UPDATE SET"
                " sha256 = EXCLUDED.sha256, size_bytes = EXCLUDED.size_bytes,"
                " installed_at = EXCLUDED.installed_at",
                e.node_id, e.model, e.sha256, e.size_bytes, rec.recorded_at)
        elif isinstance(e, ModelRemoved):
            await conn.execute("DELETE FROM node_models WHERE node_id = $1 AND model = $2",
                               e.node_id, e.model)


class ModelTasksReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    async def get(self, task_id: str) -> tuple[DownloadTask, object, object] | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS}, created_at, updated_at FROM model_tasks WHERE task_id = $1",
            task_id)
        return (_task(row), row["created_at"], row["updated_at"]) if row else None

    async def find(self, *, status: str | None = None, node: str | None = None,
                   limit: int = 200) -> list[tuple[DownloadTask, object, object]]:
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS}, created_at, updated_at FROM model_tasks"
            " WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR node_id = $2)"
            " ORDER BY created_at DESC, task_id LIMIT $3", status, node, limit)
        return [(_task(r), r["created_at"], r["updated_at"]) for r in rows]

    async def installed(self, node_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT model, sha256, size_bytes, installed_at FROM node_models WHERE node_id = $1"
            " ORDER BY model", node_id)
