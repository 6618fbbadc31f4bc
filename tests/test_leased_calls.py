"""Budget leases (escrow, issue 16): with `NEXUS_BUDGET_LEASE_CALLS` set, an orchestrator
takes a slice of a budget once and admits calls against it in memory; each call's settle
commits its cost out of the slice, with its policy decision, in one transaction; idle
slices go back. What the answers report is what the budget holds, across two
orchestrators racing on one budget, and a close anywhere still refuses the next call.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from shared.contracts.events import SessionClosed, session_stream
from shared.infra.eventstore import EventStore
from shared.infra.eventstore.store import create_pool
from tests.conftest import new_database
from tests.llm_cluster import LLMCluster, start_llm_cluster
from tests.support import wait_until
from tests.test_budgets_policies import (
    RESERVED_PER_CALL,
    TEMPLATE_TOKENS,
    USED_PER_CALL,
    fire,
    fold_vs_projection,
)

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "hi"}]
POLICY = {"max_tokens_per_call": 4096}


@pytest.fixture(scope="module")
def leasing(infra, tmp_path_factory):
    """Two orchestrators with budget leases on, one provider, their own database."""
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("leasing"), new_database(infra),
                                orchestrators=2, NEXUS_BUDGET_LEASE_CALLS="64",
                                NEXUS_ORCHESTRATOR_LOST_AFTER_S="2")
    cluster.primary.configure(template_tokens=TEMPLATE_TOKENS)
    cluster.backup.configure(template_tokens=TEMPLATE_TOKENS)
    try:
        yield cluster
    finally:
        cluster.stop()


def chat(llm: LLMCluster, api: str, key: dict[str, str], sid: str) -> httpx.Response:
    return httpx.post(f"{api}/v1/chat/completions", headers={**key, "X-Nexus-Session": sid},
                      json={"model": "default", "messages": PROMPT, "max_tokens": 4}, timeout=60)


def budget_of(llm: LLMCluster, key: dict[str, str], sid: str) -> dict:
    return httpx.get(f"{llm.apis[-1]}/v1/sessions/{sid}/budget", headers=key).json()["session"]


def returned(llm: LLMCluster, key: dict[str, str], sid: str) -> bool:
    """Every slice of the session's budget went back (idle) and nothing is held."""
    budget = budget_of(llm, key, sid)
    return budget["leased_tokens"] == 0 and budget["reserved_tokens"] == 0


def transactions(llm: LLMCluster, sid: str) -> list[tuple[str, str, dict]]:
    """(type, inserting transaction id, data) of the session's events, in order."""
    async def read() -> list[tuple[str, str, dict]]:
        pool = await create_pool(llm.database_url, max_size=1)
        try:
            rows = await pool.fetch(
                "SELECT type, xmin::text AS tx, data FROM events"
                " WHERE metadata ->> 'correlation_id' = $1 ORDER BY position", sid)
            return [(r["type"], r["tx"], json.loads(r["data"])) for r in rows]
        finally:
            await pool.close()

    return asyncio.run(read())


