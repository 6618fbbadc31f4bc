"""A call's settle in one transaction (budget_manager.py, calls.py): the conversation
rides the last budget commit, also when that commit is refused and decided again."""

from __future__ import annotations

import uuid
from typing import Any

from services.orchestrator.budget_manager import BudgetManager, Charge
from shared.contracts.events import (
    MessageAppended,
    Metadata,
    SessionStarted,
    conversation_stream,
    session_stream,
)
from shared.domain.budget import SESSION, TENANT, budget_stream_for_session, decide_open, fold_budget
from shared.infra.eventstore import EventStore

TENANT_ID = "t-settle"
META = Metadata(tenant=TENANT_ID, actor="tester")


async def session_with_budget(store: EventStore) -> tuple[str, str]:
    sid = str(uuid.uuid4())
    stream = budget_stream_for_session(sid)
    await store.append_atomic([
        (session_stream(sid), [SessionStarted(session_id=sid, tenant=TENANT_ID)], 0),
        (stream, decide_open(None, stream, SESSION, sid, limit_micro_usd=10_000_000), 0)], META)
    return sid, stream


def conversation(sid: str, call_id: str) -> list:
    return [(conversation_stream(sid), [
        MessageAppended(session_id=sid, message_id=str(uuid.uuid4()), role="user",
                        content="hi", call_id=call_id),
        MessageAppended(session_id=sid, message_id=str(uuid.uuid4()), role="assistant",
                        content="hello", call_id=call_id)], None)]


async def transactions(pool: Any, *streams: str) -> list[tuple[str, str, str]]:
    """(stream, type, inserting transaction id) of every event of `streams`."""
    rows = await pool.fetch("SELECT stream_id, type, xmin::text AS tx FROM events"
                            " WHERE stream_id = ANY($1::text[]) ORDER BY position", list(streams))
    return [(r["stream_id"], r["type"], r["tx"]) for r in rows]


async def test_a_refused_commit_is_decided_again_with_the_conversation_attached(
        store: EventStore, pool: Any) -> None:
    sid, stream = await session_with_budget(store)
    mine, other = BudgetManager(store), BudgetManager(store)  # two orchestrator replicas
    charge = Charge("call-a", (stream,), TENANT_ID, sid)
    await mine.reserve(charge, 1_000, 100, META)
    # another replica moves the budget on: `mine`'s cached state is stale, so its first
    # commit is refused (a version conflict) and decided again on the caught-up state
    await other.reserve(Charge("call-b", (stream,), TENANT_ID, sid), 1_000, 100, META)
    commits = await mine.commit(charge, 800, 90, META, with_events=conversation(sid, "call-a"))
    assert [c.call_id for c in commits] == ["call-a"]
    rows = await transactions(pool, stream, conversation_stream(sid))
    committed = [tx for s, t, tx in rows if t == "BudgetCommitted"]
    messages = [tx for s, t, tx in rows if t == "MessageAppended"]
    assert len(committed) == 1 and len(messages) == 2  # exactly once
    assert set(messages) == set(committed)  # in the commit's transaction


async def test_the_conversation_rides_the_last_of_two_budgets(store: EventStore, pool: Any) -> None:
    sid, session_budget = await session_with_budget(store)
    tenant = f"t-settle-{uuid.uuid4().hex[:8]}"
    month = f"budget-tenant-{tenant}-2030-01"
    await store.append(month, decide_open(None, month, TENANT, tenant, limit_micro_usd=10_000_000,
                                          period="2030-01"), expected_version=0, metadata=META)
    budgets = BudgetManager(store)
    charge = Charge("call-c", (session_budget, month), tenant, sid)
    await budgets.reserve(charge, 1_000, 100, META)
    await budgets.commit(charge, 500, 50, META, with_events=conversation(sid, "call-c"))
    rows = await transactions(pool, session_budget, month, conversation_stream(sid))
    by_stream = {s: tx for s, t, tx in rows if t == "BudgetCommitted"}
    messages = {tx for s, t, tx in rows if t == "MessageAppended"}
    assert len(by_stream) == 2 and messages == {by_stream[month]}
    assert by_stream[session_budget] != by_stream[month]  # one commit per budget, in order


async def test_nothing_to_commit_leaves_the_conversation_recorded_alone(
        store: EventStore, pool: Any) -> None:
    sid, stream = await session_with_budget(store)
    budgets = BudgetManager(store)
    charge = Charge("call-d", (stream,), TENANT_ID, sid)
    await budgets.reserve(charge, 1_000, 100, META)
    await budgets.release(charge, "failed", META)  # settled already: nothing left to commit
    assert await budgets.commit(charge, 500, 50, META,
                                with_events=conversation(sid, "call-d")) == []
    rows = await transactions(pool, stream, conversation_stream(sid))
    assert [t for _, t, _ in rows if t in ("MessageAppended", "BudgetCommitted")] == \
        ["MessageAppended"] * 2



async def folded_to(store: EventStore, stream: str, version: int) -> Any:
    state = None
    for rec in await store.read_stream(stream):
        if rec.stream_version <= version:
            state = fold_budget(state, rec.event, rec.stream_version)
    return state


async def test_leased_commits_keep_the_cached_budget_current_and_true(store: EventStore) -> None:
    """A call admitted from a lease commits without a version check; its commit is folded
    into the process's cached state when that state is the one just before it, so the
    next lease is decided without reading the commits back. Another replica's commits in
    between leave the cache behind, and the next read catches up. Either way the cached
    state is the fold of the stored events up to its version."""
    sid, stream = await session_with_budget(store)
    mine = BudgetManager(store, lease_calls=4)
    other = BudgetManager(store, lease_calls=4)  # a second orchestrator on the same budget
    for i in range(6):  # one lease (its first slice is for 8 calls), this replica alone
        charge = Charge(f"alone-{i}", (stream,), TENANT_ID, sid)
        await mine.reserve(charge, 1_000, 100, META)
        assert mine.leased(charge.call_id)
        await mine.commit(charge, 700, 60, META)
        cached = await mine.state(stream, cached=True)
        assert cached.version == await store.stream_version(stream)  # current, nothing read
        assert cached == await folded_to(store, stream, cached.version)
    for i in range(40):  # both replicas, their leases used up, returned and taken again
        budgets = other if i % 9 == 8 else mine
        charge = Charge(f"call-{i}", (stream,), TENANT_ID, sid)
        await budgets.reserve(charge, 1_000, 100, META)
        assert budgets.leased(charge.call_id)
        await budgets.commit(charge, 700 + i, 60, META)
        for replica in (mine, other):
            cached = await replica.state(stream, cached=True)
            if cached is not None:
                assert cached == await folded_to(store, stream, cached.version), i
    final = await BudgetManager(store).state(stream)
    assert final.committed_micro_usd == 6 * 700 + sum(700 + i for i in range(40))
    caught = await mine.state(stream)  # caught up (a lease return may land meanwhile)
    assert caught.version >= final.version
    assert caught == await folded_to(store, stream, caught.version)
