"""The dashboard's live feed: one follower of the event store per orchestrator process,
fanned out to every open page, plus the nodes' heartbeats (NATS telemetry).

`LiveHub` follows the event log (LISTEN/NOTIFY-woken, `EventStore.follow`) once, keeps
the last events for the Events page, folds the usage figures (`shared.domain.dashboard`)
and each node's recent load (from `NodeService.heartbeat_listeners`), and wakes the SSE
streams of open pages (`changed`). Subscribers get bounded queues: a slow browser loses
its own tail rows (and is told), never stalls the hub or another tenant's page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import datetime, timezone

from shared.contracts.events import LLMCallCompleted, RecordedEvent
from shared.contracts.messages import Heartbeat
from shared.domain.dashboard import Usage, start_of_day
from shared.infra.eventstore import EventStore

log = logging.getLogger("nexus.orchestrator.ui")

TAIL = 200        # events kept for a newly opened Events page
LOAD_POINTS = 60  # heartbeats kept per node for its sparkline
QUEUE = 256       # rows a subscriber may be behind before it is dropped


class Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[RecordedEvent] = asyncio.Queue(QUEUE)
        self.lagged = False


class LiveHub:
    def __init__(self, store: EventStore, *, poll_s: float = 1.0) -> None:
        self.store = store
        self.poll_s = poll_s
        self.usage = Usage()
        self.tail: deque[RecordedEvent] = deque(maxlen=TAIL)
        self.loads: dict[str, deque[tuple[float, float | None]]] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle: started by the first page that needs it ------------------------------

    async def ensure_started(self) -> None:
        if self._task is not None:
            return
        async with self._lock:
            if self._task is not None:
                return
            head = await self.store.head()
            position = await self.store.position_at(start_of_day(datetime.now(timezone.utc)))
            while position < head and (batch := await self.store.read_all(
                    position, 5000, types=[LLMCallCompleted.__name__])):
                for rec in batch:
                    if rec.position <= head:
                        self.usage.apply(rec)
                position = batch[-1].position
            for rec in await self.store.read_all(max(0, head - TAIL), TAIL):
                self.tail.append(rec)
            self._task = asyncio.create_task(self._follow(head), name="ui-live")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, after: int) -> None:
        while True:
            try:
                async for rec in self.store.follow(after, poll_s=self.poll_s):
                    after = rec.position
                    self._on_event(rec)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database went away: keep the pages, retry
                log.exception("ui live feed interrupted; retrying")
                await asyncio.sleep(1)

    def _on_event(self, rec: RecordedEvent) -> None:
        self.tail.append(rec)
        self.usage.apply(rec)
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(rec)
            except asyncio.QueueFull:
                sub.lagged = True
        self.poke()

    # -- telemetry ------------------------------------------------------------------------

    def on_heartbeat(self, hb: Heartbeat) -> None:
        points = self.loads.setdefault(hb.node_id, deque(maxlen=LOAD_POINTS))
        points.append((time.time(), hb.cpu_pct))
        self.poke()

    def seed_load(self, node_id: str, history: list[Heartbeat]) -> None:
        if node_id not in self.loads:
            self.loads[node_id] = deque(((h.sent_at, h.cpu_pct) for h in history[-LOAD_POINTS:]),
                                        maxlen=LOAD_POINTS)

    # -- waking pages ---------------------------------------------------------------------

    def poke(self) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self, seen: int, timeout: float) -> int:
        """Return the version once it moved past `seen` (or after `timeout`)."""
        if self.version == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.version

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
