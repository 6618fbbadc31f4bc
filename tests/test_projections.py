"""Projections see every event once, in global order, even across crashes."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.orchestrator.read_models import PROJECTIONS
from services.orchestrator.read_models.sessions import SessionsProjection
from shared.contracts.events import RecordedEvent, SessionClosed, SessionStarted, session_stream
from shared.infra.eventstore import EventStore, Projection, ProjectionRunner
from shared.infra.eventstore.store import Notifier, create_pool
from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok


class SeenPositions(Projection):
    """Records each position it is fed; the primary key turns a double apply into an error."""

    name = "test_seen"
    tables = ("test_seen",)

    def __init__(self) -> None:
        self.order: list[int] = []

    async def apply(self, conn: asyncpg.Connection, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO test_seen (position) VALUES ($1)", event.position)
        self.order.append(event.position)


async def snapshot(pool: asyncpg.Pool) -> list[tuple]:
    rows = await pool.fetch("SELECT * FROM sessions ORDER BY session_id")
    return [tuple(r) for r in rows]


async def test_follower_never_skips_events_of_stalled_writers(fresh_db: str) -> None:
    """20 writers hold their append transactions open for random times while a
    projection follows the global order: it sees every event exactly once, in order."""
    pool = await create_pool(fresh_db, max_size=30)
    try:
        await pool.execute("CREATE TABLE test_seen (position bigint PRIMARY KEY)")
        store = EventStore(pool)
        projection = SeenPositions()
        runner = ProjectionRunner(store, [projection], batch_size=7, poll_s=0.05)
        follower = asyncio.create_task(runner.run())
        rng = random.Random(7)

        async def writer(w: int) -> None:
            for i in range(15):
                sid = f"{w}-{i}-{uuid.uuid4()}"
                async with pool.acquire() as conn, conn.transaction():
                    await asyncio.sleep(rng.random() * 0.01)  # stall before the append
                    await store.append(session_stream(sid),
                                       [SessionStarted(session_id=sid, tenant="t")],
                                       expected_version=0, conn=conn)
                    await asyncio.sleep(rng.random() * 0.03)  # stall before commit

        await asyncio.gather(*(writer(w) for w in range(20)))
        head = await store.head()
        await asyncio.wait_for(_until(lambda: runner.checkpoint(projection.name), head), 30)
        follower.cancel()

        stored = [r["position"] for r in await pool.fetch("SELECT position FROM events ORDER BY 1")]
        assert len(stored) == 300
        assert projection.order == stored  # every event, none twice, in global order
        assert await pool.fetchval("SELECT count(*) FROM test_seen") == 300
    finally:
        await pool.close()


async def test_notify_wakes_an_idle_projection_without_polling(fresh_db: str) -> None:
    """A runner that would poll only once an hour applies an append made by another
    writer (its own pool, as another process would) promptly: LISTEN/NOTIFY woke it."""
    runner_pool = await create_pool(fresh_db, max_size=3)
    writer_pool = await create_pool(fresh_db, max_size=1)
    try:
        await runner_pool.execute("CREATE TABLE test_seen (position bigint PRIMARY KEY)")
        projection = SeenPositions()
        runner = ProjectionRunner(EventStore(runner_pool), [projection], poll_s=3600)
        follower = asyncio.create_task(runner.run())
        writer = EventStore(writer_pool)
        try:
            for i in range(3):  # each append after the runner applied the one before
                sid = f"notify-{i}-{uuid.uuid4()}"
                result = await writer.append(session_stream(sid),
                                             [SessionStarted(session_id=sid, tenant="t")], 0)
                await asyncio.wait_for(_until(lambda: runner.checkpoint(projection.name),
                                              result.last_position), 20)
        finally:
            follower.cancel()
        assert len(projection.order) == 3
    finally:
        await runner_pool.close()
        await writer_pool.close()


async def test_notifications_name_their_types_and_wake_only_concerned_followers(
        fresh_db: str) -> None:
    """An append's notification names the types it wrote: a follower of other types is
    not woken by it (issue 16: an append no longer wakes every follower), one of no
    particular type sees every type, and a runner steps only the projections concerned."""
    pool = await create_pool(fresh_db, max_size=4)
    try:
        store = EventStore(pool)
        async with Notifier(pool, poll_s=3600, types=("SessionClosed",)) as closed_only, \
                Notifier(pool, poll_s=3600) as everything:
            sid = str(uuid.uuid4())
            await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="t")], 0)
            await store.append(session_stream(sid), [SessionClosed(session_id=sid, reason="r")], 1)
            # one connection gets notifications in commit order: once the second is in,
            # the first was seen (and, being of another type, left out)
            assert await asyncio.wait_for(closed_only.wait(), 20) == frozenset({"SessionClosed"})
            seen: set[str] = set()
            while "SessionClosed" not in seen:
                seen |= await asyncio.wait_for(everything.wait(), 20) or {"?"}
            assert seen == {"SessionStarted", "SessionClosed"}
        runner = ProjectionRunner(store, PROJECTIONS)
        concerned = {p.name for p in runner._concerned(frozenset({"MessageAppended"}))}
        assert concerned == {"messages"}
        assert len(runner._concerned(None)) == len(PROJECTIONS)
    finally:
        await pool.close()


class SeenOf(SeenPositions):
    """`SeenPositions` for some event types, in a table of its own."""

    def __init__(self, name: str, handles: frozenset[str], fail: bool = False) -> None:
        super().__init__()
        self.name, self.handles, self.tables, self.fail = name, handles, (name,), fail

    async def apply(self, conn: asyncpg.Connection, event: RecordedEvent) -> None:
        if self.fail:
            raise ValueError("an event this projection cannot fold")
        await conn.execute(f"INSERT INTO {self.name} (position) VALUES ($1)", event.position)
        self.order.append(event.position)


async def test_a_group_step_feeds_each_projection_its_events_once_in_order(fresh_db: str) -> None:
    """Woken for the types appended, the runner steps the projections concerned as one
    group (one transaction, one read for all of them, issue 16). With writers stalling
    their transactions and batches of 7, each projection still sees exactly its own
    events, every one once, in global order, and all checkpoints reach the head."""
    pool = await create_pool(fresh_db, max_size=30)
    try:
        started = SeenOf("test_started", frozenset({"SessionStarted"}))
        closed = SeenOf("test_closed", frozenset({"SessionClosed"}))
        both = SeenOf("test_both", frozenset({"SessionStarted", "SessionClosed"}))
        for p in (started, closed, both):
            await pool.execute(f"CREATE TABLE {p.name} (position bigint PRIMARY KEY)")
        store = EventStore(pool)
        # polled once an hour: after the first pass every step is a notified group step
        runner = ProjectionRunner(store, [started, closed, both], batch_size=7, poll_s=3600)
        follower = asyncio.create_task(runner.run())
        rng = random.Random(11)

        async def writer(w: int) -> None:
            for i in range(10):
                sid = f"{w}-{i}-{uuid.uuid4()}"
                events = [SessionStarted(session_id=sid, tenant="t")]
                if i % 3 == 0:
                    events.append(SessionClosed(session_id=sid, reason="r"))
                async with pool.acquire() as conn, conn.transaction():
                    await asyncio.sleep(rng.random() * 0.01)
                    await store.append(session_stream(sid), events, expected_version=0, conn=conn)
                    await asyncio.sleep(rng.random() * 0.03)

        await asyncio.gather(*(writer(w) for w in range(15)))
        head = await store.head()
        for p in (started, closed, both):
            await asyncio.wait_for(_until(lambda p=p: runner.checkpoint(p.name), head), 30)
        follower.cancel()

        async def positions(types: tuple[str, ...]) -> list[int]:
            return [r["position"] for r in await pool.fetch(
                "SELECT position FROM events WHERE type = ANY($1::text[]) ORDER BY 1", list(types))]

        assert started.order == await positions(("SessionStarted",))
        assert closed.order == await positions(("SessionClosed",))
        assert both.order == await positions(("SessionStarted", "SessionClosed"))
        assert len(started.order) == 150 and len(closed.order) == 60
    finally:
        await pool.close()


async def test_a_failing_projection_does_not_hold_up_its_group(fresh_db: str) -> None:
    """A projection that cannot fold an event rolls back the group step; the others of
    the group are then stepped alone and go on, while the failing one stays before it."""
    pool = await create_pool(fresh_db, max_size=6)
    try:
        good = SeenOf("test_good", frozenset({"SessionStarted"}))
        bad = SeenOf("test_bad", frozenset({"SessionStarted"}), fail=True)
        for p in (good, bad):
            await pool.execute(f"CREATE TABLE {p.name} (position bigint PRIMARY KEY)")
        store = EventStore(pool)
        runner = ProjectionRunner(store, [bad, good], poll_s=3600)
        sid = str(uuid.uuid4())
        result = await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="t")], 0)
        with pytest.raises(ValueError, match="cannot fold"):
            await runner.step_group([bad, good])
        assert await runner.checkpoint("test_good") == result.last_position
        assert good.order == [result.last_position]
        assert await runner.checkpoint("test_bad") == 0
    finally:
        await pool.close()


async def test_a_sessions_history_includes_the_answer_just_given(fresh_db: str) -> None:
    """The history sent with a session's next message is read from its conversation
    stream: an exchange whose events have committed is in it even while no projection
    has applied them yet (a client that sends its next message at once loses nothing)."""
    from services.orchestrator.read_models.messages import MessagesReadModel
    from shared.contracts.events import MessageAppended, conversation_stream

    pool = await create_pool(fresh_db, max_size=2)
    try:
        store = EventStore(pool)
        sid = str(uuid.uuid4())
        await store.append(conversation_stream(sid), [
            MessageAppended(session_id=sid, message_id="m1", role="user", content="hello"),
            MessageAppended(session_id=sid, message_id="m2", role="assistant", content="",
                            tool_calls=({"id": "c1", "type": "function",
                                         "function": {"name": "f", "arguments": "{}"}},)),
        ], expected_version=0)
        history = await MessagesReadModel(store).history(sid)  # no runner is running
        assert [(m.role, m.content) for m in history] == [("user", "hello"), ("assistant", "")]
        assert history[1].tool_calls == [{"id": "c1", "type": "function",
                                          "function": {"name": "f", "arguments": "{}"}}]
    finally:
        await pool.close()


async def test_the_notifiers_of_a_process_share_one_listen_connection(fresh_db: str) -> None:
    """However many followers a process runs, one Postgres backend listens for them
    (a NOTIFY wakes one backend per process, issue 16); each follower still gets its
    types, and when that connection is killed every follower re-listens and is told
    that it may have missed something (None: catch up on everything)."""
    pool = await create_pool(fresh_db, max_size=6)
    other = await create_pool(fresh_db, max_size=2)
    try:
        store = EventStore(other)

        async def listening() -> list[int]:
            return [r["pid"] for r in await other.fetch(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = current_database()")]

        async with Notifier(pool, poll_s=3600, types=("SessionClosed",)) as closed, \
                Notifier(pool, poll_s=3600, types=("SessionStarted",)) as started_n, \
                Notifier(pool, poll_s=3600) as everything:
            assert len(await listening()) == 1
            sid = str(uuid.uuid4())
            await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="t")], 0)
            await store.append(session_stream(sid), [SessionClosed(session_id=sid, reason="r")], 1)
            assert await asyncio.wait_for(closed.wait(), 20) == frozenset({"SessionClosed"})
            assert await asyncio.wait_for(started_n.wait(), 20) == frozenset({"SessionStarted"})
            seen: set[str] = set()
            while "SessionClosed" not in seen:
                seen |= await asyncio.wait_for(everything.wait(), 20) or {"?"}
            [pid] = await listening()
            await other.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.5)  # the client sees its connection gone
            waits = [asyncio.create_task(n.wait()) for n in (closed, started_n, everything)]
            await asyncio.sleep(0.5)  # they listen again, on a new connection
            sid = str(uuid.uuid4())
            await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="t"),
                                                     SessionClosed(session_id=sid, reason="r")], 0)
            # woken by the append, each is told it may have missed others: None, not a type
            assert await asyncio.wait_for(asyncio.gather(*waits), 20) == [None, None, None]
            assert len(await listening()) == 1 and (await listening())[0] != pid
        assert await listening() == []  # the last one out gives the connection back
    finally:
        await pool.close()
        await other.close()


class CountingSteps(ProjectionRunner):
    """A runner that counts the steps taken outside its own loop (by `wait_for`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiter_steps = 0

    async def step(self, projection: Projection) -> int:
        if asyncio.current_task() is not self.loop_task:
            self.waiter_steps += 1
        return await super().step(projection)


async def test_read_your_writes_waits_share_the_running_runners_step(fresh_db: str) -> None:
    """`wait_for` (a request's read-your-writes) leaves the work to the running runner,
    which the append's notification wakes: 20 requests waiting at once for their own
    appends take no step of their own (they used to take one each, queueing on the
    checkpoint's row lock). Without a running runner, `wait_for` steps by itself."""
    pool = await create_pool(fresh_db, max_size=10)
    try:
        store = EventStore(pool)
        runner = CountingSteps(store, [SessionsProjection()], poll_s=3600)
        runner.runner_wait_s = 30.0  # never falls back to stepping, however slow the machine
        runner.loop_task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.3)

        async def create_and_read(i: int) -> bool:
            sid = str(uuid.uuid4())
            result = await store.append(session_stream(sid),
                                        [SessionStarted(session_id=sid, tenant=f"ryw-{i}")], 0)
            await runner.wait_for(result.last_position, names=("sessions",))
            return await pool.fetchval("SELECT EXISTS (SELECT 1 FROM sessions WHERE session_id = $1)", sid)

        assert all(await asyncio.wait_for(asyncio.gather(*(create_and_read(i) for i in range(20))), 60))
        assert runner.waiter_steps == 0
        runner.loop_task.cancel()

        idle = CountingSteps(store, [SessionsProjection()], poll_s=3600)  # not running
        idle.loop_task = None
        sid = str(uuid.uuid4())
        result = await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="ryw")], 0)
        await idle.wait_for(result.last_position, names=("sessions",))
        assert idle.waiter_steps >= 1
        assert await pool.fetchval("SELECT EXISTS (SELECT 1 FROM sessions WHERE session_id = $1)", sid)
    finally:
        await pool.close()


