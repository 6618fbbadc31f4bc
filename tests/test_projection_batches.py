"""Batched projection steps (issue 16): a projection's `apply_batch` leaves its tables
exactly as `apply` one event at a time, and the poll pass's one "who has work?" query
answers as the per-projection query did."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.orchestrator.read_models.budgets import BudgetsProjection
from services.orchestrator.read_models.messages import MessagesProjection
from services.orchestrator.read_models.routing import RoutingStatsProjection
from shared.contracts.events import (
    BudgetCommitted,
    BudgetExceeded,
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetLimitChanged,
    BudgetOpened,
    BudgetReleased,
    BudgetReserved,
    CallFeedback,
    LLMCallCompleted,
    MessageAppended,
    Metadata,
    ModelRouted,
    RecordedEvent,
    SessionClosed,
    SessionStarted,
    session_stream,
)
from shared.infra.eventstore import EventStore, Projection, ProjectionRunner
from shared.infra.eventstore.store import create_pool

BATCHED: tuple[Projection, ...] = (MessagesProjection(), BudgetsProjection(), RoutingStatsProjection())
# a second orchestrator's instances: batched steps alternate between the two (each
# instance remembers what it wrote; the other's writes make that stale)
OTHER: tuple[Projection, ...] = (MessagesProjection(), BudgetsProjection(), RoutingStatsProjection())
TABLES = {"messages": "position", "budgets": "budget_id", "routed_calls": "call_id",
          "routing_stats": "tenant, cluster, model"}

_small = st.integers(0, 3)
_amount = st.integers(-5, 3_000)
_budget_events = st.one_of(
    st.builds(lambda b, lim, tok: BudgetOpened(budget_id=f"b{b}", scope="session", owner=f"s{b}",
                                                limit_micro_usd=lim, limit_tokens=tok),
              st.integers(0, 1), st.none() | _amount, st.none() | _amount),
    st.builds(lambda b, c, u, t, x: BudgetReserved(budget_id=f"b{b}", call_id=f"c{c}", micro_usd=u,
                                                    tokens=t, expires_at=x, instance="i1"),
              st.integers(0, 1), _small, _amount, _amount, st.floats(0, 2e9)),
    st.builds(lambda b, c, u, t, o, lease: BudgetCommitted(
        budget_id=f"b{b}", call_id=f"c{c}", micro_usd=u, tokens=t, overrun_micro_usd=o,
        lease=lease), st.integers(0, 1), _small, _amount, _amount, _amount,
        st.none() | st.sampled_from(["l0", "l1"])),
    st.builds(lambda b, c, r: BudgetReleased(budget_id=f"b{b}", call_id=f"c{c}", reason=r),
              st.integers(0, 1), _small, st.sampled_from(["failed", "expired", "orchestrator-lost"])),
    st.builds(lambda b, c: BudgetExceeded(budget_id=f"b{b}", call_id=f"c{c}", requested_micro_usd=1,
                                          requested_tokens=1, available_micro_usd=0,
                                          available_tokens=None, reason="limit"),
              st.integers(0, 1), _small),
    st.builds(lambda b, lim: BudgetLimitChanged(budget_id=f"b{b}", limit_micro_usd=lim,
                                                limit_tokens=None),
              st.integers(0, 1), st.none() | _amount),
    st.builds(lambda b, lease, u, x: BudgetLeased(budget_id=f"b{b}", lease_id=f"l{lease}",
                                                  micro_usd=u, tokens=u, expires_at=x),
              st.integers(0, 1), st.integers(0, 1), _amount, st.floats(0, 2e9)),
    st.builds(lambda b, lease: BudgetLeaseReturned(budget_id=f"b{b}", lease_id=f"l{lease}",
                                                   reason="idle"),
              st.integers(0, 1), st.integers(0, 1)),
)
_text = st.text(max_size=8)
_message = st.builds(
    lambda s, role, content, call, cost, tools, run: MessageAppended(
        session_id=f"s{s}", message_id=uuid.uuid4().hex, role=role, content=content,
        call_id=call, model=call and "m", input_tokens=cost, output_tokens=cost,
        cost_micro_usd=cost, finish_reason=call and "stop", tool_calls=tools,
        tool_call_id=run, run_id=run),
    st.integers(0, 1), st.sampled_from(["user", "assistant", "tool"]), _text,
    st.none() | st.sampled_from(["c0", "c1"]), st.none() | st.integers(0, 10**6),
    st.none() | st.lists(st.dictionaries(st.sampled_from(["id", "name"]), _text, max_size=2),
                         max_size=2).map(tuple),
    st.none() | st.sampled_from(["r1"]))
_call = st.integers(0, 1)  # few calls: completions of one call meet in a step
_routing = st.one_of(
    st.builds(lambda c, cluster, pick, how: ModelRouted(
        call_id=f"c{c}", session_id="s0", requested="auto", skill="sk", matched_by=how,
        cluster=cluster, pick=pick), _call, st.sampled_from(["k0", "k1"]),
        st.sampled_from(["m0", "m1"]), st.sampled_from(["explicit", "auto"])),
    st.builds(lambda c, cost, lat: LLMCallCompleted(
        call_id=f"c{c}", session_id="s0", model="m", provider="p", target="t", node=None,
        latency_ms=lat, ttft_ms=None, input_tokens=1, output_tokens=1, usage_estimated=False,
        cost_micro_usd=cost, finish_reason="stop", attempts=1),
        _call, st.integers(0, 10**6), st.floats(0, 1e5, allow_nan=False)),
    st.builds(lambda c, score: CallFeedback(call_id=f"c{c}", score=score),
              _call, st.floats(0, 1)),
)
# (event, tenant, replayed: an older stream version delivered again)
_ops = st.lists(st.tuples(st.one_of(_budget_events, _budget_events, _message, _routing),
                          st.sampled_from(["t0", "t1", None]), st.booleans()), max_size=40)


def _recorded(ops: list) -> list[RecordedEvent]:
    """The ops as the store would record them: positions in order, versions per stream."""
    versions: dict[str, int] = {}
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    out = []
    for i, (event, tenant, replayed) in enumerate(ops, start=1):
        stream = getattr(event, "budget_id", None) or f"other-{getattr(event, 'call_id', '')}"
        version = versions.get(stream, 0) + 1
        if replayed and version > 1:
            version -= 1  # duplicate delivery: the fold ignores it
        else:
            versions[stream] = version
        out.append(RecordedEvent(position=i, event_id=uuid.uuid4(), stream_id=stream,
                                 stream_version=version, type=type(event).__name__, event=event,
                                 metadata=Metadata(tenant=tenant),
                                 recorded_at=t0 + timedelta(milliseconds=i)))
    return out


async def _tables(conn: asyncpg.Connection) -> dict[str, list[tuple]]:
    return {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY {key}")]
            for t, key in TABLES.items()}


async def _fold(conn: asyncpg.Connection, events: list[RecordedEvent],
                steps: list[tuple[int, bool]] | None) -> dict[str, list[tuple]] | type[BaseException]:
    """The tables after folding `events` one by one (steps None) or in batches of
    `steps` (size, by the other instance of each projection: as two orchestrators' runners
    take turns), inside a transaction rolled back after; or the error raised."""
    tx = conn.transaction()
    await tx.start()
    try:
        chunks, i = [], 0
        for size, other in steps or []:
            chunks.append((events[i:i + size], other))
            i += size
        chunks.append((events[i:], False))
        for chunk, other in chunks:
            for projection in OTHER if other else BATCHED:
                mine = [e for e in chunk if e.type in projection.handles]
                if steps is None:
                    for e in mine:
                        await projection.apply(conn, e)
                elif mine:
                    await projection.apply_batch(conn, mine)
        return await _tables(conn)
    except (asyncpg.PostgresError, ValueError, TypeError) as exc:
        return type(exc)
    finally:
        await tx.rollback()


_OPENED = BudgetOpened(budget_id="b0", scope="session", owner="s0", limit_micro_usd=100)
_RESERVED = BudgetReserved(budget_id="b0", call_id="c0", micro_usd=5, tokens=5, expires_at=1.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# one runner writes a budget, the other changes it, the first folds its next event
@example(ops=[(_OPENED, "t0", False), (_RESERVED, "t0", False),
              (BudgetCommitted(budget_id="b0", call_id="c0", micro_usd=3, tokens=3), "t0", False),
              (_RESERVED, "t0", True)],
         steps=[(1, False), (1, True), (1, False), (1, False)])
@given(ops=_ops, steps=st.lists(st.tuples(st.integers(1, 12), st.booleans()), max_size=8))
def test_batched_apply_equals_one_by_one(fresh_db: str, ops: list,
                                         steps: list[tuple[int, bool]]) -> None:
    """Property: for random sequences of the events a call brings (messages, budget
    events incl. leases and replays, routing decisions, completions and feedback), cut
    into random steps taken by either of two runners, each batched projection's tables
    equal those of `apply` one event at a time: column for column, the jsonb state text
    included. The instances live across examples and their transactions roll back: what
    a budgets instance remembers having written is often stale, as after a failed step."""
    events = _recorded(ops)

    async def scenario() -> None:
        conn = await asyncpg.connect(fresh_db)
        try:
            expected = await _fold(conn, events, None)
            assert await _fold(conn, events, steps) == expected
            assert await _fold(conn, events, [(len(events), False)]) == expected
        finally:
            await conn.close()

    asyncio.run(scenario())


class Seen(Projection):
    def __init__(self, name: str, handles: frozenset[str] | None) -> None:
        self.name, self.handles = name, handles

    async def apply(self, conn: asyncpg.Connection, event: RecordedEvent) -> None:
        pass


async def test_the_poll_pass_asks_who_has_work_in_one_query(fresh_db: str) -> None:
    """`_with_work` (one query for all projections) names exactly the projections with
    handled events after their checkpoint (`pending`, a count), as appends and steps
    move heads and checkpoints; `_has_work` (one projection) agrees."""
    pool = await create_pool(fresh_db, max_size=3)
    try:
        store = EventStore(pool)
        projections = [Seen("p_started", frozenset({"SessionStarted"})),
                       Seen("p_closed", frozenset({"SessionClosed"})),
                       Seen("p_both", frozenset({"SessionStarted", "SessionClosed"})),
                       Seen("p_none", frozenset({"NeverAppended"})),
                       Seen("p_all", None)]
        runner = ProjectionRunner(store, projections)

        async def agree() -> list[str]:
            with_work = [p.name for p in await runner._with_work(projections)]
            assert with_work == [p.name for p in projections if await runner.pending(p.name)]
            assert with_work == [p.name for p in projections if await runner._has_work(p)]
            return with_work

        assert await agree() == []
        sid = uuid.uuid4().hex
        await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="t")], 0)
        assert await agree() == ["p_started", "p_both", "p_all"]
        await runner.step(projections[0])
        await runner.step(projections[4])
        assert await agree() == ["p_both"]
        await store.append(session_stream(sid), [SessionClosed(session_id=sid, reason="r")], 1)
        assert await agree() == ["p_closed", "p_both", "p_all"]
        for p in projections:
            await runner.step(p)
        assert await agree() == []
    finally:
        await pool.close()
