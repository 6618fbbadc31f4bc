"""Stopping background tasks: cancel, wait a bounded time, cancel again if need be."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("nexus.tasks")

FIRST_CANCEL_WAIT_S = 1.0  # a cancelled task's own cleanup gets this long before it is cancelled again


async def stop_tasks(tasks: list[asyncio.Task | None], timeout_s: float = 5.0) -> list[asyncio.Task]:
    """Cancel `tasks` and wait for them, at most `timeout_s`; return (and log) any still running.

    One cancel is not always enough: on Python 3.11 `asyncio.wait_for` (which nats-py's
    `request` awaits) returns the reply instead of raising when the reply arrives in the
    same loop iteration as the cancel (CPython gh-86296), and the task carries on. A task
    still running after a while is therefore cancelled again until it stops."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {t for t in tasks if t is not None and not t.done()}
    wait_s = FIRST_CANCEL_WAIT_S
    while pending and (left := deadline - loop.time()) > 0:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(wait_s, left))
        wait_s = 0.1
    for task in tasks:
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: a task that failed earlier was already logged
    if pending:
        log.warning("tasks did not stop", extra={"tasks": sorted(t.get_name() for t in pending)})
    return list(pending)