class CountingGroups(ProjectionRunner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_steps = 0

    async def step_group(self, projections) -> int:
        self.group_steps += 1
        return await super().step_group(projections)


async def test_appends_close_together_are_applied_in_one_step_unless_a_request_waits(
        fresh_db: str) -> None:
    """With a coalescing window, the appends that follow a wake-up within it are applied
    in the same step (issue 16: fewer, larger steps); a request waiting for its own
    write (read-your-writes) does not wait for the window."""
    pool = await create_pool(fresh_db, max_size=6)
    try:
        store = EventStore(pool)
        runner = CountingGroups(store, [SessionsProjection()], poll_s=3600, coalesce_s=3.0)
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.3)
        for _ in range(5):
            sid = str(uuid.uuid4())
            last = await store.append(session_stream(sid),
                                      [SessionStarted(session_id=sid, tenant="coalesce")], 0)
        await asyncio.wait_for(_until(lambda: runner.checkpoint("sessions"), last.last_position), 30)
        assert runner.group_steps == 1

        runner.coalesce_s = 30.0  # a window longer than the wait below allows
        runner.runner_wait_s = 25.0  # and no stepping of its own: only the runner applies
        sid = str(uuid.uuid4())
        last = await store.append(session_stream(sid),
                                  [SessionStarted(session_id=sid, tenant="coalesce")], 0)
        await asyncio.wait_for(runner.wait_for(last.last_position, names=("sessions",),
                                                timeout=20), 20)
        task.cancel()
    finally:
        await pool.close()


