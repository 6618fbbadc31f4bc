"""The event store's contract: what every caller may rely on."""

from __future__ import annotations

import asyncio
import sys
import uuid

import asyncpg
import pytest

from shared.contracts.events import Metadata, SessionClosed, SessionStarted, new_id, session_stream
from shared.infra.eventstore import EventIdConflict, EventStore, WrongExpectedVersion
from shared.infra.eventstore.store import HOLD_IDLE_S, _HeldConnection, create_pool
from shared.infra.tracing import setup_tracing, tracer
from tests.support import REPO


def started(sid: str) -> SessionStarted:
    return SessionStarted(session_id=sid, tenant="t-contract", metadata={"k": "v"})


def new_stream() -> tuple[str, str]:
    sid = str(uuid.uuid4())
    return sid, session_stream(sid)


async def test_append_then_read_stream_in_order(store: EventStore) -> None:
    sid, stream = new_stream()
    first = await store.append(stream, [started(sid)], expected_version=0,
                               metadata=Metadata(tenant="t-contract", actor="tester"))
    second = await store.append(stream, [SessionClosed(session_id=sid, reason="a"),
                                         SessionClosed(session_id=sid, reason="b")],
                                expected_version=1)
    assert first.next_expected_version == 1
    assert second.next_expected_version == 3
    assert second.first_position > first.last_position

    events = await store.read_stream(stream)
    assert [e.stream_version for e in events] == [1, 2, 3]
    assert events[0].event == started(sid)
    assert [e.type for e in events] == ["SessionStarted", "SessionClosed", "SessionClosed"]
    assert events[0].metadata.tenant == "t-contract" and events[0].metadata.actor == "tester"
    assert [e.position for e in events] == sorted(e.position for e in events)
    assert await store.stream_version(stream) == 3


TRICKY_TEXT = ('quote " backslash \\ newline \n tab \t record separator \x1e unit \x1f'
               ' é 中 🙂 }{')


async def test_any_text_survives_every_append_path(store: EventStore) -> None:
    """Data and metadata reach the database as strings joined by U+001E (store.py): a
    string holding that character, quotes, backslashes and any other text comes back
    as it went, through the writer's batch, an atomic append and a lone append."""
    meta = Metadata(tenant="t-contract", actor=TRICKY_TEXT)
    streams = [new_stream() for _ in range(4)]
    results = await asyncio.gather(*(
        store.append(stream, [SessionClosed(session_id=sid, reason=TRICKY_TEXT + sid)],
                     expected_version=None, metadata=meta) for sid, stream in streams[:2]))
    atomic = await store.append_atomic(
        [(streams[2][1], [SessionClosed(session_id=streams[2][0], reason=TRICKY_TEXT)], None)],
        meta)
    await asyncio.sleep(0.05)  # the writer idle: the next goes alone
    alone = await store.append(streams[3][1], [SessionClosed(session_id=streams[3][0],
                                                             reason=TRICKY_TEXT)],
                               expected_version=None, metadata=meta)
    assert all(r.next_expected_version == 1 for r in [*results, *atomic, alone])
    for n, (sid, stream) in enumerate(streams):
        [event] = await store.read_stream(stream)
        assert event.event.reason == TRICKY_TEXT + (sid if n < 2 else "")
        assert event.metadata.actor == TRICKY_TEXT


async def test_wrong_expected_version_is_a_clear_concurrency_error(store: EventStore) -> None:
    sid, stream = new_stream()
    await store.append(stream, [started(sid)], expected_version=0)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append(stream, [SessionClosed(session_id=sid)], expected_version=0)
    assert info.value.stream_id == stream
    assert info.value.expected == 0 and info.value.actual == 1
    assert stream in str(info.value) and "expected 0, current 1" in str(info.value)
    with pytest.raises(WrongExpectedVersion):
        await store.append(stream, [SessionClosed(session_id=sid)], expected_version=5)
    assert len(await store.read_stream(stream)) == 1


async def test_any_version_appends_without_a_check(store: EventStore) -> None:
    sid, stream = new_stream()
    await store.append(stream, [started(sid)], expected_version=None)
    await store.append(stream, [SessionClosed(session_id=sid)], expected_version=None)
    assert await store.stream_version(stream) == 2


