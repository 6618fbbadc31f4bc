"""State an orchestrator keeps stays bounded: rate windows are pruned, budget states are
an LRU reloaded from the events. Real Postgres; time comes from an injected clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.orchestrator.budget_manager import BudgetManager, Charge
from services.orchestrator.ratelimits import RateCounter
from shared.domain.budget import SESSION, budget_stream_for_session, decide_open, fold_budget
from shared.contracts.events import BudgetExceeded, Metadata
from shared.infra.eventstore import EventStore
from shared.infra.eventstore.store import create_pool

T0 = 1_800_000_000.0  # a minute boundary (divisible by 60)
META = Metadata(tenant="t1", actor="test")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator:
    pool = await create_pool(fresh_db, max_size=8)
    yield pool
    await pool.close()


async def test_calls_per_minute_hold_across_processes_and_reopen_next_minute(db) -> None:
    clock = Clock(T0 + 59.5)  # half a second before the boundary, and no waiting for it
    one, two = RateCounter(db, clock), RateCounter(db, clock)  # two orchestrator processes
    admitted = [await (one if i % 2 else two).admit("session", "s1", 3) for i in range(7)]
    assert admitted.count(True) == 3
    usage = await one.usage({"session": "s1"})
    assert usage.session.calls == 3
    clock.now = T0 + 60.0  # the next minute: a fresh window
    assert (await two.usage({"session": "s1"})).session.calls == 0
    assert [await one.admit("session", "s1", 3) for _ in range(4)] == [True] * 3 + [False]
    await one.add_tokens({"session": "s1"}, 42)
    assert (await two.usage({"session": "s1"})).session.tokens == 42


async def test_expired_rate_windows_are_pruned(db) -> None:
    clock = Clock(T0)
    rates = RateCounter(db, clock)
    for minute in range(3):
        clock.now = T0 + 60 * minute
        for subject in ("a", "b"):
            assert await rates.admit("key", subject, None)
    # the admissions of each new minute pruned what ended before the previous one
    rows = await db.fetch("SELECT subject, window_start FROM rate_windows ORDER BY 2, 1")
    assert len(rows) == 4 and {r["window_start"].timestamp() for r in rows} == {T0 + 60, T0 + 120}
    clock.now = T0 + 60 * 10  # later, with no traffic at all
    assert await rates.prune() == 4
    assert await db.fetchval("SELECT count(*) FROM rate_windows") == 0


async def test_budget_states_are_an_lru_reloaded_from_the_events(db) -> None:
    store = EventStore(db)
    sessions = [f"s{i}" for i in range(8)]
    for sid in sessions:
        stream = budget_stream_for_session(sid)
        await store.append(stream, decide_open(None, stream, SESSION, sid, limit_tokens=100),
                           expected_version=0, metadata=META)
    mine = BudgetManager(store, cache_size=3)
    other = BudgetManager(store, cache_size=3)  # another orchestrator process
    for i, sid in enumerate(sessions):
        await mine.reserve(Charge(f"c{i}", (budget_stream_for_session(sid),), "t1", sid),
                           0, 60, META)
        assert mine.cached_streams() <= 3 and len(mine._locks) <= 3
    # s0 was evicted long ago; meanwhile the other process spends on it
    first = budget_stream_for_session("s0")
    await other.commit(Charge("c0", (first,), "t1", "s0"), 0, 30, META)
    await other.reserve(Charge("x", (first,), "t1", "s0"), 0, 60, META)
    # reloaded from the events: 30 committed + 60 reserved leave 10, so 20 is denied
    with pytest.raises(Exception) as denied:
        await mine.reserve(Charge("late", (first,), "t1", "s0"), 0, 20, META)
    assert "20 tokens requested, 10 tokens available" in str(denied.value)
    state = None
    for rec in await store.read_stream(first):
        state = fold_budget(state, rec.event, rec.stream_version)
    assert await mine.state(first) == state
    assert mine.cached_streams() <= 3
    [denial] = [r.event for r in await store.read_stream("llmcall-late")]
    assert isinstance(denial, BudgetExceeded)
