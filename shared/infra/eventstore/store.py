"""The event store: append with optimistic concurrency, read a stream, read all.

All writes go through the `nexus_append_batch` SQL function (migrations/), which holds a
transaction-scoped lock from assigning positions to commit. Commit order therefore
equals position order: a reader that has seen position N will never later find a
committed event below N, so `read_all(after=N)` can be followed without skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
from opentelemetry.instrumentation.utils import suppress_instrumentation

from shared.contracts.events import (
    Event,
    Metadata,
    RecordedEvent,
    decode_event,
    decode_metadata,
    encode_event,
    encode_metadata,
    new_id,
)
from shared.infra.tracing import current_ids

log = logging.getLogger("nexus.eventstore")

NOTIFY_CHANNEL = "nexus_events"


class EventStoreError(RuntimeError):
    pass


class WrongExpectedVersion(EventStoreError):
    """Optimistic concurrency: the stream moved on since the caller read it."""

    def __init__(self, stream_id: str, expected: int | None, actual: int) -> None:
        super().__init__(
            f"wrong expected version for stream {stream_id!r}: expected {expected}, current {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class EventIdConflict(EventStoreError):
    """Some (not all) of the event ids were stored before: not an exact retry."""


class AppendResult(msgspec.Struct, frozen=True):
    stream_id: str
    first_position: int
    last_position: int
    next_expected_version: int
    duplicate: bool = False
    # when the stream's last event of this append was recorded (a duplicate's: the stored
    # one's); None where the statement used does not say (an append in a caller's
    # transaction, an older schema)
    recorded_at: datetime | None = None


class StoredEvent(msgspec.Struct, frozen=True):
    """An event as stored, its data plain JSON (not decoded into its type): audit logs."""

    position: int
    type: str
    stream_id: str
    data: Any
    trace_id: str | None
    recorded_at: datetime


_STORED = ("SELECT position, type, stream_id, data::text AS data,"
           " metadata ->> 'trace_id' AS trace_id, recorded_at FROM events")


def _to_stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(position=row["position"], type=row["type"], stream_id=row["stream_id"],
                       data=msgspec.json.decode(row["data"]), trace_id=row["trace_id"],
                       recorded_at=row["recorded_at"])


_SELECT = (
    "SELECT position, event_id, stream_id, stream_version, type, data::text AS data, "
    "metadata::text AS metadata, recorded_at FROM events"
)


def _to_recorded(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(
        position=row["position"],
        event_id=row["event_id"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        type=row["type"],
        event=decode_event(row["data"]),
        metadata=decode_metadata(row["metadata"]),
        recorded_at=row["recorded_at"],
    )


def _with_trace(meta: Metadata | None) -> Metadata:
    meta = meta or Metadata()
    if meta.trace_id is None:
        trace_id, span_id = current_ids()
        if trace_id:
            meta = msgspec.structs.replace(meta, trace_id=trace_id, span_id=span_id)
    return meta


@dataclass(eq=False)
class _Append:
    stream_id: str
    expected_version: int | None
    event_ids: list[uuid.UUID | str]  # given (UUIDs), or new (`new_id`, text)
    types: list[str]
    data: list[str]
    metadata: str
    future: asyncio.Future[AppendResult] | None = None


def _metadata_text(metadata: Metadata | None) -> str:
    """An append's metadata as stored, the current trace's ids added when it has none:
    made once per append, however many streams it writes."""
    return encode_metadata(_with_trace(metadata)).decode()


def _request(stream_id: str, events: Sequence[Event], expected_version: int | None,
             metadata: str, event_ids: Sequence[uuid.UUID] | None) -> _Append:
    if not events:
        raise ValueError("append needs at least one event")
    ids = list(event_ids) if event_ids is not None else [new_id() for _ in events]
    if len(ids) != len(events):
        raise ValueError("event_ids must match events one to one")
    if len(set(ids)) != len(ids):
        raise ValueError("event_ids must be distinct within one append")
    return _Append(
        stream_id=stream_id, expected_version=expected_version, event_ids=ids,
        types=[type(e).__name__ for e in events],
        data=[encode_event(e).decode() for e in events],
        metadata=metadata,
    )


_APPEND_SQL = (
    "SELECT idx, status, first_position, last_position, last_version, actual"
    " FROM nexus_append_batch($1, $2, $3, $4, $5, $6, $7)"
)
# all or nothing in one statement: the first refusal raises REFUSED (migration
# 20261201171500_append_atomic.sql), rolling back the statement's every insert
_APPEND_ATOMIC_SQL = _APPEND_SQL.replace("nexus_append_batch", "nexus_append_atomic")
REFUSED = "NX409"
# the group-commit writer's statement: single appends and atomic groups of several
# streams together (migration 20261201193000_append_groups.sql)
_APPEND_GROUPS_SQL = (
    "SELECT idx, status, first_position, last_position, last_version, actual"
    " FROM nexus_append_groups($1, $2, $3, $4, $5, $6, $7, $8)"
)
# the same with each row's `recorded_at` (migration 20261202120000_append_recorded_at.sql;
# the forms above serve an older schema)
#
# These two, the hot path's statements, take each array as one string, unpacked in the
# statement: asyncpg encodes an array parameter element by element, checking each
# against abstract base classes in Python (`ABCMeta.__instancecheck__`: about 70 Python
# calls per call for a settle's arrays, issue 16 round 11). Ids, names and numbers go
# as a JSON array (msgspec); the events' data and metadata, JSON texts already, go
# joined by U+001E, a character JSON text never holds unescaped (no escaping, no JSON
# parse of the whole: each is parsed once, as jsonb, by the function, as before).
_SEPARATOR = "\x1e"


def _unpacked(n: int, element: str) -> str:
    """The array parameter `$n` carries as one string, in its order."""
    if element == "json":
        return f"string_to_array(${n}::text, E'\\x{ord(_SEPARATOR):02x}')"
    return (f"ARRAY(SELECT e::{element} FROM json_array_elements_text(${n}::json)"
            " WITH ORDINALITY AS a(e, o) ORDER BY o)")


_APPEND_COLUMNS = ("text", "bigint", "int", "uuid", "text", "json", "json")
_APPEND_ATOMIC_AT_SQL = (
    "SELECT idx, status, first_position, last_position, last_version, actual, recorded_at"
    " FROM nexus_append_atomic_at("
    + ", ".join(_unpacked(n, t) for n, t in enumerate(_APPEND_COLUMNS, 1)) + ")"
)
_APPEND_GROUPS_AT_SQL = (
    "SELECT idx, status, first_position, last_position, last_version, actual, recorded_at"
    " FROM nexus_append_groups_at("
    + ", ".join(_unpacked(n, t) for n, t in enumerate(("int", *_APPEND_COLUMNS), 1)) + ")"
)
_JSON_FORMS = (_APPEND_ATOMIC_AT_SQL, _APPEND_GROUPS_AT_SQL)
_json = msgspec.json.Encoder()


@dataclass(eq=False)
class _Group:
    """What one caller waits for in the writer's queue: a single append, or an atomic
    append to several streams (all written or none)."""

    requests: list[_Append]
    atomic: bool
    future: asyncio.Future[Any]


def _outcome(request: _Append, row: Any) -> AppendResult | Exception:
    """One stream's outcome from its `nexus_append_batch` row (or a refusal's detail)."""
    status = row["status"]
    if status in ("ok", "duplicate"):
        return AppendResult(
            stream_id=request.stream_id, first_position=row["first_position"],
            last_position=row["last_position"], next_expected_version=row["last_version"],
            duplicate=status == "duplicate", recorded_at=row.get("recorded_at"))
    if status == "version":
        return WrongExpectedVersion(request.stream_id, request.expected_version, row["actual"])
    return EventIdConflict(
        f"event ids already used: {row['actual']} of {len(request.event_ids)} events "
        f"in this append to stream {request.stream_id!r} were stored before "
        "(a retry must resend the same events to the same stream)")


def _group_outcome(group: _Group, rows: list[Any]) -> Any:
    """A queued group's outcome from its rows: a single append's result or refusal; an
    atomic group's results, or the refusal of its first refused stream (its other
    streams, rolled back, say 'aborted')."""
    results = [_outcome(request, row) if row["status"] != "aborted" else None
               for request, row in zip(group.requests, rows, strict=True)]
    if not group.atomic:
        return results[0]
    refused = next((r for r in results if isinstance(r, Exception)), None)
    return refused if refused is not None else results


HOLD_IDLE_S = 0.2
"""How long a `_HeldConnection` keeps its connection unused before giving it back."""


class _HeldConnection:
    """A pool connection kept between the statements of one kind of work (the appends,
    the fence reads; issue 16, round 11): around each statement asyncpg's pool costs
    about 30 Python calls and a task (its release is shielded), and a busy process runs
    these statements back to back. The connection goes back to the pool once unused for
    `HOLD_IDLE_S`, at once after a failure that is not the statement's own error (a
    lost connection, a cancellation: the pool resets or replaces it), and at once when
    it was taken with fewer than two other connections free (counted once per hold:
    the pool counts by walking its holders), so a small pool is not kept from its other
    users. While a statement of the kind is in flight, the next one takes a pool
    connection."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._conn: Any = None
        self._busy = False
        self._used = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    async def run(self, work: Any) -> Any:
        """`await work(conn)` on the held connection (or a pool one, above)."""
        if self._busy:
            async with self.pool.acquire() as conn:
                return await work(conn)
        self._busy = True
        try:
            conn, self._conn = self._conn, None
            spare = True
            if conn is None:  # the pool's free connections are counted once per hold
                conn = await self.pool.acquire()
                pool = self.pool
                spare = pool.get_idle_size() + pool.get_max_size() - pool.get_size() >= 2
            try:
                result = await work(conn)
            except asyncpg.PostgresError:
                self._keep(conn, spare)  # the statement failed, the connection did not
                raise
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.pool.release(conn)
                raise
            self._keep(conn, spare)
            return result
        finally:
            self._busy = False

    def _keep(self, conn: Any, spare: bool) -> None:
        if not spare:
            self._release_soon(conn)
            return
        loop = asyncio.get_running_loop()
        self._conn, self._used = conn, loop.time()
        if self._timer is None:
            self._timer = loop.call_later(HOLD_IDLE_S, self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        conn = self._conn
        if conn is None:  # in use, or given back: `_keep` arms the next check
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._used
        if idle < HOLD_IDLE_S:
            self._timer = loop.call_later(HOLD_IDLE_S - idle, self._check_idle)
            return
        self._conn = None
        self._release_soon(conn)

    def _release_soon(self, conn: Any) -> None:
        task = asyncio.ensure_future(self._release(conn))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # a closed pool: nothing to give back to
            await self.pool.release(conn)

    async def close(self) -> None:
        """Give the connection back now (before the pool closes: it waits for it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._release(conn)
        if self._releasing:
            await asyncio.gather(*self._releasing)


_STREAM_VERSION_SQL = "SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1"
_STREAM_VERSIONS_SQL = (
    "SELECT s.stream_id, coalesce((SELECT max(e.stream_version) FROM events AS e"
    " WHERE e.stream_id = s.stream_id), 0) AS version FROM unnest($1::text[]) AS s(stream_id)")


class EventStore:
    """Append and read events. Concurrent appends of one process share commits.

    `append` and `append_atomic` calls that overlap in time are coalesced by one writer
    task into a single `nexus_append_groups` statement and a single commit (group
    commit): each append is still checked and reported on its own, so a conflict fails
    only its caller, and an atomic append to several streams is all or nothing within
    the batch (a subtransaction). A lone append is a batch of one. `max_batch` bounds
    a batch (in callers).
    """

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 128) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self._queue: list[_Group] = []
        self._writer: asyncio.Task[None] | None = None
        self._atomic_fn = True  # nexus_append_atomic exists (False: an older schema)
        self._groups_fn = True  # nexus_append_groups exists (False: an older schema)
        # the statements of the two forms above: with `recorded_at` until the schema says
        # the functions returning it are missing
        self._atomic_sql, self._groups_sql = _APPEND_ATOMIC_AT_SQL, _APPEND_GROUPS_AT_SQL
        self._direct = 0  # atomic appends sent on their own, in flight (others batch meanwhile)
        # `stream_version` reads: while one is in flight, the next ones wait here and are
        # read together in one statement once it is back
        self._version_reads: dict[str, list[asyncio.Future[int]]] = {}
        self._version_reading = False
        self._version_reader: asyncio.Task[None] | None = None
        # one pool connection kept for the appends and one for the fence reads
        self._appends = _HeldConnection(pool)
        self._reads = _HeldConnection(pool)

    async def close(self) -> None:
        """Give back the pool connections this store keeps between statements (the pool
        would wait for them at its close, up to `HOLD_IDLE_S`)."""
        await self._appends.close()
        await self._reads.close()

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        expected_version: int | None,
        metadata: Metadata | None = None,
        *,
        event_ids: Sequence[uuid.UUID] | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> AppendResult:
        """Append `events` to `stream_id` atomically.

        `expected_version`: None = any, 0 = the stream must be new, n = its last version.
        `event_ids`: give them to make a retry idempotent (the same ids and stream
        return the stored result with `duplicate=True`); omitted, fresh ids are used.
        The current trace id is added to the metadata when it has none.
        `conn`: append inside the caller's transaction (no coalescing; note that the
        append lock is then held until the caller commits).
        """
        request = _request(stream_id, events, expected_version, _metadata_text(metadata),
                           event_ids)
        if conn is not None:
            [outcome] = await self._execute(conn, [request])
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return await self._enqueue([request], atomic=False)

    def _enqueue(self, requests: list[_Append], *, atomic: bool) -> asyncio.Future[Any]:
        """Queue appends for the group-commit writer; the future gets the outcome."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Group(requests, atomic, future))
        if self._writer is None or self._writer.done():
            # the writer serves every caller of the moment: not the trace of the request
            # that happened to start it (its statements would show in that one's trace);
            # each event keeps its own caller's trace id (taken when it was queued)
            with suppress_instrumentation():
                self._writer = asyncio.create_task(self._write_loop(), name="eventstore-writer")
        return future

    async def append_atomic(
        self, appends: Sequence[tuple[str, Sequence[Event], int | None]
                                | tuple[str, Sequence[Event], int | None, Sequence[uuid.UUID] | None]],
        metadata: Metadata | None = None,
        before: Any = None,
        require: Sequence[tuple[str, int]] = (),
    ) -> list[AppendResult]:
        """Append to several streams in one transaction: all or nothing.

        Each item is `(stream_id, events, expected_version[, event_ids])`. Raises the
        first `WrongExpectedVersion` / `EventIdConflict` (then nothing is written).
        `before(conn)`, if given, runs first in the same transaction (a write that must
        commit with these events or not at all, e.g. taking rate-limit slots); what it
        raises rolls everything back and propagates.
        `require`: `(stream_id, version)` pairs, streams that must be at that version when
        the appends commit, nothing being appended to them (e.g. "the session is still
        open"); one that is not raises `WrongExpectedVersion` for it and nothing is written.
        The results are those of `appends`.
        """
        meta = _metadata_text(metadata)
        requests = [_request(item[0], item[1], item[2], meta,
                             item[3] if len(item) > 3 else None)  # type: ignore[misc]
                    for item in appends]
        checks = [_Append(stream_id=stream, expected_version=version, event_ids=[], types=[],
                          data=[], metadata="{}") for stream, version in require]
        alone = (not self._queue and not self._direct and self._atomic_fn and not checks
                 and (self._writer is None or self._writer.done()))
        if before is None and requests and self._groups_fn and not alone:
            # group commit: one statement with the other appends of the moment, the
            # group all or nothing in it (a subtransaction); a check is a stream of no
            # events at its expected version
            results = await self._enqueue(requests + checks, atomic=True)
            return results[:len(requests)]
        # alone at this moment (and no check): the one-statement form below, no hop to the
        # writer task and no subtransaction; appends arriving meanwhile batch in the writer
        if before is None and requests and self._atomic_fn and not checks:
            # one statement, its own transaction: one round trip, and the append lock is
            # released at its commit rather than held across a COMMIT round trip
            self._direct += 1
            try:
                return await self._appends.run(  # type: ignore[no-any-return]
                    lambda conn: self._execute(conn, requests, self._atomic_sql))
            except asyncpg.UndefinedFunctionError:
                if self._atomic_sql is _APPEND_ATOMIC_AT_SQL:  # an older schema: the older form
                    self._atomic_sql = _APPEND_ATOMIC_SQL
                    return await self.append_atomic(appends, metadata, before, require)
                self._atomic_fn = False  # migrations not applied yet: the transaction below
            except asyncpg.PostgresError as exc:
                if getattr(exc, "sqlstate", None) != REFUSED:
                    raise
                refused = msgspec.json.decode(exc.detail or "{}")
                raise _outcome(requests[refused["idx"] - 1], refused) from None
            finally:
                self._direct -= 1
        async with self.pool.acquire() as conn, conn.transaction():
            if before is not None:
                await before(conn)
            # every stream in one statement (one round trip); any refusal rolls back all
            outcomes = await self._execute(conn, requests) if requests else []
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
            if checks:  # under the append lock (taken by the append), so nothing moves them
                if not requests:
                    await conn.execute("SELECT pg_advisory_xact_lock(7400001)")
                for check in checks:
                    version = await self.stream_version(check.stream_id, conn=conn)
                    if version != check.expected_version:
                        raise WrongExpectedVersion(check.stream_id, check.expected_version, version)
            return outcomes  # type: ignore[return-value]

    async def _write_loop(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                outcomes = await self._appends.run(
                    lambda conn: self._write_groups(conn, batch))  # noqa: B023 - run now
            except Exception as exc:  # the whole batch failed (connection lost, ...)
                error = exc
                if not isinstance(exc, EventStoreError):
                    error = EventStoreError(f"append failed: {exc}")
                    error.__cause__ = exc  # database_unavailable() sees why
                outcomes = [error] * len(batch)
            for group, outcome in zip(batch, outcomes, strict=True):
                if group.future.done():  # the caller was cancelled
                    continue
                if isinstance(outcome, Exception):
                    group.future.set_exception(outcome)
                else:
                    group.future.set_result(outcome)

    async def _write_groups(self, conn: asyncpg.Connection, batch: list[_Group]) -> list[Any]:
        """One statement for the batch; each group's outcome: a single append's result
        (or its refusal), an atomic group's results (or its first refusal)."""
        if self._groups_fn:
            requests = [r for g in batch for r in g.requests]
            try:
                rows = await self._rows(conn, requests, self._groups_sql,
                                        [n for n, g in enumerate(batch) for _ in g.requests])
            except asyncpg.UndefinedFunctionError:
                if self._groups_sql is _APPEND_GROUPS_AT_SQL:  # an older schema: the older form
                    self._groups_sql = _APPEND_GROUPS_SQL
                    return await self._write_groups(conn, batch)
                self._groups_fn = False  # migrations not applied yet: the statements below
            else:
                outcomes, i = [], 0
                for group in batch:
                    n = len(group.requests)
                    outcomes.append(_group_outcome(group, rows[i:i + n]))
                    i += n
                return outcomes
        outcomes = []  # an older schema: each group on its own
        for group in batch:
            try:
                async with conn.transaction():
                    results = await self._execute(conn, group.requests)
                    refused = next((r for r in results if isinstance(r, Exception)), None)
                    if group.atomic and refused is not None:
                        raise refused
                outcomes.append(results if group.atomic else results[0])
            except EventStoreError as exc:
                outcomes.append(exc)
        return outcomes

    async def _execute(self, conn: asyncpg.Connection, batch: list[_Append],
                       sql: str = _APPEND_SQL) -> list[AppendResult | Exception]:
        rows = await self._rows(conn, batch, sql)
        return [_outcome(request, row) for request, row in zip(batch, rows, strict=True)]

    @staticmethod
    async def _rows(conn: asyncpg.Connection, batch: list[_Append], sql: str,
                    groups: list[int] | None = None) -> list[Any]:
        """The append function's rows for `batch`, in request order."""
        *plain, data, metadata = arrays = [
            *([groups] if groups is not None else []),
            [r.stream_id for r in batch],
            [r.expected_version for r in batch],
            [len(r.event_ids) for r in batch],
            [i for r in batch for i in r.event_ids],
            [t for r in batch for t in r.types],
            [d for r in batch for d in r.data],
            [r.metadata for r in batch for _ in r.event_ids],
        ]
        if sql in _JSON_FORMS:  # each array as one string (above)
            arrays = [*(_json.encode(a).decode() for a in plain),
                      _SEPARATOR.join(data), _SEPARATOR.join(metadata)]
        rows = await conn.fetch(sql, *arrays)
        return sorted(rows, key=lambda r: r["idx"])

    async def read_stream(self, stream_id: str, *, from_version: int = 1,
                          to_position: int | None = None) -> list[RecordedEvent]:
        """Events of one stream in version order (up to a global position, for time travel)."""
        rows = await self.pool.fetch(
            f"{_SELECT} WHERE stream_id = $1 AND stream_version >= $2 "
            "AND ($3::bigint IS NULL OR position <= $3) ORDER BY stream_version",
            stream_id, from_version, to_position,
        )
        return [_to_recorded(r) for r in rows]

    async def stream_version(self, stream_id: str, conn: asyncpg.Connection | None = None) -> int:
        """The stream's version now (0: no event), as read by a statement sent after this
        call: every append acknowledged before it is counted (a fence's read).

        Without `conn`, concurrent reads share statements (issue 16): one alone is sent at
        once; those asked while it is in flight are read together, in one statement sent
        when it is back (never answered by a read that started before they were asked)."""
        if conn is not None:
            return await conn.fetchval(_STREAM_VERSION_SQL, stream_id)
        if self._version_reading:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._version_reads.setdefault(stream_id, []).append(future)
            return await future
        self._version_reading = True
        try:
            return await self._reads.run(  # type: ignore[no-any-return]
                lambda conn: conn.fetchval(_STREAM_VERSION_SQL, stream_id))
        finally:
            self._version_reading = False
            if self._version_reads:
                self._version_reading = True
                self._version_reader = asyncio.create_task(self._read_versions(),
                                                           name="eventstore-versions")

    async def _read_versions(self) -> None:
        try:
            while self._version_reads:
                batch, self._version_reads = self._version_reads, {}
                try:
                    rows = await self._reads.run(
                        lambda conn: conn.fetch(_STREAM_VERSIONS_SQL, list(batch)))  # noqa: B023
                except Exception as exc:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for row in rows:
                    for future in batch[row["stream_id"]]:
                        if not future.done():  # (its caller was cancelled)
                            future.set_result(row["version"])
        finally:
            self._version_reading = False

    async def read_all(self, after: int = 0, limit: int = 1000, *,
                       types: Sequence[str] | None = None,
                       conn: asyncpg.Connection | None = None) -> list[RecordedEvent]:
        """Events after global position `after`, in position order, at most `limit`."""
        executor = conn or self.pool
        if types is None:
            rows = await executor.fetch(
                f"{_SELECT} WHERE position > $1 ORDER BY position LIMIT $2", after, limit
            )
        else:
            rows = await executor.fetch(
                f"{_SELECT} WHERE position > $1 AND type = ANY($2::text[]) ORDER BY position LIMIT $3",
                after, list(types), limit,
            )
        return [_to_recorded(r) for r in rows]

    async def head(self, conn: asyncpg.Connection | None = None) -> int:
        """The last committed global position (0 for an empty store)."""
        return await (conn or self.pool).fetchval("SELECT coalesce(max(position), 0) FROM events")

    async def stream_head(self, stream_id: str) -> int | None:
        """The global position of a stream's last event; None when the stream is empty."""
        return await self.pool.fetchval(
            "SELECT max(position) FROM events WHERE stream_id = $1", stream_id)

    async def position_at(self, moment: datetime) -> int:
        """The last position recorded at or before `moment` (0 before the first event)."""
        return await self.pool.fetchval(
            "SELECT coalesce(max(position), 0) FROM events WHERE recorded_at <= $1", moment)

    async def events_of_trace(self, trace_id: str, *, tenant: str | None,
                              limit: int) -> list[StoredEvent]:
        """Every event a trace appended (of `tenant`; of every tenant when None), in order."""
        rows = await self.pool.fetch(
            f"{_STORED} WHERE metadata ->> 'trace_id' = $1"
            " AND ($2::text IS NULL OR metadata ->> 'tenant' = $2) ORDER BY position LIMIT $3",
            trace_id, tenant, limit)
        return [_to_stored(r) for r in rows]

    async def events_of_correlation(self, correlation_id: str, *, tenant: str, after: int,
                                    limit: int) -> list[StoredEvent]:
        """The events correlated with `correlation_id` (a session: its audit log) of
        `tenant`, after global position `after`, in order, at most `limit`."""
        rows = await self.pool.fetch(
            f"{_STORED} WHERE metadata ->> 'correlation_id' = $1"
            " AND metadata ->> 'tenant' = $2 AND position > $3 ORDER BY position LIMIT $4",
            correlation_id, tenant, after, limit)
        return [_to_stored(r) for r in rows]

    async def ping(self) -> bool:
        """Whether the database answers (the health check)."""
        return await self.pool.fetchval("SELECT 1") == 1

    async def follow(self, after: int = 0, *, poll_s: float = 1.0, batch: int = 500,
                     types: Sequence[str] | None = None) -> AsyncIterator[RecordedEvent]:
        """Every event after `after` (of `types`, if given), then new ones as they
        commit; never ends. Safe to follow: positions commit in order (see above)."""
        async with Notifier(self.pool, poll_s, types=types) as notifier:
            position = after
            while True:
                head = await self.head()
                events = await self.read_all(position, batch, types=types)
                for event in events:
                    yield event
                    position = event.position
                if len(events) < batch:
                    position = max(position, head)
                    await notifier.wait()


class _Listener:
    """The one LISTEN connection of a pool, shared by every `Notifier` on it: a NOTIFY
    wakes one Postgres backend and sends one message per process, however many
    followers the process runs (the projection runner, the fleet's, the models' and the
    sessions' followers, the dashboard's tail). `generation` counts the connections
    opened: a notifier that saw another generation may have missed notifications."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.notifiers: set[Notifier] = set()
        self.generation = 0
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    def _dispatch(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        for notifier in list(self.notifiers):
            notifier._on_notify(conn, pid, channel, payload)

    def listening(self) -> bool:
        try:
            return self._conn is not None and not self._conn.is_closed()
        except asyncpg.InterfaceError:  # the pool took it back: its server went away
            return False

    async def ensure(self) -> None:
        """Listening from here on, unless the database cannot be reached (then polling)."""
        if self.listening():
            return
        async with self._lock:
            if self.listening():
                return
            await self._close()  # give a dead one back, take a new one
            conn = None
            try:
                conn = await self.pool.acquire()
                await conn.add_listener(NOTIFY_CHANNEL, self._dispatch)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("cannot LISTEN for events, polling only: %s", exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await self.pool.release(conn)
                return
            self._conn = conn  # listening from here: seen as such only now
            self.generation += 1

    async def leave(self, notifier: Notifier) -> None:
        self.notifiers.discard(notifier)
        if not self.notifiers:
            async with self._lock:
                if not self.notifiers:
                    await self._close()
                    if _listeners.get(id(self.pool)) is self:
                        del _listeners[id(self.pool)]

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # a connection that died with its server
            await conn.remove_listener(NOTIFY_CHANNEL, self._dispatch)
        with contextlib.suppress(Exception):
            await self.pool.release(conn)


_listeners: dict[int, _Listener] = {}  # by id() of the pool (asyncpg pools take no weakrefs)


def _listener_of(pool: asyncpg.Pool) -> _Listener | None:
    listener = _listeners.get(id(pool))
    return listener if listener is not None and listener.pool is pool else None


class Notifier:
    """Wakes followers when events commit: LISTEN/NOTIFY, with a poll as safety net.

    NOTIFY is sent by the append functions inside the appending transaction, so it
    arrives only after commit. Its payload names the types the append wrote
    (`"<position> <Type>,<Type>"`): a notifier given `types` wakes only for those (an
    append of other types costs its follower nothing), and `wait` returns the types
    seen since the last wait (None: unknown, i.e. anything may have changed: the poll
    or a payload without types). The notifiers of one pool share one LISTEN connection
    (`_Listener`). A lost notification (connection dropped) costs at most one poll
    interval; the listener connection is re-opened on the next wait.
    """

    def __init__(self, pool: asyncpg.Pool, poll_s: float = 1.0,
                 types: Sequence[str] | frozenset[str] | None = None) -> None:
        self.pool = pool
        self.poll_s = poll_s
        self.types = frozenset(types) if types is not None else None
        self._event = asyncio.Event()
        self._seen: set[str] | None = set()  # types notified since the last wait; None: any
        self._generation: int | None = None  # the listener connection this one heard on

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        _, _, names = payload.partition(" ")
        if not names:  # no types named: anything may have been appended
            self._seen = None
            self._event.set()
            return
        notified = names.split(",")
        if self.types is not None and self.types.isdisjoint(notified):
            return
        if self._seen is not None:
            self._seen.update(notified)
        self._event.set()

    async def _listen(self) -> None:
        listener = _listener_of(self.pool)
        if listener is None:  # the first notifier of this pool (or one whose id was reused)
            listener = _listeners[id(self.pool)] = _Listener(self.pool)
        listener.notifiers.add(self)
        await listener.ensure()
        if self._generation is not None and listener.generation != self._generation:
            self._seen = None  # another connection since: notifications may have been missed
        self._generation = listener.generation

    async def wait(self, timeout: float | None = None) -> frozenset[str] | None:
        """Return when an event (of `types`) may have been appended, or after the poll
        interval: the types notified meanwhile, or None when it may be any (the poll)."""
        await self._listen()
        try:
            await asyncio.wait_for(self._event.wait(), timeout or self.poll_s)
        except TimeoutError:
            self._seen = None
        self._event.clear()
        seen, self._seen = self._seen, set()
        return frozenset(seen) if seen is not None else None

    def take(self) -> frozenset[str] | None:
        """The types notified since the last wait or take, without waiting (empty: none)."""
        if not self._event.is_set():
            return frozenset()
        self._event.clear()
        seen, self._seen = self._seen, set()
        return frozenset(seen) if seen is not None else None

    async def __aenter__(self) -> Notifier:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        listener = _listener_of(self.pool)
        if listener is not None:
            await listener.leave(self)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (RESET ALL, UNLISTEN *, ...).

    asyncpg still rolls back a transaction left open and drops local listeners; Nexus
    keeps no other session state (no SET, no session advisory locks, and the Notifier
    unlistens before it returns its connection), so the extra round trip per release
    buys nothing.
    """


CONNECT_TIMEOUT_S = 5.0  # a Postgres that does not answer is unavailable, not waited for


async def create_pool(database_url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """An asyncpg pool for Nexus (statement cache on; jsonb passed as text). While
    Postgres is away, taking a connection fails at once (refused) or after
    `CONNECT_TIMEOUT_S`, and the pool connects again by itself once it is back."""
    return await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size,
                                     reset=_keep_session, timeout=CONNECT_TIMEOUT_S)


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means Postgres cannot be reached right now (down, restarting, a
    connection it closed, a connect timeout): something to retry later, not a bug."""
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                            asyncpg.exceptions.OperatorInterventionError, ConnectionError)):
            return True
        if isinstance(err, (OSError, TimeoutError)) and _raised_in_asyncpg(err):
            return True  # refused ("Connect call failed"), unreachable, connect timeout
        if isinstance(err, asyncpg.exceptions.InternalClientError) and _MID_ERROR in str(err):
            # a pooled connection Postgres dropped while it was reading an error (state 2,
            # ERROR_CONSUME), handed out again before the pool saw it was dead: seen as a
            # 500 under kill -9 of Postgres (docs/reliability.md, "Chaos")
            return True
    return False


_MID_ERROR = "another operation (2) is in progress"


def _raised_in_asyncpg(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if "/asyncpg/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False