async def test_exact_retry_is_idempotent(store: EventStore) -> None:
    sid, stream = new_stream()
    ids = [uuid.uuid4(), uuid.uuid4()]
    events = [started(sid), SessionClosed(session_id=sid)]
    first = await store.append(stream, events, expected_version=0, event_ids=ids)
    retry = await store.append(stream, events, expected_version=0, event_ids=ids)
    assert not first.duplicate and retry.duplicate
    assert (retry.first_position, retry.last_position) == (first.first_position, first.last_position)
    assert len(await store.read_stream(stream)) == 2


async def test_partly_reused_event_ids_are_rejected(store: EventStore) -> None:
    sid, stream = new_stream()
    used = uuid.uuid4()
    await store.append(stream, [started(sid)], expected_version=0, event_ids=[used])
    with pytest.raises(EventIdConflict):
        await store.append(stream, [SessionClosed(session_id=sid), SessionClosed(session_id=sid)],
                           expected_version=1, event_ids=[used, uuid.uuid4()])
    other_sid, other_stream = new_stream()
    with pytest.raises(EventIdConflict):  # same id, another stream: not a retry
        await store.append(other_stream, [started(other_sid)], expected_version=0, event_ids=[used])


async def test_empty_append_and_repeated_ids_are_refused(store: EventStore) -> None:
    with pytest.raises(ValueError, match="at least one"):
        await store.append("session-x", [], expected_version=0)
    sid, stream = new_stream()
    same = uuid.uuid4()
    with pytest.raises(ValueError, match="distinct"):
        await store.append(stream, [started(sid), SessionClosed(session_id=sid)], 0,
                           event_ids=[same, same])


async def test_fifty_concurrent_appenders_exactly_one_wins(pool) -> None:
    """Fifty stores, i.e. fifty transactions on their own connections: no group commit
    merges them, Postgres decides which one appends version 2."""
    sid, stream = new_stream()
    await EventStore(pool).append(stream, [started(sid)], expected_version=0)
    stores = [EventStore(pool) for _ in range(50)]
    go = asyncio.Event()

    async def attempt(i: int) -> bool:
        await go.wait()
        try:
            await stores[i].append(stream, [SessionClosed(session_id=sid, reason=str(i))],
                                   expected_version=1)
            return True
        except WrongExpectedVersion:
            return False

    tasks = [asyncio.create_task(attempt(i)) for i in range(50)]
    go.set()
    results = await asyncio.gather(*tasks)
    assert results.count(True) == 1
    assert [e.stream_version for e in await stores[0].read_stream(stream)] == [1, 2]


