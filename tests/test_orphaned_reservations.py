"""Orphaned reservations: a lost orchestrator's budget reservations are released by the
survivor within seconds (not the reservation TTL), fenced and exactly once, and a
stalled but living orchestrator is never taken for lost.

The domain decision is checked pure, the fence and the idempotence with managers of
"several processes" (two survivors and the lost one's late commits) racing on a real
Postgres, and the whole with real processes: two orchestrators, a call held in flight
through one, `kill -9` of it (and, first, `SIGSTOP` of it for longer than the grace
period, which must change nothing).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from services.orchestrator.budget_manager import BudgetManager, Charge
from services.orchestrator.read_models.budgets import BudgetsProjection
from shared.contracts import subjects
from shared.contracts.events import BudgetCommitted, BudgetReleased, BudgetReserved, Metadata
from shared.domain.budget import (
    ORCHESTRATOR_LOST,
    SESSION,
    budget_stream_for_session,
    budget_stream_for_tenant,
    decide_open,
    decide_release_instance,
    decide_reserve,
    fold_budget_events,
    month_period,
)
from shared.infra.eventstore import EventStore, ProjectionRunner
from shared.infra.eventstore.store import create_pool
from tests.conftest import new_database
from tests.llm_cluster import LLMCluster, start_llm_cluster
from tests.support import wait_until

META = Metadata(tenant="t1", actor="test")
LOST_AFTER_S = 2.0  # the grace period the cluster below runs with
PROMPT = [{"role": "user", "content": "hi"}]


# -- the decision -------------------------------------------------------------------------


def test_only_the_lost_instances_open_reservations_are_released() -> None:
    opened = decide_open(None, "b1", SESSION, "s1", limit_tokens=1000)
    log = [*opened]
    state = fold_budget_events(log)
    for call, instance in (("a1", "dead.1"), ("b1", "alive.2"), ("a2", "dead.1"), ("old", None)):
        log += decide_reserve(fold_budget_events(log), call, 0, 10, 100.0, 600, instance)
    state = fold_budget_events(log)
    assert state.reservations["a1"].instance == "dead.1"
    assert state.reservations["old"].instance is None  # reserved before instances were recorded
    assert decide_release_instance(state, "dead.1") == [
        BudgetReleased(budget_id="b1", call_id="a1", reason=ORCHESTRATOR_LOST),
        BudgetReleased(budget_id="b1", call_id="a2", reason=ORCHESTRATOR_LOST)]
    released = fold_budget_events([(e, state.version + i) for i, e in enumerate(
        decide_release_instance(state, "dead.1"), 1)], state)
    assert set(released.reservations) == {"b1", "old"} and released.reserved_tokens == 20
    assert decide_release_instance(released, "dead.1") == []  # nothing twice
    assert decide_release_instance(state, "nobody") == []
    assert decide_release_instance(None, "dead.1") == []


def test_an_old_reservation_event_still_decodes() -> None:
    import msgspec

    from shared.contracts.events import AnyEvent

    old = b'{"type":"BudgetReserved","budget_id":"b","call_id":"c","micro_usd":1,"tokens":2,"expires_at":3.0}'
    event = msgspec.json.decode(old, type=AnyEvent)
    assert isinstance(event, BudgetReserved) and event.instance is None


def test_liveness_subjects_are_single_tokens() -> None:
    subject = subjects.orchestrator_instance("host.example.com-12.ab12cd34")
    assert subject == f"{subjects.ORCHESTRATOR_INSTANCE_PREFIX}.host_example_com-12_ab12cd34"
    assert subjects.orchestrator_instance("a b*>") == f"{subjects.ORCHESTRATOR_INSTANCE_PREFIX}.a_b__"


# -- fenced and exactly once, on a real Postgres ---------------------------------------------


@pytest.fixture
async def store(fresh_db: str) -> AsyncIterator[EventStore]:
    pool = await create_pool(fresh_db, max_size=20)
    try:
        yield EventStore(pool)
    finally:
        await pool.close()


async def test_two_survivors_and_a_late_commit_settle_each_reservation_once(store) -> None:
    """A lost instance's reservations on 20 budgets; two survivors release them at once
    while the lost instance's last commits land: every reservation is settled exactly
    once (committed or released, never twice), every finished call is charged exactly
    once (in its reservation, or late after it was released) and nothing stays reserved."""
    dead = BudgetManager(store, instance="orch-a.dead")
    survivors = [BudgetManager(store, instance=f"orch-{n}.alive") for n in "bc"]
    charges = []
    for i in range(20):
        sid = f"s{i}"
        stream = budget_stream_for_session(sid)
        await store.append(stream, decide_open(None, stream, SESSION, sid, limit_tokens=1000),
                           expected_version=0, metadata=META)
        for call in (f"c{i}", f"d{i}"):
            charge = Charge(call, (stream,), "t1", sid)
            await dead.reserve(charge, 0, 100, META)
            charges.append(charge)
        await survivors[0].reserve(Charge(f"alive{i}", (stream,), "t1", sid), 0, 50, META)
    await ProjectionRunner(store, [BudgetsProjection()]).catch_up()
    # the read model lists the lost one's reservations; now they race
    late = [c for c in charges if c.call_id.startswith("c")]
    results = await asyncio.gather(
        *(s.release_orphans("orch-a.dead") for s in survivors),
        *(dead.commit(c, 0, 40, META) for c in late))
    released = results[0] + results[1]
    commits = [e for r in results[2:] for e in r]
    in_time = sum(1 for e in commits if not e.late)
    print(f"\n20 budgets: {in_time} commits before the release, {len(commits) - in_time} late,"
          f" {released} released as orchestrator-lost")
    assert len(commits) == len(late)  # every finished call is charged
    assert in_time + released == len(charges)  # every reservation settled once
    for i in range(20):
        events = [r.event for r in await store.read_stream(budget_stream_for_session(f"s{i}"))]
        for call in (f"c{i}", f"d{i}"):
            committed = [e for e in events if isinstance(e, BudgetCommitted) and e.call_id == call]
            released_ = [e for e in events if isinstance(e, BudgetReleased) and e.call_id == call]
            assert all(e.reason == ORCHESTRATOR_LOST for e in released_)
            if call.startswith("d"):  # never finished: released, never charged
                assert (len(committed), len(released_)) == (0, 1)
            else:  # finished: charged once; late exactly when its reservation was released first
                assert len(committed) == 1 and len(released_) <= 1, events
                assert committed[0].late == bool(released_)
        state = await survivors[1].state(budget_stream_for_session(f"s{i}"))
        assert set(state.reservations) == {f"alive{i}"}  # the living instance's is untouched
        assert state.reserved_tokens == 50
        assert state.committed_tokens == 40  # the finished call, charged once
    assert await survivors[0].release_orphans("orch-a.dead") == 0  # idempotent


# -- real processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def duo(infra, tmp_path_factory):
    # the exact path: a reservation per call (a lost orchestrator's budget lease:
    # tests/test_leased_calls.py)
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("orphans"), new_database(infra),
                                orchestrators=2, NEXUS_BUDGET_LEASE_CALLS="0",
                                NEXUS_ORCHESTRATOR_LOST_AFTER_S=f"{LOST_AFTER_S:g}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _budget(llm: LLMCluster, api: str, key, sid: str) -> dict:
    return httpx.get(f"{api}/v1/sessions/{sid}/budget", headers=key, timeout=10).json()


def _call_in_background(llm: LLMCluster, key, sid: str) -> dict:
    """A chat call through the first orchestrator, in a thread; its outcome lands in the dict."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["response"] = httpx.post(
                f"{llm.apis[0]}/v1/chat/completions", headers={**key, "X-Nexus-Session": sid},
                json={"model": "default", "messages": PROMPT, "max_tokens": 4}, timeout=60)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


