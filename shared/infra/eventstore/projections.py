"""Projections: read models folded from the event log, exactly once.

A `Projection` declares its name, the event types it handles, the tables it owns and
an `apply(conn, event)` that updates them. The `ProjectionRunner` feeds it events in
global order in batches; each batch runs in one transaction that

1. locks the projection's checkpoint row (`SELECT ... FOR UPDATE`),
2. reads the events after the checkpoint,
3. applies them and moves the checkpoint,

so the read model and its checkpoint commit together: a crash anywhere rolls both
back, and a restart resumes at the first unapplied event. The row lock makes several
runner processes (several orchestrators) safe: they take turns, none applies an
event twice. Because commit order equals position order (see store.py), skipping
ahead to the store's head when no handled event lies in between is safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import asyncpg
from opentelemetry.instrumentation.utils import suppress_instrumentation

from shared.contracts.events import RecordedEvent
from shared.infra.eventstore.store import EventStore, Notifier

log = logging.getLogger("nexus.projections")

RUNNER_WAIT_S = 0.25
"""How long `wait_for` leaves the work to the running runner before stepping itself."""


class Projection:
    """Base class: subclass, set `name`, `handles`, `tables`, implement `apply`."""

    name: str = ""
    handles: frozenset[str] | None = None  # event type names; None = every event
    tables: tuple[str, ...] = ()

    async def apply(self, conn: asyncpg.Connection, event: RecordedEvent) -> None:
        raise NotImplementedError

    async def apply_batch(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """Apply `events` (the step's events this projection handles, in position order).

        By default one `apply` each; a projection may write several events with fewer
        statements here, leaving its tables exactly as the loop would (a call's events
        reach the busiest projections together: issue 16)."""
        for event in events:
            await self.apply(conn, event)

    async def reset(self, conn: asyncpg.Connection) -> None:
        """Empty the read model (rebuild starts from here)."""
        if self.tables:
            await conn.execute(f"TRUNCATE {', '.join(self.tables)}")


class ProjectionRunner:
    def __init__(self, store: EventStore, projections: Sequence[Projection], *,
                 batch_size: int = 500, poll_s: float = 1.0, coalesce_s: float = 0.0) -> None:
        names = [p.name for p in projections]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"projection names must be unique and non-empty: {names}")
        self.store = store
        self.projections = {p.name: p for p in projections}
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.lag_s: dict[str, float] = {}  # append-to-applied lag of the last event applied
        self._registered: set[str] = set()  # projections whose checkpoint row exists
        # what this process's running runner knows each checkpoint reached (committed),
        # and an event set after each of its steps: `wait_for` waits on these
        self._reached: dict[str, int] = {}
        self._progress = asyncio.Event()
        self._running = False
        self.runner_wait_s = RUNNER_WAIT_S
        # after a wake-up, appends of the next `coalesce_s` are applied in the same step
        # (fewer, larger steps), unless a request waits for them (`wait_for` pokes)
        self.coalesce_s = coalesce_s
        self._waiting = 0
        self._poke = asyncio.Event()
        self._concerned_by: dict[frozenset[str], list[Projection]] = {}

    @property
    def pool(self) -> asyncpg.Pool:
        return self.store.pool

    async def checkpoint(self, name: str) -> int:
        return await self.pool.fetchval(
            "SELECT coalesce((SELECT position FROM projection_checkpoints WHERE name = $1), 0)", name
        )

    async def step(self, projection: Projection) -> int:
        """Apply one batch in one transaction; returns how many events were applied.

        A projection with nothing to do (no handled event after its checkpoint) costs one
        indexed read and no transaction: its checkpoint moves only when it is stepped
        (to the head it read up to), and the next look starts from there using the type
        index.
        """
        if not await self._has_work(projection):
            return 0
        return await self._step_in_transaction([projection])

    async def pending(self, name: str) -> int:
        """How many events this projection handles that it has not applied yet."""
        projection = self.projections[name]
        types = sorted(projection.handles) if projection.handles is not None else None
        return await self.pool.fetchval(
            "SELECT count(*) FROM events WHERE ($2::text[] IS NULL OR type = ANY($2::text[]))"
            " AND position > coalesce((SELECT position FROM projection_checkpoints"
            " WHERE name = $1), 0)", name, types)

    async def _has_work(self, projection: Projection) -> bool:
        return bool(await self._with_work([projection]))

    async def _with_work(self, projections: Sequence[Projection]) -> list[Projection]:
        """The projections with work (a handled event after the checkpoint), asked in one
        query for all: the newest position of each type handled (one backward probe of the
        type index each), the head, and the checkpoints. Its cost does not grow with the
        events since a checkpoint (an idle projection's stays behind: an `EXISTS` over the
        events after it scanned them all); the poll pass asked one such query per
        projection (issue 16)."""
        types = sorted(set().union(*(p.handles for p in projections if p.handles is not None)))
        rows = await self.pool.fetch(
            "SELECT 't' AS kind, t.name, (SELECT max(e.position) FROM events AS e"
            " WHERE e.type = t.name) AS position FROM unnest($1::text[]) AS t(name)"
            " UNION ALL SELECT 'c', name, position FROM projection_checkpoints"
            " WHERE name = ANY($2::text[])"
            " UNION ALL SELECT 'h', '', (SELECT max(position) FROM events)",
            types, [p.name for p in projections])
        newest = {r["name"]: r["position"] or 0 for r in rows if r["kind"] == "t"}
        checkpoints = {r["name"]: r["position"] for r in rows if r["kind"] == "c"}
        head = next((r["position"] or 0 for r in rows if r["kind"] == "h"), 0)
        return [p for p in projections
                if (head if p.handles is None else max((newest[t] for t in p.handles), default=0))
                > checkpoints.get(p.name, 0)]

    async def step_group(self, projections: Sequence[Projection]) -> int:
        """One batch for one or several projections in one transaction; returns how many
        events were read (a full batch: call again).

        For a wake-up that names the types appended: the projections handling them have
        work, so no "any work?" query is asked, and their rows are locked (in name
        order, as every runner does), the events of all their types read once, each
        event applied to every projection of the group that handles it and has not
        applied it yet, and their checkpoints moved in one statement. A failure rolls
        the whole group back; each projection is then stepped alone, so one projection's
        bad event never holds up the others."""
        if not projections:
            return 0
        try:
            return await self._step_in_transaction(sorted(projections, key=lambda p: p.name))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            raise
        except Exception:
            log.warning("a grouped projection step failed; stepping each alone", exc_info=True)
            read, failure = 0, None
            for projection in projections:
                try:
                    read = max(read, await self.step(projection))
                except Exception as exc:  # the others still go on; the failure is raised after
                    failure = failure or exc
            if failure is not None:
                raise failure
            return read

    async def _step_in_transaction(self, group: list[Projection]) -> int:
        """`_step_group` in a transaction of its own; once committed, wakes `wait_for`s."""
        reached: dict[str, int] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            read = await self._step_group(conn, group, reached)
        self._advance(reached)
        return read

    def _advance(self, reached: dict[str, int]) -> None:
        """Checkpoints known to have reached these positions: wake `wait_for`s."""
        for name, position in reached.items():
            if position > self._reached.get(name, 0):
                self._reached[name] = position
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _step_group(self, conn: asyncpg.Connection, group: list[Projection],
                          reached: dict[str, int]) -> int:
        """One batch for `group` (sorted by name) in the caller's transaction: how many
        events were read; `reached` gets each checkpoint as locked or moved."""
        names = [p.name for p in group]
        if not self._registered.issuperset(names):
            await conn.execute(
                "INSERT INTO projection_checkpoints (name) SELECT unnest($1::text[])"
                " ON CONFLICT (name) DO NOTHING", names)
        # the locks (in name order) and the head in one round trip. The head may be older
        # than the locks (taken before a wait for them), never newer than what `read_all`
        # sees next: every position up to it had committed, so no checkpoint passes an
        # event left unread; a stale head only means less progress this step
        rows = await conn.fetch(
            "SELECT name, position, (SELECT coalesce(max(position), 0) FROM events) AS head"
            " FROM projection_checkpoints WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE",
            names)
        if len(rows) < len(names):  # rows went (a test emptied the table): register again
            self._registered.difference_update(names)
            return await self._step_group(conn, group, reached)
        self._registered.update(names)
        positions = {r["name"]: r["position"] for r in rows}
        head = rows[0]["head"]
        start = min(positions.values())
        reached.update(positions)
        if head <= start:
            return 0
        types: set[str] | None = set()
        for projection in group:
            if projection.handles is None or types is None:
                types = None
            else:
                types |= projection.handles
        events = await self.store.read_all(start, self.batch_size,
                                           types=sorted(types) if types is not None else None,
                                           conn=conn)
        events = [e for e in events if e.position <= head]
        # each projection gets its own events of the batch at once, in position order
        # (projections own disjoint tables: the order between projections is free)
        applied: dict[str, RecordedEvent] = {}
        for projection in group:
            after, handles = positions[projection.name], projection.handles
            mine = [e for e in events
                    if e.position > after and (handles is None or e.type in handles)]
            if mine:
                await projection.apply_batch(conn, mine)
                applied[projection.name] = mine[-1]
        full = len(events) == self.batch_size
        new_position = events[-1].position if full else head
        moved = [n for n in names if positions[n] < new_position]
        if moved:  # every projection of the group has read (and applied) up to here
            await conn.execute(
                "UPDATE projection_checkpoints AS c SET position = $2, updated_at = now()"
                " FROM unnest($1::text[]) AS n(name) WHERE c.name = n.name", moved, new_position)
            reached.update(dict.fromkeys(moved, new_position))
        now = time.time()
        for name, event in applied.items():
            self.lag_s[name] = now - event.recorded_at.timestamp()
        return len(events)

    async def catch_up(self, name: str | None = None) -> None:
        """Apply everything committed so far (to one projection, or all)."""
        targets = [self.projections[name]] if name else list(self.projections.values())
        for projection in targets:
            while await self.step(projection) >= self.batch_size:
                pass

    async def wait_for(self, position: int, timeout: float = 5.0,
                       names: tuple[str, ...] | None = None) -> None:
        """Return once the projections (all, or `names`) have applied everything up to
        `position` that concerns them (read-your-writes)."""
        deadline = time.monotonic() + timeout
        for projection in [self.projections[n] for n in names] if names else self.projections.values():
            while await self._pending_until(projection, position):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"projection {projection.name!r} did not reach {position}")
                # the running runner is woken by the append's notification and applies it
                # for every waiter at once; step here only when it does not come soon (it
                # is not running, or busy, or the wait is for events of another process)
                self._waiting += 1
                self._poke.set()  # no coalescing while a request waits
                try:
                    reached = await self._runner_reaches(projection.name, position,
                                                         self.runner_wait_s)
                finally:
                    self._waiting -= 1
                if not reached:
                    await self.step(projection)

    async def wait_for_head(self, names: tuple[str, ...], timeout: float = 5.0) -> None:
        """Read-your-writes for a read that may concern any stream (a list, statistics):
        return once the projections `names` have applied everything committed so far."""
        await self.wait_for(await self.store.head(), timeout, names)

    async def wait_for_stream(self, stream_id: str, names: tuple[str, ...],
                              timeout: float = 5.0) -> bool:
        """Read-your-writes for one stream: return once the projections `names` have
        applied everything of `stream_id` committed so far; False if it has no events."""
        head = await self.store.stream_head(stream_id)
        if head is None:
            return False
        await self.wait_for(head, timeout, names)
        return True

    async def _runner_reaches(self, name: str, position: int, timeout: float) -> bool:
        """Whether this process's running runner applies up to `position` within `timeout`."""
        if not self._running:
            return False
        end = time.monotonic() + timeout
        while self._reached.get(name, 0) < position:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def _pending_until(self, projection: Projection, position: int) -> bool:
        """Whether the projection has a handled event at or before `position` to apply.

        No query when this process's runner has seen its checkpoint reach `position`
        (checkpoints only move forward). Otherwise the newest handled event up to
        `position` (one backward probe of the type index per type) against the
        checkpoint: the cost does not grow with the events since an idle projection's
        checkpoint, as an `EXISTS` over them did."""
        if self._reached.get(projection.name, 0) >= position:
            return False
        types = sorted(projection.handles) if projection.handles is not None else None
        return bool(await self.pool.fetchval(
            "SELECT coalesce(CASE WHEN $3::text[] IS NULL"
            " THEN (SELECT max(position) FROM events WHERE position <= $2)"
            " ELSE (SELECT max((SELECT max(e.position) FROM events AS e"
            "  WHERE e.type = t.name AND e.position <= $2)) FROM unnest($3::text[]) AS t(name))"
            " END, 0) > coalesce((SELECT position FROM projection_checkpoints WHERE name = $1), 0)",
            projection.name, position, types))

    async def rebuild(self, name: str) -> int:
        """Empty the read model and fold every event again, in one transaction.

        Readers see the old read model until the rebuild commits; live runners wait
        on the checkpoint lock meanwhile. Returns the events applied.
        """
        projection = self.projections[name]
        applied = 0
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO projection_checkpoints (name) VALUES ($1) "
                "ON CONFLICT (name) DO UPDATE SET position = 0, updated_at = now()",
                name,
            )
            await conn.execute(
                "SELECT 1 FROM projection_checkpoints WHERE name = $1 FOR UPDATE", name
            )
            await conn.execute(
                "UPDATE projection_checkpoints SET position = 0 WHERE name = $1", name
            )
            await projection.reset(conn)
            while True:
                count = await self._step_group(conn, [projection], {})
                applied += count
                if count < self.batch_size:
                    break
        log.info("projection rebuilt", extra={"projection": name, "events": applied})
        return applied

    def _concerned(self, types: frozenset[str] | None) -> list[Projection]:
        """The projections that handle any of `types` (all of them when None)."""
        if types is None:
            return list(self.projections.values())
        concerned = self._concerned_by.get(types)
        if concerned is None:  # a few type sets recur (a chat call's): remembered
            if len(self._concerned_by) >= 256:
                self._concerned_by.clear()
            concerned = self._concerned_by[types] = [
                p for p in self.projections.values()
                if p.handles is None or not p.handles.isdisjoint(types)]
        return list(concerned)

    async def run(self) -> None:
        """Follow the store forever: wake on NOTIFY (or the poll), apply, repeat.

        A notification names the types appended: only the projections handling one of
        them are stepped (an append costs the others nothing); the poll, and any doubt
        (a payload without types, a listener re-opened), steps them all."""
        handled: set[str] | None = set()
        for projection in self.projections.values():
            if projection.handles is None:
                handled = None
                break
            handled |= projection.handles
        self._running = True
        try:
            with suppress_instrumentation():  # background work: no span per query
                await self._follow(handled)
        finally:
            self._running = False

    async def _follow(self, handled: set[str] | None) -> None:
        async with Notifier(self.pool, self.poll_s, types=handled) as notifier:
            types: frozenset[str] | None = None
            full_at = 0.0
            while True:
                if time.monotonic() - full_at >= self.poll_s:
                    types = None  # at least one full pass per poll interval, even when busy
                if types is None:
                    full_at = time.monotonic()
                try:
                    if types is None:
                        for projection in await self._with_work(self._concerned(None)):
                            while await self._step_in_transaction([projection]) >= self.batch_size:
                                pass
                    else:  # notified of these types: the projections handling them, at once
                        while await self.step_group(self._concerned(types)) >= self.batch_size:
                            pass
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("projection runner: database unavailable, retrying: %s", exc)
                    await asyncio.sleep(self.poll_s)
                    types = None
                    continue
                except Exception:
                    # A projection bug or an event it cannot fold: its transaction rolled
                    # back, the checkpoint stays before the event; retry after a pause.
                    log.exception("projection failed; will retry")
                    await asyncio.sleep(self.poll_s)
                    types = None
                    continue
                types = await notifier.wait()
                if self.coalesce_s > 0 and types is not None and not self._waiting:
                    self._poke.clear()
                    try:
                        await asyncio.wait_for(self._poke.wait(), self.coalesce_s)
                    except TimeoutError:
                        pass
                    more = notifier.take()
                    types = types | more if more is not None else None