_APPENDER = """
import asyncio, sys
from shared.contracts.events import SessionClosed
from shared.infra.eventstore import EventStore, WrongExpectedVersion
from shared.infra.eventstore.store import HOLD_IDLE_S, _HeldConnection, create_pool

async def main(url, stream, sid, who):
    pool = await create_pool(url, max_size=1)
    store = EventStore(pool)
    await store.head()  # connected
    print("ready", flush=True)
    sys.stdin.readline()  # everyone starts together
    try:
        await store.append(stream, [SessionClosed(session_id=sid, reason=who)], expected_version=1)
        print("won", flush=True)
    except WrongExpectedVersion:
        print("conflict", flush=True)
    await pool.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_appenders_in_separate_processes_exactly_one_wins(infra, store: EventStore) -> None:
    sid, stream = new_stream()
    await store.append(stream, [started(sid)], expected_version=0)
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", _APPENDER, infra.database_url, stream, sid, str(i), cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE) for i in range(8)]
    try:
        for proc in procs:
            assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        for proc in procs:
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outcomes = [(await asyncio.wait_for(p.stdout.readline(), 60)).strip().decode()
                    for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    events = await store.read_stream(stream)
    assert [e.stream_version for e in events] == [1, 2]
    assert events[1].event.reason == str(outcomes.index("won"))


async def test_concurrent_writers_keep_versions_contiguous(pool) -> None:
    """Writers with stores of their own (separate transactions) that retry on
    conflict: every event lands, versions 1..n without gaps."""
    sid, stream = new_stream()
    await EventStore(pool).append(stream, [started(sid)], expected_version=0)

    async def writer(i: int) -> None:
        store = EventStore(pool)
        while True:
            version = await store.stream_version(stream)
            try:
                await store.append(stream, [SessionClosed(session_id=sid, reason=str(i))],
                                   expected_version=version)
                return
            except WrongExpectedVersion:
                await asyncio.sleep(0)

    await asyncio.gather(*(writer(i) for i in range(30)))
    events = await EventStore(pool).read_stream(stream)
    assert [e.stream_version for e in events] == list(range(1, 32))
    assert sorted(e.event.reason for e in events[1:]) == sorted(str(i) for i in range(30))


async def test_read_all_is_in_global_order_from_a_position(store: EventStore) -> None:
    start = await store.head()
    sids = [str(uuid.uuid4()) for _ in range(5)]
    for sid in sids:
        await store.append(session_stream(sid), [started(sid)], expected_version=0)
    events = [e for e in await store.read_all(start, 10_000) if e.stream_id.startswith("session-")]
    mine = [e for e in events if e.event.session_id in sids]
    assert [e.event.session_id for e in mine] == sids
    assert [e.position for e in events] == sorted(e.position for e in events)
    assert all(e.position > start for e in events)


async def test_time_travel_reads_a_stream_up_to_a_position(store: EventStore) -> None:
    sid, stream = new_stream()
    first = await store.append(stream, [started(sid)], expected_version=0)
    await store.append(stream, [SessionClosed(session_id=sid)], expected_version=1)
    assert len(await store.read_stream(stream, to_position=first.last_position)) == 1


async def test_events_carry_the_current_trace_id(store: EventStore) -> None:
    setup_tracing("nexus-test")
    sid, stream = new_stream()
    with tracer("test").start_as_current_span("append") as span:
        await store.append(stream, [started(sid)], expected_version=0)
        expected = format(span.get_span_context().trace_id, "032x")
    [event] = await store.read_stream(stream)
    assert event.metadata.trace_id == expected
    assert event.metadata.span_id is not None


async def test_the_group_writer_shows_in_no_callers_trace(store: EventStore) -> None:
    """The group-commit writer serves every caller of the moment, so its statements are
    in none of their traces: not in the trace of the request that happened to start it
    (every later caller's batch would show there). Each event still carries its own
    caller's trace id."""
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    setup_tracing("nexus-test")
    exporter = InMemorySpanExporter()
    otel_trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    sid, stream = new_stream()
    with tracer("test").start_as_current_span("request") as span:
        await store.append(stream, [started(sid)], expected_version=0)
        trace_id = span.get_span_context().trace_id
    in_trace = [s.name for s in exporter.get_finished_spans()
                if s.context.trace_id == trace_id]
    assert in_trace == ["request"]
    [event] = await store.read_stream(stream)
    assert event.metadata.trace_id == format(trace_id, "032x")


async def test_concurrent_appends_fail_only_where_they_conflict(store: EventStore) -> None:
    """Overlapping appends share commits; each is still checked and answered on its own."""
    good = [new_stream() for _ in range(60)]
    taken_sid, taken = new_stream()
    await store.append(taken, [started(taken_sid)], expected_version=0)

    async def attempt(i: int) -> str:
        sid, stream = good[i] if i % 3 else (taken_sid, taken)
        try:
            result = await store.append(stream, [started(sid)], expected_version=0)
        except WrongExpectedVersion:
            return "conflict"
        return "ok" if result.next_expected_version == 1 else "odd"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(60)))
    assert outcomes.count("conflict") == 20
    assert outcomes.count("ok") == 40
    for i in range(60):
        if i % 3:
            assert await store.stream_version(good[i][1]) == 1
    assert await store.stream_version(taken) == 1


async def test_atomic_append_to_several_streams_is_all_or_nothing(store: EventStore) -> None:
    (sid_a, a), (sid_b, b) = new_stream(), new_stream()
    await store.append(b, [started(sid_b)], expected_version=0)
    with pytest.raises(WrongExpectedVersion):
        await store.append_atomic([(a, [started(sid_a)], 0), (b, [started(sid_b)], 0)])
    assert await store.stream_version(a) == 0  # the first append was rolled back
    results = await store.append_atomic([(a, [started(sid_a)], 0),
                                         (b, [SessionClosed(session_id=sid_b)], 1)])
    assert [r.next_expected_version for r in results] == [1, 2]