def _setup(llm: LLMCluster) -> tuple[dict, str, str]:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    key = llm.tenant_key(tenant)
    resp = httpx.put(f"{llm.api}/v1/tenants/{tenant}/budget", headers=llm.admin,
                     json={"limit_tokens": 100_000})
    assert resp.status_code in (200, 204), resp.text
    sid = llm.session(key, budget={"limit_tokens": 10_000})
    return key, tenant, sid


def _reserved_on_both(llm: LLMCluster, api: str, key, sid: str) -> bool:
    budget = _budget(llm, api, key, sid)
    return budget["session"]["reserved_tokens"] > 0 and budget["tenant"]["reserved_tokens"] > 0


def _released_on_both(llm: LLMCluster, api: str, key, sid: str) -> bool:
    budget = _budget(llm, api, key, sid)
    return all(budget[scope]["reserved_tokens"] == 0 and budget[scope]["open_reservations"] == 0
               for scope in ("session", "tenant"))


def _budget_events(llm: LLMCluster, tenant: str, sid: str) -> list:
    async def read() -> list:
        pool = await create_pool(llm.database_url, max_size=1)
        store = EventStore(pool)
        streams = (budget_stream_for_session(sid),
                   budget_stream_for_tenant(tenant, month_period(time.time())))
        try:
            return [r.event for stream in streams for r in await store.read_stream(stream)]
        finally:
            await pool.close()

    return asyncio.run(read())


