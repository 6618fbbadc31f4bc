"""A model download task as a pure fold of its stream (`modeltask-<id>`).

    pending --Started--> in_progress --Completed--> completed
       ^                     |  --Failed--> failed --Resumed (reason `node offline`)--> pending
       +---------------------+  --Cancelled--> cancelled

`completed` and `cancelled` are final; `failed` is final except for `node offline`,
which goes back to pending when the node returns (and then resumes from the bytes the
node already has). Progress and speed are telemetry, not events: they are not here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shared.contracts.events import (
    Event,
    ModelDownloadCancelled,
    ModelDownloadCompleted,
    ModelDownloadFailed,
    ModelDownloadRequested,
    ModelDownloadResumed,
    ModelDownloadStarted,
)

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "pending", "in_progress", "completed", "failed", "cancelled")
STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
NODE_OFFLINE = "node offline"
STALLED = "stalled"
DIGEST_MISMATCH = "digest mismatch"
TASK_EVENT_TYPES = frozenset(t.__name__ for t in (
    ModelDownloadRequested, ModelDownloadStarted, ModelDownloadCompleted, ModelDownloadFailed,
    ModelDownloadResumed, ModelDownloadCancelled))


@dataclass(frozen=True)
class DownloadTask:
    task_id: str
    node_id: str
    model: str
    sha256: str
    size_bytes: int
    reason: str
    source: str
    status: str = PENDING
    attempt: int = 0
    resumed_from: int = 0
    bytes_done: int = 0
    fetched_bytes: int = 0
    error: str | None = None
    detail: str = ""
    reconciled: bool = False
    version: int = 0

    @property
    def active(self) -> bool:
        return self.status in (PENDING, IN_PROGRESS)

    @property
    def resumable(self) -> bool:
        return self.status == FAILED and self.error == NODE_OFFLINE


def fold_task(state: DownloadTask | None, event: Event, version: int = 0) -> DownloadTask | None:
    """The task after `event` (events that do not apply leave it as it is)."""
    if isinstance(event, ModelDownloadRequested):
        return DownloadTask(task_id=event.task_id, node_id=event.node_id, model=event.model,
                            sha256=event.sha256, size_bytes=event.size_bytes,
                            reason=event.reason, source=event.source, version=version)
    if state is None:
        return None
    match event:
        case ModelDownloadStarted():
            return replace(state, status=IN_PROGRESS, attempt=event.attempt,
                           resumed_from=event.resumed_from, error=None, detail="",
                           version=version)
        case ModelDownloadCompleted():
            return replace(state, status=COMPLETED, bytes_done=event.bytes_total,
                           fetched_bytes=event.fetched_bytes, reconciled=event.reconciled,
                           error=None, detail="", version=version)
        case ModelDownloadFailed():
            return replace(state, status=FAILED, error=event.reason, detail=event.detail,
                           bytes_done=event.bytes_done or state.bytes_done, version=version)
        case ModelDownloadResumed():
            return replace(state, status=PENDING, version=version)
        case ModelDownloadCancelled():
            return replace(state, status=CANCELLED, version=version)
    return state


# -- decisions (pure): which events a fact leads to ---------------------------------


def decide_started(task: DownloadTask | None, resumed_from: int) -> list[Event]:
    if task is None or task.status != PENDING:
        return []
    return [ModelDownloadStarted(task_id=task.task_id, node_id=task.node_id,
                                 attempt=task.attempt + 1, resumed_from=resumed_from)]


def decide_finished(task: DownloadTask | None, *, ok: bool, reason: str = "", detail: str = "",
                    bytes_done: int = 0, fetched: int = 0, reconciled: bool = False,
                    total: int = 0) -> list[Event]:
    """A completion (or failure) the node reported, or its inventory showed (`total`:
    the size the node found, for a task whose size was unknown: an Ollama pull)."""
    if task is None or task.status in (COMPLETED, CANCELLED):
        return []
    if ok:
        if task.status == FAILED and not reconciled:
            return []  # failed here first (stalled): a late "completed" from the node is
            # reconciled from its inventory instead, with the installed event
        return [ModelDownloadCompleted(task_id=task.task_id, node_id=task.node_id,
                                       bytes_total=task.size_bytes or total,
                                       fetched_bytes=fetched,
                                       reconciled=reconciled)]
    if task.status == FAILED:
        return []
    return [ModelDownloadFailed(task_id=task.task_id, node_id=task.node_id, reason=reason,
                                detail=detail[:500], bytes_done=bytes_done)]


def decide_resume(task: DownloadTask | None) -> list[Event]:
    if task is None or not task.resumable:
        return []
    return [ModelDownloadResumed(task_id=task.task_id, node_id=task.node_id)]


def decide_cancel(task: DownloadTask | None, actor: str) -> list[Event]:
    if task is None or not (task.active or task.resumable):
        return []
    return [ModelDownloadCancelled(task_id=task.task_id, node_id=task.node_id, actor=actor)]