async def test_atomic_append_refusals_name_their_stream_and_a_retry_is_a_duplicate(
        store: EventStore) -> None:
    """One statement, no explicit transaction (issue 16): a refusal of any stream still
    writes nothing, names the refused stream, and a retry with the same ids replays."""
    (sid_a, a), (sid_b, b), (sid_c, c) = new_stream(), new_stream(), new_stream()
    ids_a, ids_b = [uuid.uuid4()], [uuid.uuid4()]
    first = await store.append_atomic([(a, [started(sid_a)], 0, ids_a),
                                       (b, [started(sid_b)], 0, ids_b)])
    again = await store.append_atomic([(a, [started(sid_a)], 0, ids_a),
                                       (b, [started(sid_b)], 0, ids_b)])
    assert [r.duplicate for r in again] == [True, True]
    assert [r.last_position for r in again] == [r.last_position for r in first]
    with pytest.raises(WrongExpectedVersion) as refused:  # the second stream is at 1, not 5
        await store.append_atomic([(a, [SessionClosed(session_id=sid_a)], 1),
                                   (b, [SessionClosed(session_id=sid_b)], 5)])
    assert (refused.value.stream_id, refused.value.expected, refused.value.actual) == (b, 5, 1)
    assert await store.stream_version(a) == 1  # the first stream's append rolled back
    with pytest.raises(EventIdConflict):  # b's event ids sent again to another stream
        await store.append_atomic([(c, [started(sid_c)], 0),
                                   (a, [SessionClosed(session_id=sid_a)], 1, ids_b)])
    assert await store.stream_version(c) == 0
    assert await store.stream_version(a) == 1
    assert store._groups_fn  # the group-commit form ran (its migration is applied)


async def test_atomic_appends_overlapping_in_time_share_a_commit_and_fail_alone(
        store: EventStore) -> None:
    """Group commit for atomic appends (issue 16): atomic appends to several streams made
    at the same moment go to Postgres in one statement and one commit, yet each is still
    all or nothing on its own: a refused one writes none of its streams and the others
    are written."""
    pairs = [(new_stream(), new_stream()) for _ in range(12)]
    for i, (_, (sid_b, b)) in enumerate(pairs):
        if i % 3 == 0:  # these will be refused: their second stream is not new
            await store.append(b, [started(sid_b)], expected_version=0)

    async def atomic(i: int) -> str:
        (sid_a, a), (sid_b, b) = pairs[i]
        try:
            await store.append_atomic([(a, [started(sid_a)], 0), (b, [started(sid_b)], 0)])
            return "ok"
        except WrongExpectedVersion as exc:
            assert exc.stream_id == b
            return "refused"

    outcomes = await asyncio.gather(*(atomic(i) for i in range(12)))
    assert outcomes == ["refused" if i % 3 == 0 else "ok" for i in range(12)]
    for i, ((_, a), (_, b)) in enumerate(pairs):
        assert await store.stream_version(a) == (0 if i % 3 == 0 else 1)
        assert await store.stream_version(b) == 1
    written = [a for i, ((_, a), _) in enumerate(pairs) if i % 3]
    # one statement stamps all its events with the moment it started (subtransactions
    # give each group its own xmin, so that cannot tell)
    statements = await store.pool.fetchval(
        "SELECT count(DISTINCT recorded_at) FROM events WHERE stream_id = ANY($1::text[])", written)
    assert statements < len(written)  # they shared statements (one, unless the writer was mid-batch)