@pytest.mark.slow
def test_a_stalled_orchestrator_is_not_taken_for_lost(duo: LLMCluster) -> None:
    """SIGSTOP the orchestrator holding a reservation for longer than the grace period:
    its NATS connection (and subscription) lives on, so the survivors' probes time out
    instead of finding no responder; after SIGCONT its call completes and commits."""
    key, tenant, sid = _setup(duo)
    duo.primary.script({"slow_first_byte_ms": 800})
    call = _call_in_background(duo, key, sid)
    wait_until(lambda: _reserved_on_both(duo, duo.apis[1], key, sid), 20, 0.05,
               "the call's reservations")
    holder = duo.orchestrators[0].proc
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        time.sleep(LOST_AFTER_S + 2)  # the other one probes it all along
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    call["thread"].join(60)
    assert "response" in call, call.get("error")
    assert call["response"].status_code == 200, call["response"].text
    wait_until(lambda: _released_on_both(duo, duo.apis[1], key, sid), 20, 0.1, "the commit")
    events = _budget_events(duo, tenant, sid)
    assert [type(e).__name__ for e in events] == [
        "BudgetOpened", "BudgetReserved", "BudgetCommitted"] * 2
    for survivor in duo.orchestrators[1:]:
        assert "orchestrator lost" not in survivor.log()


@pytest.mark.slow
def test_a_killed_orchestrators_reservations_are_released_by_a_survivor(duo: LLMCluster) -> None:
    key, tenant, sid = _setup(duo)
    duo.primary.script({"hang": True}, {"hang": True})  # the answer is held
    call = _call_in_background(duo, key, sid)
    wait_until(lambda: _reserved_on_both(duo, duo.apis[1], key, sid), 20, 0.05,
               "the call's reservations")
    reserved = [e for e in _budget_events(duo, tenant, sid) if isinstance(e, BudgetReserved)]
    assert all(e.instance and e.instance.startswith(f"orch-{duo.apis[0].rsplit(':', 1)[1]}.")
               for e in reserved)
    duo.orchestrators[0].kill()  # kill -9, holding the reservations
    killed = time.monotonic()
    bound = LOST_AFTER_S + 10  # the grace period, a probe round, the projection, generously
    wait_until(lambda: _released_on_both(duo, duo.apis[1], key, sid), bound, 0.05,
               "the lost orchestrator's reservations to be released")
    took = time.monotonic() - killed
    print(f"\norphaned reservations released {took:.2f} s after kill -9 "
          f"(grace period {LOST_AFTER_S:g} s, reservation TTL 600 s)")
    call["thread"].join(30)
    assert "response" not in call  # the client saw its call die with its orchestrator
    time.sleep(1.0)  # the survivor keeps probing: a second release would show now
    events = _budget_events(duo, tenant, sid)
    releases = [e for e in events if isinstance(e, BudgetReleased)]
    assert [(e.call_id, e.reason) for e in releases] == [
        (reserved[0].call_id, ORCHESTRATOR_LOST)] * 2  # one on each budget, no more
    assert not any(isinstance(e, BudgetCommitted) for e in events)
    for api in duo.apis[1:]:
        assert _released_on_both(duo, api, key, sid)