def test_calls_from_a_lease_append_nothing_to_be_admitted(leasing: LLMCluster) -> None:
    key = leasing.tenant_key()
    sid = leasing.session(key, budget={"limit_tokens": 100 * RESERVED_PER_CALL},
                          policy_rules=POLICY)
    answers = [chat(leasing, leasing.api, key, sid) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    used = sum(a.json()["usage"]["total_tokens"] for a in answers)
    events = transactions(leasing, sid)
    kinds = [t for t, _, _ in events]
    assert kinds.count("BudgetLeased") == 1 and "BudgetReserved" not in kinds
    commits = [(tx, data) for t, tx, data in events if t == "BudgetCommitted"]
    assert len(commits) == 6 and all(data["lease"] for _, data in commits)
    # each call's policy decision, its answer and its cost: one transaction per call
    for tx, data in commits:
        mine = sorted(t for t, other, d in events if other == tx)
        assert mine == ["BudgetCommitted", "LLMCallCompleted", "LLMCallStarted",
                        "MessageAppended", "MessageAppended", "PolicyEvaluated"], mine
    # explain shows the decision and the cost of a call admitted from the slice
    call_id = answers[0].headers["X-Nexus-Call-Id"]
    explain = httpx.get(f"{leasing.api}/v1/calls/{call_id}/explain", headers=key).json()
    assert [p["allowed"] for p in explain["policy"]] == [True], explain
    [entry] = explain["budget"]
    assert entry["lease"] and entry["committed_tokens"] == USED_PER_CALL, explain
    assert explain["outcome"]["status"] == "completed"
    wait_until(lambda: returned(leasing, key, sid), 20, 0.2, "the idle slice to go back")
    budget = budget_of(leasing, key, sid)
    assert budget["committed_tokens"] == used == 6 * USED_PER_CALL
    assert budget["remaining_tokens"] == 100 * RESERVED_PER_CALL - used
    assert (budget["overrun_tokens"], budget["overruns"]) == (0, 0)
    assert [t for t, _, _ in transactions(leasing, sid)].count("BudgetLeaseReturned") == 1


def test_the_next_slice_is_taken_while_the_current_one_still_serves_calls(
        leasing: LLMCluster) -> None:
    """No call waits for a lease's append while calls keep coming: once a slice has room
    for less than a quarter of its calls, the next is leased in the background, so the
    call that uses the slice up finds the next one there. On the stream: the second
    `BudgetLeased` comes before the last commits against the first slice."""
    key = leasing.tenant_key()
    sid = leasing.session(key, budget={"limit_tokens": 1000 * RESERVED_PER_CALL},
                          policy_rules=POLICY)
    answers = [chat(leasing, leasing.api, key, sid) for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20
    events = [(t, d) for t, _, d in transactions(leasing, sid)
              if t in ("BudgetLeased", "BudgetCommitted")]
    leases = [d["lease_id"] for t, d in events if t == "BudgetLeased"]
    assert len(leases) >= 2, events
    second = next(i for i, (t, d) in enumerate(events)
                  if t == "BudgetLeased" and d["lease_id"] == leases[1])
    on_first_after = [d for t, d in events[second:]
                      if t == "BudgetCommitted" and d["lease"] == leases[0]]
    assert on_first_after, "the next slice was taken only once the first was used up"
    assert sum(a.json()["usage"]["total_tokens"] for a in answers) == 20 * USED_PER_CALL
    wait_until(lambda: returned(leasing, key, sid), 20, 0.2, "the idle slices to go back")
    budget = budget_of(leasing, key, sid)
    assert budget["committed_tokens"] == 20 * USED_PER_CALL
    assert (budget["overrun_tokens"], budget["overruns"]) == (0, 0)


def test_leased_budget_race_two_orchestrators_never_overspend(leasing: LLMCluster) -> None:
    key = leasing.tenant_key()
    limit = 40 * RESERVED_PER_CALL
    sid = leasing.session(key, budget={"limit_tokens": limit})
    outcomes, used = asyncio.run(fire(leasing, key, [sid], 200))
    admitted = outcomes.count(200)
    # What the answers themselves report is the truth the budget must hold to.
    assert used == admitted * USED_PER_CALL <= limit
    assert admitted >= 1
    wait_until(lambda: returned(leasing, key, sid), 20, 0.2, "the idle slices to go back")
    budget = budget_of(leasing, key, sid)
    assert budget["committed_tokens"] == used
    assert (budget["overrun_tokens"], budget["overruns"]) == (0, 0)
    assert budget["open_reservations"] == 0
    events = transactions(leasing, sid)
    leased = [data for t, _, data in events if t == "BudgetCommitted" and data.get("lease")]
    assert leased, "no call was admitted from a lease: the race tested the exact path only"
    state, row = asyncio.run(fold_vs_projection(leasing, f"budget-session-{sid}"))
    assert row["committed_tokens"] == state.committed_tokens == used
    assert state.leased_tokens == state.reserved_tokens == 0
    assert row["version"] == state.version == budget["version"]


def test_a_close_anywhere_refuses_the_next_leased_call(leasing: LLMCluster) -> None:
    """The session is closed straight in the event store (as another process would):
    the call after it is refused although this orchestrator has a slice with room."""
    key = leasing.tenant_key()
    sid = leasing.session(key, budget={"limit_tokens": 100 * RESERVED_PER_CALL})
    assert chat(leasing, leasing.api, key, sid).status_code == 200

    async def close() -> None:
        pool = await create_pool(leasing.database_url, max_size=1)
        try:
            store = EventStore(pool)
            stream = session_stream(sid)
            await store.append(stream, [SessionClosed(session_id=sid, reason="test")],
                               expected_version=await store.stream_version(stream))
        finally:
            await pool.close()

    asyncio.run(close())
    refused = chat(leasing, leasing.api, key, sid)
    assert refused.status_code == 409 and refused.json()["type"].endswith("session-closed"), \
        refused.text
    wait_until(lambda: returned(leasing, key, sid), 20, 0.2, "the idle slice to go back")


def test_a_killed_orchestrators_lease_is_returned_by_a_survivor(leasing: LLMCluster) -> None:
    """(Last in this module: it kills the first orchestrator.) It holds a slice with a
    call in flight when it is killed; the other returns the slice (`orchestrator-lost`),
    so the budget's room comes back without waiting for the slice's expiry."""
    key = leasing.tenant_key()
    sid = leasing.session(key, budget={"limit_tokens": 100 * RESERVED_PER_CALL})
    leasing.primary.script({"hang": True}, {"hang": True})  # the answer is held
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["response"] = chat(leasing, leasing.apis[0], key, sid)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    wait_until(lambda: budget_of(leasing, key, sid)["leased_tokens"] > 0, 20, 0.05,
               "the first orchestrator's slice")
    leasing.orchestrators[0].kill()  # kill -9, holding the slice and the call
    wait_until(lambda: returned(leasing, key, sid), 30, 0.1, "the lost slice to be returned")
    thread.join(30)
    assert "response" not in outcome  # the client saw its call die with its orchestrator
    events = transactions(leasing, sid)
    assert [d["reason"] for t, _, d in events if t == "BudgetLeaseReturned"] == \
        ["orchestrator-lost"]
    assert not [t for t, _, _ in events if t == "BudgetCommitted"]
    assert budget_of(leasing, key, sid)["remaining_tokens"] == 100 * RESERVED_PER_CALL