async def test_atomic_appends_say_when_their_events_were_recorded(store: EventStore) -> None:
    """`recorded_at` comes back with each stream's result (issue 16: a new session answers
    from its append, no read-back): the stored event's time, alone or group-committed,
    and for a duplicate the time of the events stored first."""

    async def recorded(stream: str) -> object:
        return (await store.read_stream(stream))[-1].recorded_at

    (sid_a, a), (sid_b, b) = new_stream(), new_stream()
    ids = [uuid.uuid4()], [uuid.uuid4()]
    first = await store.append_atomic([(a, [started(sid_a)], 0, ids[0]),
                                       (b, [started(sid_b)], 0, ids[1])])
    assert [r.recorded_at for r in first] == [await recorded(a), await recorded(b)]
    pairs = [(new_stream(), new_stream()) for _ in range(8)]
    overlapping = await asyncio.gather(  # at the same moment: group-committed
        *(store.append_atomic([(x, [started(sx)], 0), (y, [started(sy)], 0)])
          for (sx, x), (sy, y) in pairs),
        store.append_atomic([(a, [started(sid_a)], 0, ids[0]), (b, [started(sid_b)], 0, ids[1])]))
    for results, ((_, x), (_, y)) in zip(overlapping, pairs):
        assert [r.recorded_at for r in results] == [await recorded(x), await recorded(y)]
    again = overlapping[-1]
    assert [r.duplicate for r in again] == [True, True]
    assert [r.recorded_at for r in again] == [r.recorded_at for r in first]


async def test_without_the_functions_that_say_when_appends_still_work(fresh_db: str) -> None:
    """A schema before migration 20261202120000 (no `_at` functions): atomic appends,
    alone and group-committed, fall back to the functions without `recorded_at`."""
    pool = await create_pool(fresh_db, max_size=4)
    try:
        await pool.execute("DROP FUNCTION nexus_append_atomic_at(text[], bigint[], int[], uuid[],"
                           " text[], text[], text[]); DROP FUNCTION nexus_append_groups_at(int[],"
                           " text[], bigint[], int[], uuid[], text[], text[], text[])")
        store = EventStore(pool)
        (sid, stream) = new_stream()
        [alone] = await store.append_atomic([(stream, [started(sid)], 0)])
        streams = [new_stream() for _ in range(6)]
        grouped = await asyncio.gather(*(store.append_atomic([(x, [started(sx)], 0)])
                                         for sx, x in streams))
        assert [r.recorded_at for r in [alone, *(g[0] for g in grouped)]] == [None] * 7
        for _, x in [(sid, stream), *streams]:
            assert await store.stream_version(x) == 1
        assert store._groups_fn and store._atomic_fn  # the older functions, not the slow path
    finally:
        await pool.close()


async def test_an_atomic_append_can_require_another_stream_unchanged(store: EventStore) -> None:
    """`require`: a stream that must still be at a version when the appends commit (the
    call path's "the session is still open"), nothing appended to it. Moved, it refuses
    the whole append, group-committed or in a transaction with `before`."""
    (sid_s, session), (sid_a, a), (sid_b, b) = new_stream(), new_stream(), new_stream()
    await store.append(session, [started(sid_s)], expected_version=0)

    async def nothing_before(conn) -> None:
        return None

    for before in (None, nothing_before):
        (sid_x, x) = new_stream()
        results = await store.append_atomic([(x, [started(sid_x)], 0)], before=before,
                                             require=[(session, 1)])
        assert [r.stream_id for r in results] == [x]
        assert await store.stream_version(x) == 1 and await store.stream_version(session) == 1
    await store.append(session, [SessionClosed(session_id=sid_s)], expected_version=1)
    for before, (sid, stream) in ((None, (sid_a, a)), (nothing_before, (sid_b, b))):
        with pytest.raises(WrongExpectedVersion) as refused:
            await store.append_atomic([(stream, [started(sid)], 0)], before=before,
                                      require=[(session, 1)])
        assert (refused.value.stream_id, refused.value.expected, refused.value.actual) == (session, 1, 2)
        assert await store.stream_version(stream) == 0  # nothing written


