"""Budget leases (issue 16): any interleaving of reservations and leases keeps a budget
within its limits.

Pure, like tests/test_budget_fold.py: each step is decided on the current state and its
events folded at the next versions. After every step: `committed + reserved + leased
<= limit + overrun` in each limited dimension (or, once a limit was lowered below usage,
usage does not grow), no total is negative, `leased_*` is the sum of the open leases and
`reserved_*` of the open reservations, and the log folded from scratch (also after a
JSON round trip, and through the `budgets` read model's JSON) is the state.

An "honest orchestrator" is modelled too: calls admitted from a lease hold amounts in
memory, never more in all than what is left of the lease, and each costs at most what
it held; then no commit against an open lease overruns. Dishonest commits (costing more
than held, or two commits decided on the same state and appended without a version
check) may overrun, but the invariant still holds because the fold charges by the state
it meets.
"""

from __future__ import annotations

import uuid
from typing import Union

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.orchestrator.read_models.budgets import (
    BudgetsProjection,
    BudgetsReadModel,
    _budget_from_json,
)
from shared.contracts.events import Event, Metadata
from shared.domain.budget import (
    BUDGET_EVENT_TYPES,
    EXPIRED,
    ORCHESTRATOR_LOST,
    BudgetCommitted,
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetState,
    Lease,
    commit_on_lease,
    decide_change_limit,
    decide_commit,
    decide_commit_leased,
    decide_expire,
    decide_lease,
    decide_open,
    decide_release,
    decide_release_instance,
    decide_reserve,
    decide_return_lease,
    fold_budget,
    fold_budget_events,
)
from shared.infra.eventstore import EventStore, ProjectionRunner
from shared.infra.eventstore.store import create_pool

USD = 1_000_000
NOW = 1_000.0

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Union[BUDGET_EVENT_TYPES])  # type: ignore[valid-type]

limits_usd = st.none() | st.integers(min_value=0, max_value=3 * USD)
limits_tokens = st.none() | st.integers(min_value=0, max_value=5_000)
amounts_usd = st.integers(min_value=0, max_value=2 * USD)
amounts_tokens = st.integers(min_value=0, max_value=3_000)
call_ids = st.sampled_from([f"c{i}" for i in range(4)])
lease_ids = st.sampled_from([f"L{i}" for i in range(4)])
instances = st.sampled_from([None, "orch-1", "orch-2"])
ttls = st.sampled_from([0.0, 1.0, 5.0, 30.0, 1e9])
fractions = st.fractions(min_value=0, max_value=1)


def usage(state: BudgetState) -> dict[str, tuple[int, int | None]]:
    """Per dimension: committed + reserved + leased less the overruns, and the limit."""
    return {
        "usd": (state.committed_micro_usd + state.reserved_micro_usd + state.leased_micro_usd
                - state.overrun_micro_usd, state.limit_micro_usd),
        "tokens": (state.committed_tokens + state.reserved_tokens + state.leased_tokens
                   - state.overrun_tokens, state.limit_tokens),
    }


def fits(state: BudgetState, micro_usd: int, tokens: int) -> bool:
    """The oracle for a lease: room in every limited dimension, none exhausted."""
    for limit, committed, held, amount in (
            (state.limit_micro_usd, state.committed_micro_usd,
             state.reserved_micro_usd + state.leased_micro_usd, micro_usd),
            (state.limit_tokens, state.committed_tokens,
             state.reserved_tokens + state.leased_tokens, tokens)):
        if limit is not None and (committed >= limit or committed + held + amount > limit):
            return False
    return True