async def _until(read, target: int) -> None:
    while await read() < target:
        await asyncio.sleep(0.02)


async def _fill(store: EventStore, sessions: int) -> list[str]:
    sids = [str(uuid.uuid4()) for _ in range(sessions)]
    for i, sid in enumerate(sids):
        events = [SessionStarted(session_id=sid, tenant="crash", metadata={"i": str(i)})]
        if i % 2:
            events.append(SessionClosed(session_id=sid, reason=f"r{i}"))
        await store.append(session_stream(sid), events, expected_version=0)
    return sids


@pytest.mark.slow
async def test_projection_killed_mid_catch_up_resumes_exactly_once(infra, fresh_db: str,
                                                                   tmp_path) -> None:
    pool = await create_pool(fresh_db, max_size=5)
    try:
        store = EventStore(pool)
        runner = ProjectionRunner(store, PROJECTIONS)
        await _fill(store, 1500)  # 2250 events
        head = await store.head()

        port = free_port_str()
        env = service_env(infra.nats_url, fresh_db, NEXUS_HTTP_PORT=port,
                          NEXUS_PROJECTION_BATCH_SIZE="10")
        proc = ServiceProc("orchestrator", env, tmp_path / "o1.log").start()
        # Kill -9 as soon as the projection is part-way through the log.
        seen = 0
        for _ in range(2000):
            seen = await runner.checkpoint("sessions")
            if 0 < seen < head:
                break
            await asyncio.sleep(0.005)
        proc.kill()
        assert 0 < seen < head, f"projection was not caught mid-way (checkpoint {seen}, head {head})"
        killed_at = await runner.checkpoint("sessions")
        assert killed_at < head

        proc = ServiceProc("orchestrator", env, tmp_path / "o2.log").start()
        wait_http_ok(f"http://127.0.0.1:{port}/health", proc=proc)
        await asyncio.wait_for(_until(lambda: runner.checkpoint("sessions"), head), 60)
        assert proc.stop() == 0

        live = await snapshot(pool)
        assert len(live) == 1500
        # event_count == stream version only if no event was applied twice
        assert await pool.fetchval("SELECT count(*) FROM sessions WHERE event_count <> version") == 0
        await runner.rebuild("sessions")
        assert await snapshot(pool) == live
    finally:
        await pool.close()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.integers(0, 7)),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("step"), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_projection_equals_its_rebuild(fresh_db: str, ops: list[tuple[str, int]]) -> None:
    """Property: however appends and projection steps interleave, the incrementally
    maintained read model equals a rebuild from position 0."""

    async def scenario() -> None:
        pool = await create_pool(fresh_db, max_size=3)
        try:
            store = EventStore(pool)
            runner = ProjectionRunner(store, [SessionsProjection()], batch_size=3)
            run_id = uuid.uuid4().hex[:8]
            for op, n in ops:
                sid = f"{run_id}-{n}"
                stream = session_stream(sid)
                version = await store.stream_version(stream)
                if op == "start" and version == 0:
                    await store.append(stream, [SessionStarted(session_id=sid, tenant="p")], 0)
                elif op == "close" and version > 0:
                    await store.append(stream, [SessionClosed(session_id=sid, reason=str(version))],
                                       version)
                elif op == "step":
                    await runner.step(runner.projections["sessions"])
            await runner.catch_up()
            live = await snapshot(pool)
            await runner.rebuild("sessions")
            assert await snapshot(pool) == live
        finally:
            await pool.close()

    asyncio.run(scenario())