async def test_concurrent_version_reads_share_statements_and_never_answer_stale(
        fresh_db: str) -> None:
    """`stream_version` is a fence's read: what was acknowledged before the call is
    counted. Reads asked while one is in flight wait for it to come back and are then
    read together (one statement, sent after they were asked); each gets its stream's
    version."""
    pool = await create_pool(fresh_db, max_size=4)
    try:
        store = EventStore(pool)
        streams = {}
        for n in range(1, 6):
            sid, stream = new_stream()
            await store.append(stream, [started(sid)] + [SessionClosed(session_id=sid, reason="x")]
                               * (n - 1), expected_version=0)
            streams[stream] = n
        blocker = await pool.acquire()
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            first = asyncio.ensure_future(store.stream_version(next(iter(streams))))
            await asyncio.sleep(0.2)  # sent, and waiting for the lock
            waiting = [asyncio.ensure_future(store.stream_version(s)) for s in streams]
            later_sid, later = new_stream()
            waiting.append(asyncio.ensure_future(store.stream_version(later)))
            await asyncio.sleep(0.2)
            assert not first.done() and not any(w.done() for w in waiting)
            # appended and committed while they wait: the batch's statement, sent once
            # the first read is back, counts it
            await store.append(later, [started(later_sid)], expected_version=0, conn=blocker)
            await tx.commit()
        finally:
            await pool.release(blocker)
        assert await first == 1
        assert await asyncio.gather(*waiting) == [*streams.values(), 1]
        # many at once, with repeats: each its own stream's version
        asked = [s for s in streams for _ in range(20)]
        assert await asyncio.gather(*(store.stream_version(s) for s in asked)) == [
            streams[s] for s in asked]
    finally:
        await pool.close()


async def test_new_event_ids_are_random_version_4_uuids(store: EventStore) -> None:
    """Ids the store makes (`new_id`, text) are what `uuid.uuid4()` makes: version 4,
    the RFC 4122 variant, all different; stored, they read back as the same UUIDs."""
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:200]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    sid, stream = new_stream()
    await store.append(stream, [started(sid), SessionClosed(session_id=sid)], expected_version=0)
    for event in await store.read_stream(stream):
        assert uuid.UUID(str(event.event_id)).version == 4


# -- a pool connection kept between statements (store.py, `_HeldConnection`) ---------------


def _in_use(pool) -> int:
    return pool.get_size() - pool.get_idle_size()


async def _settled() -> None:
    for _ in range(5):  # a release runs in a task of its own
        await asyncio.sleep(0)


async def test_a_held_connection_serves_back_to_back_statements_then_goes_back(pool) -> None:
    held = _HeldConnection(pool)
    pids = [await held.run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
            for _ in range(3)]
    assert len(set(pids)) == 1 and _in_use(pool) == 1  # one connection, kept
    await asyncio.sleep(HOLD_IDLE_S * 3)
    assert _in_use(pool) == 0  # unused for HOLD_IDLE_S: back in the pool

    with pytest.raises(asyncpg.PostgresError):  # the statement's own error: kept
        await held.run(lambda conn: conn.fetchval("SELECT 1 / 0"))
    assert _in_use(pool) == 1

    async def broken(conn) -> None:
        raise ConnectionResetError("not the statement's error")

    with pytest.raises(ConnectionResetError):  # anything else: given back at once
        await held.run(broken)
    assert _in_use(pool) == 0

    async def slow(conn) -> int:
        return await conn.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.2)")

    first, second = await asyncio.gather(held.run(slow), held.run(slow))
    assert first != second  # the second, while the first is in flight: a pool connection
    await held.close()
    await _settled()
    assert _in_use(pool) == 0


async def test_nothing_is_held_when_it_would_leave_less_than_two_connections_free(
        infra) -> None:
    small = await create_pool(infra.database_url, max_size=2)
    try:
        held = _HeldConnection(small)
        await held.run(lambda conn: conn.fetchval("SELECT 1"))
        await _settled()
        assert _in_use(small) == 0
    finally:
        await asyncio.wait_for(small.close(), 10)


async def test_a_pool_closes_while_a_store_holds_a_connection(infra) -> None:
    """The pool waits for held connections at its close: at most HOLD_IDLE_S."""
    pool = await create_pool(infra.database_url, max_size=10)
    store = EventStore(pool)
    sid, stream = new_stream()
    await store.append(stream, [started(sid)], expected_version=0)
    assert await store.stream_version(stream) == 1
    assert _in_use(pool) >= 1
    await asyncio.wait_for(pool.close(), HOLD_IDLE_S * 10)