class LeaseMachine(RuleBasedStateMachine):
    change_limits = False

    def __init__(self) -> None:
        super().__init__()
        self.state: BudgetState | None = None
        self.log: list[tuple[Event, int]] = []
        self.now = NOW
        self.spent = (0, 0)  # the actual cost of every commit
        self.holds: dict[str, tuple[str, int, int]] = {}  # admitted call -> lease, its hold
        self.tainted: set[str] = set()  # leases a dishonest commit was made against
        self.next_call = 0

    # -- plumbing

    @property
    def s(self) -> BudgetState:
        assert self.state is not None
        return self.state

    def step(self, events: list[Event]) -> list[Event]:
        before = usage(self.s)
        for event in events:
            version = self.s.version + 1
            self.state = fold_budget(self.state, event, version)
            self.log.append((event, version))
            if isinstance(event, BudgetCommitted):
                self.spent = (self.spent[0] + event.micro_usd, self.spent[1] + event.tokens)
        for dim, (used, limit) in usage(self.s).items():
            if limit is not None and used > limit:
                # only after a limit was lowered below usage; usage then never grows
                assert self.change_limits and used <= before[dim][0], (dim, before)
        return events

    def held(self, lease_id: str) -> tuple[int, int]:
        holds = [(u, t) for lid, u, t in self.holds.values() if lid == lease_id]
        return sum(u for u, _ in holds), sum(t for _, t in holds)

    @initialize(limit_usd=limits_usd, limit_tokens=limits_tokens)
    def open(self, limit_usd, limit_tokens):
        self.state = None
        opened = decide_open(None, "b1", "session", "s1", limit_micro_usd=limit_usd,
                             limit_tokens=limit_tokens)
        self.state = fold_budget(None, opened[0], 1)
        self.log.append((opened[0], 1))

    # -- reservations (per call)

    @rule(call_id=call_ids, micro_usd=amounts_usd, tokens=amounts_tokens, ttl=ttls,
          instance=instances)
    def reserve(self, call_id, micro_usd, tokens, ttl, instance):
        self.step(decide_reserve(self.s, call_id, micro_usd, tokens, self.now, ttl, instance))

    @rule(call_id=call_ids, micro_usd=amounts_usd, tokens=amounts_tokens)
    def commit(self, call_id, micro_usd, tokens):
        self.step(decide_commit(self.s, call_id, micro_usd, tokens))

    @rule(call_id=call_ids)
    def release(self, call_id):
        self.step(decide_release(self.s, call_id, "failed"))

    # -- leases

    @rule(lease_id=lease_ids, micro_usd=amounts_usd, tokens=amounts_tokens, ttl=ttls,
          instance=instances)
    def lease(self, lease_id, micro_usd, tokens, ttl, instance):
        s = self.s
        was_open = lease_id in s.leases
        events = self.step(decide_lease(s, lease_id, micro_usd, tokens, self.now, ttl, instance))
        if was_open:
            assert events == []
            return
        expired = [e for e in events if not isinstance(e, BudgetLeased)]
        assert all(isinstance(e, (BudgetReleased, BudgetLeaseReturned)) and e.reason == EXPIRED
                   for e in expired)
        after_expiry = fold_budget_events(
            [(e, s.version + i) for i, e in enumerate(expired, 1)], s)
        assert after_expiry is not None
        if fits(after_expiry, micro_usd, tokens):
            assert isinstance(events[-1], BudgetLeased)
            assert self.s.leases[lease_id] == Lease(micro_usd, tokens, self.now + ttl, instance)
            self.tainted.discard(lease_id)  # a new lease under a reused id
            for call, (lid, _, _) in list(self.holds.items()):
                if lid == lease_id:  # holds of the old lease under that id: now late
                    self.holds[call] = (f"gone-{lid}", 0, 0)
        else:
            assert events == expired and lease_id not in self.s.leases

    @rule(lease_id=lease_ids, share_usd=fractions, share_tokens=fractions)
    def admit(self, lease_id, share_usd, share_tokens):
        """An honest holder admits a call in memory: a hold within what is not yet held."""
        lease = self.s.leases.get(lease_id)
        if lease is None:
            return
        held_usd, held_tokens = self.held(lease_id)
        assert held_usd <= lease.micro_usd or lease_id in self.tainted
        hold = (int((lease.micro_usd - held_usd) * share_usd),
                int((lease.tokens - held_tokens) * share_tokens))
        if min(hold) < 0:  # a tainted lease: no honest room left
            return
        self.holds[f"k{self.next_call}"] = (lease_id, *hold)
        self.next_call += 1

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), share=fractions)
    def settle_honest(self, data, share):
        """The call costs at most what it held: no overrun while its lease is open."""
        call = data.draw(st.sampled_from(sorted(self.holds)))
        lease_id, hold_usd, hold_tokens = self.holds.pop(call)
        cost = int(hold_usd * share), int(hold_tokens * share)
        was_open = lease_id in self.s.leases
        ev = self.step(decide_commit_leased(self.s, lease_id, call, *cost))[0]
        assert isinstance(ev, BudgetCommitted) and (ev.micro_usd, ev.tokens) == cost
        if not was_open:
            assert ev.late and (ev.overrun_micro_usd, ev.overrun_tokens) == cost
        elif lease_id not in self.tainted:
            assert not ev.late and (ev.overrun_micro_usd, ev.overrun_tokens) == (0, 0)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), micro_usd=amounts_usd, tokens=amounts_tokens)
    def settle_over(self, data, micro_usd, tokens):
        """The call costs anything (a provider ignoring max_tokens): maybe an overrun."""
        call = data.draw(st.sampled_from(sorted(self.holds)))
        lease_id, _, _ = self.holds.pop(call)
        lease = self.s.leases.get(lease_id)
        before = self.s
        ev = self.step(decide_commit_leased(self.s, lease_id, call, micro_usd, tokens))[0]
        if lease is None:
            assert ev.late and (ev.overrun_micro_usd, ev.overrun_tokens) == (micro_usd, tokens)
        else:
            assert ev.overrun_micro_usd == max(0, micro_usd - lease.micro_usd)
            assert ev.overrun_tokens == max(0, tokens - lease.tokens)
            self.tainted.add(lease_id)
        assert self.s.overrun_micro_usd == before.overrun_micro_usd + ev.overrun_micro_usd
        assert self.s.overrun_tokens == before.overrun_tokens + ev.overrun_tokens

    @rule(lease_id=lease_ids, costs=st.lists(st.tuples(amounts_usd, amounts_tokens),
                                             min_size=1, max_size=3))
    def unversioned_commits(self, lease_id, costs):
        """Commits built from one (stale) view of a lease, appended one after another
        without a version check: the fold still keeps the invariant."""
        before = self.s
        lease = before.leases.get(lease_id)
        events: list[Event] = [commit_on_lease("b1", lease, lease_id, f"u{i}", usd, tok)
                               for i, (usd, tok) in enumerate(costs)]
        self.step(events)
        # the fold charges by the state it meets: each commit takes what is left, in turn
        left = (lease.micro_usd, lease.tokens) if lease else (0, 0)
        over = [0, 0]
        for cost in costs:
            for dim in (0, 1):
                take = min(cost[dim], left[dim])
                over[dim] += cost[dim] - take
                left = (left[0] - take, left[1]) if dim == 0 else (left[0], left[1] - take)
        assert (self.s.overrun_micro_usd - before.overrun_micro_usd,
                self.s.overrun_tokens - before.overrun_tokens) == tuple(over)
        if lease is not None:
            assert (self.s.leases[lease_id].micro_usd, self.s.leases[lease_id].tokens) == left
            self.tainted.add(lease_id)

    @rule(lease_id=lease_ids, reason=st.sampled_from(["idle", "shutdown"]))
    def return_lease(self, lease_id, reason):
        s = self.s
        events = self.step(decide_return_lease(s, lease_id, reason))
        assert len(events) == (lease_id in s.leases)
        assert lease_id not in self.s.leases
        assert self.s.committed_micro_usd == s.committed_micro_usd

    # -- time, liveness, limits

    @rule(dt=st.sampled_from([0.0, 1.0, 5.0, 30.0, 100.0]))
    def tick(self, dt):
        self.now += dt

    @rule()
    def expire(self):
        s = self.s
        events = self.step(decide_expire(s, self.now))
        assert all(e.reason == EXPIRED for e in events)
        assert all(r.expires_at > self.now for r in self.s.reservations.values())
        assert all(lease.expires_at > self.now for lease in self.s.leases.values())
        due = sorted([r.expires_at for r in s.reservations.values() if r.expires_at <= self.now]
                     + [x.expires_at for x in s.leases.values() if x.expires_at <= self.now])
        assert len(events) == len(due)  # oldest first: by expires_at

    @rule(instance=st.sampled_from(["orch-1", "orch-2"]))
    def release_instance(self, instance):
        events = self.step(decide_release_instance(self.s, instance))
        assert all(e.reason == ORCHESTRATOR_LOST for e in events)
        assert all(r.instance != instance for r in self.s.reservations.values())
        assert all(x.instance != instance for x in self.s.leases.values())
        assert decide_release_instance(self.s, instance) == []

    @precondition(lambda self: self.change_limits)
    @rule(limit_usd=limits_usd, limit_tokens=limits_tokens)
    def change_limit(self, limit_usd, limit_tokens):
        self.step(decide_change_limit(self.s, limit_usd, limit_tokens))

    @rule(data=st.data())
    def redeliver(self, data):
        event, version = data.draw(st.sampled_from(self.log))
        assert fold_budget(self.s, event, version) == self.s

    # -- invariants

    @invariant()
    def within_limits_and_consistent(self):
        if self.state is None:
            return
        s = self.s
        for value in (s.reserved_micro_usd, s.reserved_tokens, s.leased_micro_usd,
                      s.leased_tokens, s.committed_micro_usd, s.committed_tokens,
                      s.overrun_micro_usd, s.overrun_tokens):
            assert value >= 0
        assert all(x.micro_usd >= 0 and x.tokens >= 0 for x in s.leases.values())
        assert s.reserved_micro_usd == sum(r.micro_usd for r in s.reservations.values())
        assert s.reserved_tokens == sum(r.tokens for r in s.reservations.values())
        assert s.leased_micro_usd == sum(x.micro_usd for x in s.leases.values())
        assert s.leased_tokens == sum(x.tokens for x in s.leases.values())
        assert (s.committed_micro_usd, s.committed_tokens) == self.spent
        for remaining in (s.remaining_micro_usd, s.remaining_tokens):
            assert remaining is None or remaining >= 0
        if not self.change_limits:
            for dim, (used, limit) in usage(s).items():
                assert limit is None or used <= limit, (dim, used, limit)

    @invariant()
    def log_folds_to_the_state(self):
        if self.state is None:
            return
        assert fold_budget_events(self.log) == self.s
        decoded = [(_decoder.decode(_encoder.encode(e)), v) for e, v in self.log]
        assert fold_budget_events(decoded) == self.s
        # the `budgets` read model stores the state as JSON and folds on from it
        assert _budget_from_json(msgspec.json.encode(self.s).decode()) == self.s