async def test_sessions_applied_in_batches_equal_one_by_one(fresh_db: str) -> None:
    """The sessions projection writes a step's started sessions in one statement (issue
    16); with closes in between (of sessions of the same step too), the table ends
    exactly as one `apply` per event leaves it."""
    pool = await create_pool(fresh_db, max_size=3)
    try:
        store = EventStore(pool)
        projection = SessionsProjection()
        sids = [f"batch-{uuid.uuid4().hex[:8]}-{i}" for i in range(7)]
        for i, sid in enumerate(sids):
            events = [SessionStarted(session_id=sid, tenant="b", policy_rules={"i": i} if i % 2 else None,
                                     metadata={"i": str(i)})]
            if i in (1, 4):  # closed in the same step, between runs of starts
                events.append(SessionClosed(session_id=sid, reason=f"r{i}"))
            await store.append(session_stream(sid), events, expected_version=0)
        await ProjectionRunner(store, [projection]).catch_up()  # one step: apply_batch
        batched = await snapshot(pool)
        assert len(batched) == 7 and sum(row[2] == "closed" for row in batched) == 2
        async with pool.acquire() as conn, conn.transaction():
            await projection.reset(conn)
            for rec in await store.read_all(0, 1000, types=sorted(projection.handles)):
                await projection.apply(conn, rec)
        assert await snapshot(pool) == batched
    finally:
        await pool.close()


