"""Joint appends: one use case's events recorded in the transaction of another's.

An agent run records the outcome of its LLM call (`RunModelAnswered`) and of a tool call
(`RunToolResult`), with what follows from it, in the transaction in which the call path
records the call's own end (its settle; the tool path's `ToolCallFinished`/`Failed`), so
a step costs no transaction of the run's own:

    class Rider(Protocol):
        async def appends(self, outcome) -> list[Append]  # may take a lock ...
        async def recorded(self, ok: bool) -> None        # ... always called, releases it

    await append_joint(store, own, metadata, rider, outcome)

`own` (the call's events) and the rider's appends commit together. A rider's append that
is refused (its stream moved on: a run's fencing, a cancel) never costs the call its own
record: `own` is then appended alone and the rider told `recorded(False)`, so the call's
end is recorded exactly once either way, and the run records the outcome itself (or, a
stale owner, stops; the new owner finds the call's end on the call's own stream).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from shared.contracts.events import Event, Metadata
from shared.infra.eventstore import AppendResult, EventStore, WrongExpectedVersion

log = logging.getLogger("nexus.orchestrator.joint")

Append = tuple[str, list[Event], int | None]


class Rider(Protocol):
    async def appends(self, outcome: Any) -> list[Append]: ...

    async def recorded(self, ok: bool) -> None: ...


async def append_own(store: EventStore, own: list[Append],
                     metadata: Metadata) -> list[AppendResult]:
    """`own` appended (atomically); the result of each of its appends, in order."""
    if len(own) == 1:  # a lone stream: the group commit's shared flush
        stream, events, expected = own[0]
        return [await store.append(stream, events, expected_version=expected, metadata=metadata)]
    if own:
        return await store.append_atomic(own, metadata)
    return []


async def append_joint(store: EventStore, own: list[Append], metadata: Metadata,
                       rider: Rider | None, outcome: Any) -> list[AppendResult]:
    """Append `own` with `rider`'s appends for `outcome`, atomically; `own` alone when the
    rider's are refused or cannot be built. Raises only what appending `own` raises.
    The results of `own`'s appends, in order."""
    if rider is None:
        return await append_own(store, own, metadata)
    ok = False
    try:
        try:
            extra = await rider.appends(outcome)
        except Exception:
            log.exception("a joint append's rider failed; appending the call's events alone")
            extra = []
        if not extra:
            return await append_own(store, own, metadata)
        try:
            results = await store.append_atomic([*own, *extra], metadata)
            ok = True
            return results[:len(own)]
        except WrongExpectedVersion as exc:
            if exc.stream_id in {stream for stream, _, _ in own}:
                raise
            return await append_own(store, own, metadata)  # the rider's stream moved on
    finally:
        await rider.recorded(ok)