class LimitChangingLeaseMachine(LeaseMachine):
    change_limits = True


_settings = settings(max_examples=200, stateful_step_count=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestLeaseMachine = LeaseMachine.TestCase
TestLeaseMachine.settings = _settings
TestLimitChangingLeaseMachine = LimitChangingLeaseMachine.TestCase
TestLimitChangingLeaseMachine.settings = _settings


def test_read_model_json_of_an_old_row_has_no_leases():
    """A `budgets` row written before leases (no `leases` key) still loads."""
    state = fold_budget_events(decide_open(None, "b1", "session", "s1", limit_micro_usd=USD))
    assert state is not None
    data = msgspec.json.decode(msgspec.json.encode(state))
    for key in ("leases", "leased_micro_usd", "leased_tokens"):
        del data[key]
    old = _budget_from_json(msgspec.json.encode(data).decode())
    assert old == state and old.leases == {}


# -- the `budgets` read model (real Postgres) ----------------------------------------------


async def test_the_budgets_read_model_finds_expired_and_orphaned_leases(fresh_db: str) -> None:
    """Budgets holding only leases are found by the sweeper's and the liveness code's
    queries (expired leases, a lost instance's leases, the holders), a returned lease is
    no longer found, and the projection equals its rebuild."""
    pool = await create_pool(fresh_db, max_size=3)
    try:
        store = EventStore(pool)
        runner = ProjectionRunner(store, [BudgetsProjection()], batch_size=4)
        budgets = BudgetsReadModel(store)
        meta = Metadata(tenant="acme")

        async def decide(stream: str, decide_fn) -> None:
            rows = await store.read_stream(stream)
            state = fold_budget_events([(r.event, r.stream_version) for r in rows])
            events = decide_fn(state)
            await store.append(stream, events, state.version if state else 0, meta)

        def opened(stream: str):
            return lambda s: decide_open(s, stream, "session", stream, limit_micro_usd=10 * USD)

        short, long_, reserved, returned = (f"budget-session-lease-{n}-{uuid.uuid4().hex[:6]}"
                                            for n in ("short", "long", "res", "ret"))
        for stream in (short, long_, reserved, returned):
            await decide(stream, opened(stream))
        await decide(short, lambda s: decide_lease(s, "L1", USD, 10, NOW, 10, "orch-a"))
        await decide(long_, lambda s: decide_lease(s, "L2", USD, 10, NOW, 1e6, "orch-b"))
        await decide(long_, lambda s: decide_commit_leased(s, "L2", "c1", 1_000, 1))
        await decide(reserved, lambda s: decide_reserve(s, "c2", USD, 10, NOW, 1e6, "orch-c"))
        await decide(returned, lambda s: decide_lease(s, "L3", USD, 10, NOW, 10, "orch-a"))
        await decide(returned, lambda s: decide_return_lease(s, "L3", "idle"))
        await runner.catch_up()

        rows = {r["budget_id"]: r for r in await pool.fetch(
            "SELECT budget_id, open_reservations, reserved_micro_usd FROM budgets"
            " WHERE budget_id = ANY($1)", [short, long_, reserved, returned])}
        assert {k: r["open_reservations"] for k, r in rows.items()} == {
            short: 1, long_: 1, reserved: 1, returned: 0}
        assert set(await budgets.with_expired_reservations(NOW + 10)) >= {short}
        assert not {long_, reserved, returned} & set(
            await budgets.with_expired_reservations(NOW + 10))
        assert set(await budgets.reservation_holders()) >= {"orch-a", "orch-b", "orch-c"}
        assert await budgets.with_reservations_of("orch-b") == [long_]
        assert await budgets.with_reservations_of("orch-a") == [short]  # L3 was returned
        assert await budgets.with_reservations_of("orch-c") == [reserved]

        # the sweeper's decision on what the query found: the lease is returned
        await decide(short, lambda s: decide_expire(s, NOW + 10))
        await runner.catch_up()
        assert short not in await budgets.with_expired_reservations(NOW + 10)
        assert await budgets.with_reservations_of("orch-a") == []

        live = await pool.fetch("SELECT * FROM budgets ORDER BY budget_id")
        await runner.rebuild("budgets")
        assert await pool.fetch("SELECT * FROM budgets ORDER BY budget_id") == live
    finally:
        await pool.close()