def test_a_budget_rows_state_decodes_to_the_state_that_was_written() -> None:
    """The budgets row's `state` column as Postgres gives it back (jsonb text: its own key
    order and spacing) decodes to the state the fold wrote, leases and reservations
    typed; a row written before leases and overruns existed takes their defaults."""
    import json

    import msgspec

    from services.orchestrator.read_models.budgets import _budget_from_json
    from shared.domain.budget import BudgetState, Lease, Reservation

    state = BudgetState(
        budget_id="budget-session-s", scope="session", owner="s", period=None,
        limit_micro_usd=5_000_000, limit_tokens=None, version=42, reserved_micro_usd=700,
        reserved_tokens=20, committed_micro_usd=1234, committed_tokens=56,
        reservations={"call-1": Reservation(micro_usd=700, tokens=20, expires_at=1.5e9)},
        overrun_micro_usd=3, overrun_tokens=1, overruns=1, lapsed=("call-0",),
        leases={"lease-1": Lease(micro_usd=900, tokens=0, expires_at=1.7e9 + 0.25,
                                 instance="orchestrator-1.ab")},
        leased_micro_usd=900)
    as_jsonb = json.dumps(msgspec.to_builtins(state), sort_keys=True)
    assert _budget_from_json(as_jsonb) == state
    old = {"budget_id": "budget-session-o", "scope": "session", "owner": "o", "period": None,
           "limit_micro_usd": None, "limit_tokens": 100, "version": 3,
           "reserved_micro_usd": 0, "reserved_tokens": 10, "committed_micro_usd": 0,
           "committed_tokens": 7, "reservations": {"c": {"micro_usd": 0, "tokens": 10,
                                                          "expires_at": 1700000000}}}
    decoded = _budget_from_json(json.dumps(old))
    assert decoded.leases == {} and decoded.lapsed == () and decoded.overruns == 0
    assert decoded.reservations == {"c": Reservation(micro_usd=0, tokens=10,
                                                     expires_at=1700000000.0)}
