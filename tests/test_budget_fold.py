"""Budgets (`shared.domain.budget`): the fold and the reserve/commit/release/expire decisions.

Pure: no store, no clock. Each operation decides on the current state and folds the
events it returns at the next versions, as the orchestrator does when it appends them
at the state's version. The property tests drive arbitrary interleavings and check
"never overspent" (committed + reserved - overrun <= limit: only a call that costs more
than it reserved takes a budget over its limit, and then nothing more is admitted),
committed == the actual cost of every commit, no negative amounts, and that the
event log folded from scratch is the state maintained step by step.
"""

from __future__ import annotations

from typing import Union

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shared.domain.budget import (
    BUDGET_EVENT_TYPE_NAMES,
    BUDGET_EVENT_TYPES,
    EXPIRED,
    LAPSED_KEPT,
    BudgetCommitted,
    BudgetExceeded,
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetLimitChanged,
    BudgetNotOpened,
    BudgetOpened,
    BudgetReleased,
    BudgetReserved,
    BudgetState,
    Lease,
    Reservation,
    budget_stream_for_session,
    budget_stream_for_tenant,
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
    format_usd,
    micro_to_usd,
    month_period,
    usd_to_micro,
)
from shared.contracts.events import Event

USD = 1_000_000
TTL = 60.0
NOW = 1_000.0

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Union[BUDGET_EVENT_TYPES])  # type: ignore[valid-type]


# -- helpers ----------------------------------------------------------------------------


class Budget:
    """A budget stream in memory: the log and the state folded step by step."""

    def __init__(self, limit_micro_usd: int | None = None, limit_tokens: int | None = None,
                 scope: str = "session", owner: str = "s1", period: str | None = None) -> None:
        self.log: list[tuple[Event, int]] = []
        self.state: BudgetState | None = None
        self.apply(decide_open(None, "b1", scope, owner, limit_micro_usd=limit_micro_usd,
                               limit_tokens=limit_tokens, period=period))

    def apply(self, events: list[Event]) -> list[Event]:
        for event in events:
            version = (self.state.version if self.state else 0) + 1
            self.state = fold_budget(self.state, event, version)
            self.log.append((event, version))
        return events

    @property
    def s(self) -> BudgetState:
        assert self.state is not None
        return self.state

    def reserve(self, call_id: str, micro_usd: int = 0, tokens: int = 0,
                now: float = NOW, ttl_s: float = TTL) -> list[Event]:
        return self.apply(decide_reserve(self.state, call_id, micro_usd, tokens, now, ttl_s))

    def commit(self, call_id: str, micro_usd: int = 0, tokens: int = 0) -> list[Event]:
        return self.apply(decide_commit(self.state, call_id, micro_usd, tokens))

    def release(self, call_id: str, reason: str = "failed") -> list[Event]:
        return self.apply(decide_release(self.state, call_id, reason))

    def expire(self, now: float) -> list[Event]:
        return self.apply(decide_expire(self.state, now))

    def lease(self, lease_id: str, micro_usd: int = 0, tokens: int = 0, now: float = NOW,
              ttl_s: float = TTL, instance: str | None = None) -> list[Event]:
        return self.apply(decide_lease(self.state, lease_id, micro_usd, tokens, now, ttl_s,
                                       instance))

    def commit_leased(self, lease_id: str, call_id: str, micro_usd: int = 0,
                      tokens: int = 0) -> list[Event]:
        return self.apply(decide_commit_leased(self.state, lease_id, call_id, micro_usd, tokens))

    def return_lease(self, lease_id: str, reason: str = "idle") -> list[Event]:
        return self.apply(decide_return_lease(self.state, lease_id, reason))


def only(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


# -- reserve ----------------------------------------------------------------------------


def test_open_budget():
    b = Budget(limit_micro_usd=USD, limit_tokens=1000)
    assert b.s.version == 1
    assert (b.s.limit_micro_usd, b.s.limit_tokens) == (USD, 1000)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (USD, 1000)
    assert b.s.reservations == {}
    assert decide_open(b.state, "b1", "session", "s1", limit_micro_usd=5) == []  # idempotent


def test_reserve_within_limit():
    b = Budget(limit_micro_usd=USD, limit_tokens=1000)
    ev = only(b.reserve("c1", 400_000, 300))
    assert ev == BudgetReserved(budget_id="b1", call_id="c1", micro_usd=400_000, tokens=300,
                                expires_at=NOW + TTL)
    assert (b.s.reserved_micro_usd, b.s.reserved_tokens) == (400_000, 300)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (600_000, 700)
    assert b.s.reservations == {"c1": Reservation(400_000, 300, NOW + TTL)}
    assert b.s.version == 2


def test_reserve_up_to_the_exact_limit():
    b = Budget(limit_micro_usd=USD, limit_tokens=10)
    assert isinstance(only(b.reserve("c1", USD, 10)), BudgetReserved)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (0, 0)
    assert isinstance(only(b.reserve("c2", 0, 0)), BudgetReserved)  # nothing still fits
    assert isinstance(only(b.reserve("c3", 1, 0)), BudgetExceeded)


def test_reserve_beyond_limit_names_dimension_and_amounts():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 650_000)
    before = b.s
    ev = only(b.reserve("c2", 800_000, 50))
    assert ev == BudgetExceeded(
        budget_id="b1", call_id="c2", requested_micro_usd=800_000, requested_tokens=50,
        available_micro_usd=350_000, available_tokens=None,
        reason="session budget: 0.80 USD requested, 0.35 USD available")
    # a denial is audit only: nothing changes but the version
    assert b.s == msgspec.structs.replace(before, version=before.version + 1)


def test_reserve_beyond_token_limit_of_tenant_budget():
    b = Budget(limit_tokens=1000, scope="tenant", owner="acme", period="2026-11")
    b.reserve("c1", 10 * USD, 900)
    ev = only(b.reserve("c2", 10 * USD, 200))
    assert isinstance(ev, BudgetExceeded)
    assert ev.reason == "tenant budget: 200 tokens requested, 100 tokens available"
    assert (ev.available_tokens, ev.available_micro_usd) == (100, None)


def test_reserve_beyond_both_limits_names_both():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    ev = only(b.reserve("c1", 1_500_000, 101))
    assert isinstance(ev, BudgetExceeded)
    assert ev.reason == ("session budget: 1.50 USD requested, 1.00 USD available; "
                         "101 tokens requested, 100 tokens available")


def test_reserve_counts_committed_spend():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 700_000)
    b.commit("c1", 600_000)
    assert isinstance(only(b.reserve("c2", 400_001)), BudgetExceeded)
    assert isinstance(only(b.reserve("c3", 400_000)), BudgetReserved)
    assert b.s.remaining_micro_usd == 0


def test_second_reserve_for_an_open_call_is_idempotent():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 500_000)
    state = b.s
    assert b.reserve("c1", 500_000) == []
    assert b.reserve("c1", 2 * USD) == []  # not even a denial: the call is reserved
    assert b.s == state
    # and a duplicate BudgetReserved appended anyway does not reserve twice
    b.apply([BudgetReserved(budget_id="b1", call_id="c1", micro_usd=500_000, tokens=0,
                            expires_at=NOW + TTL)])
    assert b.s.reserved_micro_usd == 500_000
    assert b.s.version == state.version + 1


def test_reserve_rejects_bad_input():
    b = Budget(limit_micro_usd=USD)
    with pytest.raises(ValueError):
        decide_reserve(b.state, "c1", -1, 0, NOW, TTL)
    with pytest.raises(ValueError):
        decide_reserve(b.state, "c1", 0, -1, NOW, TTL)
    with pytest.raises(BudgetNotOpened):
        decide_reserve(None, "c1", 1, 1, NOW, TTL)
    with pytest.raises(ValueError):
        decide_open(None, "b1", "session", "s1", limit_micro_usd=-1)
    with pytest.raises(ValueError):
        decide_open(None, "b1", "galaxy", "s1")  # type: ignore[arg-type]


# -- commit -----------------------------------------------------------------------------


def test_commit_charges_actual_and_releases_the_remainder():
    b = Budget(limit_micro_usd=USD, limit_tokens=1000)
    b.reserve("c1", 800_000, 900)
    b.reserve("c2", 100_000, 50)
    ev = only(b.commit("c1", 300_000, 400))
    assert ev == BudgetCommitted(budget_id="b1", call_id="c1", micro_usd=300_000, tokens=400)
    assert (ev.overrun_micro_usd, ev.overrun_tokens) == (0, 0)
    assert (b.s.committed_micro_usd, b.s.committed_tokens) == (300_000, 400)
    assert (b.s.reserved_micro_usd, b.s.reserved_tokens) == (100_000, 50)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (600_000, 550)
    assert set(b.s.reservations) == {"c2"}


def test_commit_over_the_reservation_charges_it_all_and_records_the_overrun():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 300_000)
    ev = only(b.commit("c1", 450_000))  # the provider cost more than the worst case
    assert (ev.micro_usd, ev.overrun_micro_usd) == (450_000, 150_000)
    assert b.s.committed_micro_usd == 450_000
    assert (b.s.overrun_micro_usd, b.s.overrun_tokens, b.s.overruns) == (150_000, 0, 1)


def test_overrun_is_committed_in_full_and_blocks_until_the_limit_is_raised():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    b.reserve("c1", 600_000, 60)
    b.reserve("c2", 300_000, 30)
    ev = only(b.commit("c1", 900_000, 95))
    # never clamped: committed is what was spent, the excess over the reservation is named
    assert ev == BudgetCommitted(budget_id="b1", call_id="c1", micro_usd=900_000, tokens=95,
                                 overrun_micro_usd=300_000, overrun_tokens=35)
    assert (b.s.committed_micro_usd, b.s.committed_tokens) == (900_000, 95)
    assert (b.s.overrun_micro_usd, b.s.overrun_tokens, b.s.overruns) == (300_000, 35, 1)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (0, 0)
    only(b.commit("c2", 300_000, 30))  # within its reservation: no overrun
    assert (b.s.committed_micro_usd, b.s.committed_tokens, b.s.overruns) == (1_200_000, 125, 1)
    denied = only(b.reserve("c3", 0, 0))  # overspent: not even a free call
    assert isinstance(denied, BudgetExceeded)
    assert "limit reached: 125 of 100 tokens committed" in denied.reason
    assert "limit reached: 1.20 of 1.00 USD committed" in denied.reason
    b.apply(decide_change_limit(b.state, 2 * USD, 200))
    assert isinstance(only(b.reserve("c3", 100_000, 10)), BudgetReserved)


def test_a_limit_reached_exactly_denies_even_zero_amounts():
    b = Budget(limit_tokens=100)
    b.reserve("c1", 0, 100)
    b.commit("c1", 0, 100)
    assert isinstance(only(b.reserve("c2", 5, 0)), BudgetExceeded)
    assert isinstance(only(Budget(limit_micro_usd=USD).reserve("c1", 0, 0)), BudgetReserved)


def test_commit_unlimited_dimension_charges_in_full():
    b = Budget(limit_tokens=100)
    b.reserve("c1", 1, 10)
    ev = only(b.commit("c1", 5 * USD, 10))
    assert (ev.micro_usd, ev.overrun_micro_usd) == (5 * USD, 5 * USD - 1)  # named, not limited
    assert b.s.committed_micro_usd == 5 * USD
    assert b.s.remaining_micro_usd is None


def test_commit_of_unknown_or_closed_call_is_a_noop():
    b = Budget(limit_micro_usd=USD)
    assert b.commit("nope", 100) == []
    b.reserve("c1", 500_000)
    b.commit("c1", 200_000)
    assert b.commit("c1", 200_000) == []  # retried commit
    state = b.s
    # appended anyway (a retry that raced): harmless, only the version moves
    b.apply([BudgetCommitted(budget_id="b1", call_id="c1", micro_usd=200_000, tokens=0),
             BudgetCommitted(budget_id="b1", call_id="ghost", micro_usd=9 * USD, tokens=9)])
    assert b.s == msgspec.structs.replace(state, version=state.version + 2)
    with pytest.raises(ValueError):
        decide_commit(b.state, "c1", -5, 0)
    assert decide_commit(None, "c1", 1, 1) == []


# -- release and expire -----------------------------------------------------------------


def test_release_frees_the_reservation():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    b.reserve("c1", 700_000, 70)
    ev = only(b.release("c1", "cancelled"))
    assert ev == BudgetReleased(budget_id="b1", call_id="c1", reason="cancelled")
    assert (b.s.reserved_micro_usd, b.s.reserved_tokens, b.s.committed_micro_usd) == (0, 0, 0)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (USD, 100)
    assert b.release("c1", "cancelled") == []
    state = b.s
    b.apply([ev])  # a duplicate release appended anyway
    assert b.s == msgspec.structs.replace(state, version=state.version + 1)
    assert b.s.reserved_micro_usd == 0
    assert decide_release(None, "c1", "failed") == []


def test_expire_releases_only_due_reservations():
    b = Budget(limit_micro_usd=USD)
    b.reserve("old", 100_000, now=NOW, ttl_s=10)
    b.reserve("older", 100_000, now=NOW - 5, ttl_s=10)
    b.reserve("young", 100_000, now=NOW, ttl_s=100)
    assert b.expire(NOW + 4) == []
    events = b.expire(NOW + 10)  # expires_at <= now
    assert events == [BudgetReleased(budget_id="b1", call_id="older", reason=EXPIRED),
                      BudgetReleased(budget_id="b1", call_id="old", reason=EXPIRED)]
    assert set(b.s.reservations) == {"young"}
    assert b.s.reserved_micro_usd == 100_000
    assert b.expire(NOW + 10) == []
    assert decide_expire(None, NOW) == []


def test_reserve_sweeps_expired_reservations_first():
    b = Budget(limit_micro_usd=USD)
    b.reserve("dead", 900_000, now=NOW, ttl_s=10)
    assert isinstance(only(b.reserve("c1", 500_000, now=NOW + 5)), BudgetExceeded)
    events = b.reserve("c2", 500_000, now=NOW + 10)
    assert events[0] == BudgetReleased(budget_id="b1", call_id="dead", reason=EXPIRED)
    assert isinstance(events[-1], BudgetReserved)
    assert set(b.s.reservations) == {"c2"}
    assert b.s.reserved_micro_usd == 500_000


def test_a_call_that_outlives_its_reservation_is_still_charged_as_a_late_overrun():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 500_000, ttl_s=10)
    b.expire(NOW + 10)  # the TTL passed while the provider failed over
    assert b.s.reserved_micro_usd == 0
    commit = only(b.commit("c1", 400_000))
    assert commit == BudgetCommitted(budget_id="b1", call_id="c1", micro_usd=400_000, tokens=0,
                                     overrun_micro_usd=400_000, overrun_tokens=0, late=True)
    assert (b.s.committed_micro_usd, b.s.overrun_micro_usd, b.s.overruns) == (400_000, 400_000, 1)
    assert b.commit("c1", 400_000) == []  # charged once
    assert b.s.committed_micro_usd == 400_000


def test_a_call_of_a_lost_orchestrator_that_finishes_anyway_is_charged():
    b = Budget(limit_micro_usd=USD)
    b.apply(decide_reserve(b.s, "c1", 500_000, 0, NOW, 600, instance="o1.a"))
    b.apply(decide_release_instance(b.s, "o1.a"))
    assert only(b.commit("c1", 300_000)).late
    assert b.s.committed_micro_usd == 300_000


def test_a_call_released_by_its_own_outcome_is_never_charged_later():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 500_000)
    b.release("c1", "failed")
    assert b.commit("c1", 400_000) == []
    assert b.s.committed_micro_usd == 0


def test_lapsed_reservations_are_remembered_up_to_a_bound():
    b = Budget()
    for i in range(LAPSED_KEPT + 5):
        b.reserve(f"c{i}", 1, ttl_s=1)
    b.expire(NOW + 1)
    assert len(b.s.lapsed) == LAPSED_KEPT
    assert b.commit("c0", 1) == []  # the oldest were forgotten
    assert only(b.commit(f"c{LAPSED_KEPT + 4}", 1)).late


# -- dimensions and limits --------------------------------------------------------------


def test_usd_only_budget_ignores_tokens():
    b = Budget(limit_micro_usd=USD)
    assert isinstance(only(b.reserve("c1", USD, 10**9)), BudgetReserved)
    assert b.s.remaining_tokens is None
    assert b.s.reserved_tokens == 10**9


def test_token_only_budget_ignores_usd():
    b = Budget(limit_tokens=1000)
    assert isinstance(only(b.reserve("c1", 10**6 * USD, 1000)), BudgetReserved)
    assert isinstance(only(b.reserve("c2", 0, 1)), BudgetExceeded)
    assert b.s.remaining_micro_usd is None
    assert b.s.remaining_tokens == 0


def test_unlimited_budget_always_reserves():
    b = Budget()
    for i in range(5):
        assert isinstance(only(b.reserve(f"c{i}", 10**12, 10**9)), BudgetReserved)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (None, None)
    b.commit("c0", 10**13, 10**10)
    assert b.s.committed_micro_usd == 10**13


def test_lowering_the_limit_below_usage_stops_spending():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 600_000)
    b.reserve("c2", 300_000)
    ev = only(b.apply(decide_change_limit(b.state, 500_000, None)))
    assert ev == BudgetLimitChanged(budget_id="b1", limit_micro_usd=500_000, limit_tokens=None)
    assert b.s.remaining_micro_usd == 0  # never negative
    assert isinstance(only(b.reserve("c3", 1)), BudgetExceeded)
    # a commit over its reservation is charged in full; the excess is an overrun
    ev = only(b.commit("c1", 800_000))
    assert (ev.micro_usd, ev.overrun_micro_usd) == (800_000, 200_000)
    assert decide_change_limit(b.state, 500_000, None) == []
    b.apply(decide_change_limit(b.state, 2 * USD, 10))
    assert (b.s.limit_micro_usd, b.s.limit_tokens) == (2 * USD, 10)
    assert b.s.remaining_micro_usd == 2 * USD - 1_100_000
    with pytest.raises(BudgetNotOpened):
        decide_change_limit(None, 1, 1)
    with pytest.raises(ValueError):
        decide_change_limit(b.state, None, -1)


# -- leases (issue 16) -------------------------------------------------------------------


def test_a_lease_that_fits_is_counted_against_the_limit():
    b = Budget(limit_micro_usd=USD, limit_tokens=1_000)
    b.reserve("c1", 200_000, 100)
    ev = only(b.lease("L1", 500_000, 400, instance="orch-1"))
    assert ev == BudgetLeased(budget_id="b1", lease_id="L1", micro_usd=500_000, tokens=400,
                              expires_at=NOW + TTL, instance="orch-1")
    assert b.s.leases == {"L1": Lease(500_000, 400, NOW + TTL, "orch-1")}
    assert (b.s.leased_micro_usd, b.s.leased_tokens) == (500_000, 400)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (300_000, 500)
    assert (b.s.reserved_micro_usd, b.s.committed_micro_usd) == (200_000, 0)


def test_a_lease_up_to_the_exact_limit_fits():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    b.commit("nobody")  # a no-op
    b.reserve("c1", 400_000, 40)
    assert isinstance(only(b.lease("L1", 600_000, 60)), BudgetLeased)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (0, 0)


def test_a_lease_that_does_not_fit_decides_nothing_and_is_no_denial():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    b.reserve("c1", 400_000, 10)
    version = b.s.version
    assert b.lease("L1", 600_001, 10) == []  # one micro too many
    assert b.lease("L2", 100, 91) == []  # tokens do not fit
    assert b.s.version == version and b.s.leases == {}
    assert not any(isinstance(e, BudgetExceeded) for e, _ in b.log)


def test_a_lease_on_an_exhausted_dimension_does_not_fit_even_empty():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", USD)
    b.commit("c1", USD)
    assert b.lease("L1", 0, 0) == []
    b.apply(decide_change_limit(b.state, 2 * USD, None))
    assert isinstance(only(b.lease("L1", 0, 0)), BudgetLeased)


def test_an_unlimited_dimension_takes_any_lease():
    b = Budget(limit_micro_usd=USD)  # tokens unlimited
    assert isinstance(only(b.lease("L1", USD, 10**9)), BudgetLeased)
    assert b.s.remaining_tokens is None and b.s.leased_tokens == 10**9


def test_leased_counts_against_reservations_and_reserved_against_leases():
    b = Budget(limit_micro_usd=USD)
    b.lease("L1", 700_000)
    denied = b.reserve("c1", 400_000)[-1]
    assert isinstance(denied, BudgetExceeded) and denied.available_micro_usd == 300_000
    assert isinstance(b.reserve("c2", 300_000)[-1], BudgetReserved)
    assert b.lease("L2", 1) == []
    b.return_lease("L1")
    assert isinstance(only(b.lease("L2", 700_000)), BudgetLeased)


def test_lease_of_an_open_id_is_idempotent_and_bad_input_is_refused():
    b = Budget(limit_micro_usd=USD)
    b.lease("L1", 100)
    assert b.lease("L1", 100) == [] and b.s.leased_micro_usd == 100
    with pytest.raises(ValueError):
        decide_lease(b.s, "L2", -1, 0, NOW, TTL)
    with pytest.raises(ValueError):
        decide_lease(b.s, "L2", 0, -1, NOW, TTL)
    with pytest.raises(BudgetNotOpened):
        decide_lease(None, "L2", 1, 1, NOW, TTL)
    # a BudgetLeased for an open id appended anyway changes nothing but the version
    b.apply([BudgetLeased(budget_id="b1", lease_id="L1", micro_usd=999, tokens=9,
                          expires_at=NOW)])
    assert b.s.leases["L1"].micro_usd == 100 and b.s.leased_micro_usd == 100


def test_a_commit_against_a_lease_takes_its_cost_out_of_the_lease():
    b = Budget(limit_micro_usd=USD, limit_tokens=1_000)
    b.lease("L1", 500_000, 500)
    ev = only(b.commit_leased("L1", "c1", 120_000, 80))
    assert ev == BudgetCommitted(budget_id="b1", call_id="c1", micro_usd=120_000, tokens=80,
                                 lease="L1")
    assert b.s.leases["L1"] == Lease(380_000, 420, NOW + TTL)
    assert (b.s.leased_micro_usd, b.s.leased_tokens) == (380_000, 420)
    assert (b.s.committed_micro_usd, b.s.committed_tokens) == (120_000, 80)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (500_000, 500)  # unchanged
    assert b.s.overruns == 0
    b.commit_leased("L1", "c2", 380_000, 420)  # uses it up exactly: still open, empty
    assert b.s.leases["L1"] == Lease(0, 0, NOW + TTL) and b.s.overruns == 0
    assert (b.s.leased_micro_usd, b.s.committed_micro_usd) == (0, 500_000)


def test_a_commit_above_what_is_left_of_the_lease_is_an_overrun():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    b.lease("L1", 900_000, 100)
    b.commit_leased("L1", "c1", 800_000, 10)
    ev = only(b.commit_leased("L1", "c2", 300_000, 20))
    assert (ev.micro_usd, ev.tokens) == (300_000, 20)  # the actual cost, never clamped
    assert (ev.overrun_micro_usd, ev.overrun_tokens) == (200_000, 0) and not ev.late
    assert b.s.leases["L1"] == Lease(0, 70, NOW + TTL)
    assert b.s.committed_micro_usd == 1_100_000 and b.s.overrun_micro_usd == 200_000
    assert b.s.overruns == 1
    # over the limit now, visibly; the dimension is exhausted: no lease, no reserve
    assert b.s.remaining_micro_usd == 0
    assert b.lease("L2", 0, 0) == []
    assert isinstance(b.reserve("c3")[-1], BudgetExceeded)


def test_a_late_commit_after_the_lease_was_returned_is_charged_in_full_as_overrun():
    b = Budget(limit_micro_usd=USD)
    b.lease("L1", 500_000)
    b.commit_leased("L1", "c1", 100_000)
    assert isinstance(only(b.return_lease("L1", "idle")), BudgetLeaseReturned)
    assert b.s.leases == {} and b.s.leased_micro_usd == 0
    assert b.s.remaining_micro_usd == 900_000  # what was left went back
    ev = only(b.commit_leased("L1", "c2", 50_000, 7))
    assert ev.late and (ev.overrun_micro_usd, ev.overrun_tokens) == (50_000, 7)
    assert ev.lease == "L1"
    assert b.s.committed_micro_usd == 150_000 and b.s.overrun_micro_usd == 50_000
    assert b.s.overrun_tokens == 7 and b.s.overruns == 1
    # an unknown lease too: charged, late
    assert only(b.commit_leased("nope", "c3", 1, 0)).late
    assert b.s.committed_micro_usd == 150_001


def test_a_commit_folded_after_the_lease_closed_is_late_whatever_the_event_says():
    """A commit appended without an expected version may land after the lease was
    returned, or after other commits used the lease up: the fold charges by the state."""
    b = Budget(limit_micro_usd=USD)
    b.lease("L1", 300_000)
    early = only(decide_commit_leased(b.s, "L1", "c1", 200_000, 0))
    other = only(decide_commit_leased(b.s, "L1", "c2", 200_000, 0))
    assert not early.late and early.overrun_micro_usd == 0 == other.overrun_micro_usd
    b.apply([early, other])  # decided on the same state: the second one overruns by 100_000
    assert b.s.leases["L1"].micro_usd == 0
    assert b.s.overrun_micro_usd == 100_000 and b.s.committed_micro_usd == 400_000
    stale = only(decide_commit_leased(b.s, "L1", "c3", 10_000, 0))
    b.return_lease("L1")
    b.apply([stale])
    assert b.s.overrun_micro_usd == 110_000 and b.s.committed_micro_usd == 410_000
    assert b.s.committed_micro_usd <= b.s.limit_micro_usd + b.s.overrun_micro_usd


def test_commit_leased_refuses_bad_input():
    b = Budget(limit_micro_usd=USD)
    b.lease("L1", 100)
    with pytest.raises(ValueError):
        decide_commit_leased(b.s, "L1", "c1", -1, 0)
    with pytest.raises(ValueError):
        decide_commit_leased(b.s, "L1", "c1", 0, -1)
    assert decide_commit_leased(None, "L1", "c1", 1, 1) == []


def test_return_gives_back_what_is_left_and_only_once():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    b.lease("L1", 400_000, 40)
    b.lease("L2", 100_000, 10)
    b.commit_leased("L1", "c1", 150_000, 15)
    ev = only(b.return_lease("L1", "shutdown"))
    assert ev == BudgetLeaseReturned(budget_id="b1", lease_id="L1", reason="shutdown")
    assert b.s.leases == {"L2": Lease(100_000, 10, NOW + TTL)}
    assert (b.s.leased_micro_usd, b.s.leased_tokens) == (100_000, 10)
    assert (b.s.remaining_micro_usd, b.s.remaining_tokens) == (750_000, 75)
    assert b.return_lease("L1") == [] and b.return_lease("never") == []
    assert decide_return_lease(None, "L1", "idle") == []
    version = b.s.version  # a return appended anyway for a closed lease: nothing but version
    b.apply([BudgetLeaseReturned(budget_id="b1", lease_id="L1", reason="idle")])
    assert b.s.version == version + 1 and b.s.leased_micro_usd == 100_000


def test_expire_returns_due_leases_with_reservations_oldest_first():
    b = Budget(limit_micro_usd=10 * USD)
    b.lease("L1", 100, ttl_s=30)
    b.reserve("c1", 100, ttl_s=10)
    b.lease("L2", 100, ttl_s=20)
    b.lease("L3", 100, ttl_s=100)
    events = b.expire(NOW + 30)
    assert [(type(e).__name__, getattr(e, "call_id", None) or e.lease_id, e.reason)
            for e in events] == [("BudgetReleased", "c1", EXPIRED),
                                 ("BudgetLeaseReturned", "L2", EXPIRED),
                                 ("BudgetLeaseReturned", "L1", EXPIRED)]
    assert list(b.s.leases) == ["L3"] and b.s.leased_micro_usd == 100


def test_lease_and_reserve_sweep_expired_leases_first():
    b = Budget(limit_micro_usd=USD)
    b.lease("L1", USD, ttl_s=10)
    assert b.lease("L2", 1, now=NOW + 5) == []
    events = b.lease("L2", USD, now=NOW + 10)
    assert [type(e) for e in events] == [BudgetLeaseReturned, BudgetLeased]
    assert events[0].reason == EXPIRED and list(b.s.leases) == ["L2"]
    # a refused lease still returns what expired
    events = b.lease("L3", 2 * USD, now=NOW + 10 + TTL)
    assert [type(e) for e in events] == [BudgetLeaseReturned] and b.s.leases == {}
    b.lease("L4", USD, ttl_s=1)
    events = b.reserve("c1", USD, now=NOW + 1)
    assert [type(e) for e in events] == [BudgetLeaseReturned, BudgetReserved]


def test_a_lost_instance_gives_back_its_leases_and_its_calls_are_charged_late():
    b = Budget(limit_micro_usd=USD)
    b.lease("L1", 300_000, instance="orch-1")
    b.lease("L2", 300_000, instance="orch-2")
    b.apply(decide_reserve(b.s, "c1", 100_000, 0, NOW, TTL, "orch-1"))
    events = b.apply(decide_release_instance(b.s, "orch-1"))
    assert {(type(e).__name__, e.reason) for e in events} == {
        ("BudgetReleased", "orchestrator-lost"), ("BudgetLeaseReturned", "orchestrator-lost")}
    assert list(b.s.leases) == ["L2"] and b.s.reservations == {}
    assert b.s.leased_micro_usd == 300_000
    assert decide_release_instance(b.s, "orch-1") == []  # a second survivor: nothing
    ev = only(b.commit_leased("L1", "c9", 40_000))  # a call of the lost process finishes
    assert ev.late and b.s.overrun_micro_usd == 40_000 and b.s.committed_micro_usd == 40_000


def test_lease_events_are_idempotent_on_redelivery():
    b = Budget(limit_micro_usd=USD, limit_tokens=100)
    b.lease("L1", 500_000, 50)
    b.commit_leased("L1", "c1", 100_000, 10)
    b.return_lease("L1")
    b.lease("L2", 10, 1)
    state = b.s
    for event, version in b.log:
        assert fold_budget(state, event, version) == state
    doubled = [item for item in b.log for _ in range(2)]
    assert fold_budget_events(doubled) == state


def test_lease_fold_never_goes_negative_on_bad_events():
    b = Budget(limit_micro_usd=USD)
    b.apply([BudgetLeased(budget_id="b1", lease_id="L1", micro_usd=-5, tokens=-5,
                          expires_at=NOW)])
    assert b.s.leases["L1"] == Lease(0, 0, NOW)
    b.apply([BudgetCommitted(budget_id="b1", call_id="c1", micro_usd=-7, tokens=-7,
                             lease="L1")])
    b.apply([BudgetLeaseReturned(budget_id="b1", lease_id="L1", reason="idle")])
    s = b.s
    assert min(s.leased_micro_usd, s.leased_tokens, s.committed_micro_usd,
               s.committed_tokens, s.overrun_micro_usd, s.overrun_tokens) == 0


def test_a_state_without_leases_keeps_its_old_shape():
    """Old budgets (no lease events) fold exactly as before: leases empty, leased 0."""
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 100)
    assert (b.s.leases, b.s.leased_micro_usd, b.s.leased_tokens) == ({}, 0, 0)
    assert b.s.remaining_micro_usd == USD - 100


# -- fold -------------------------------------------------------------------------------


def test_fold_ignores_events_before_the_budget_is_opened():
    assert fold_budget(None, BudgetReserved(budget_id="b1", call_id="c1", micro_usd=1,
                                            tokens=1, expires_at=NOW), 1) is None
    assert fold_budget(None, BudgetReleased(budget_id="b1", call_id="c1", reason="x"), 1) is None


def test_fold_ignores_already_folded_versions():
    b = Budget(limit_micro_usd=USD)
    b.reserve("c1", 100_000)
    b.reserve("c2", 200_000)
    state = b.s
    for event, version in b.log:
        assert fold_budget(state, event, version) == state
    assert fold_budget_events(b.log) == state
    assert fold_budget_events([e for e, _ in b.log]) == state  # numbered 1, 2, ...


def test_fold_never_goes_negative_on_bad_events():
    b = Budget(limit_micro_usd=USD)
    b.apply([BudgetReserved(budget_id="b1", call_id="c1", micro_usd=-5, tokens=-5,
                            expires_at=NOW)])
    b.apply([BudgetCommitted(budget_id="b1", call_id="c1", micro_usd=-7, tokens=-7)])
    assert (b.s.reserved_micro_usd, b.s.reserved_tokens) == (0, 0)
    assert (b.s.committed_micro_usd, b.s.committed_tokens) == (0, 0)


def test_a_second_open_changes_nothing():
    b = Budget(limit_micro_usd=USD)
    state = b.s
    b.apply([BudgetOpened(budget_id="b1", scope="tenant", owner="x", limit_micro_usd=1)])
    assert b.s == msgspec.structs.replace(state, version=2)


def test_events_round_trip_as_json():
    b = Budget(limit_micro_usd=USD, limit_tokens=100, scope="tenant", owner="acme",
               period="2026-11")
    b.reserve("c1", 500_000, 50)
    b.reserve("c2", 600_000, 10)
    b.commit("c1", 700_000, 60)
    b.release("c9", "failed")
    b.apply(decide_lease(b.state, "L1", 100_000, 10, NOW, TTL, "orch-1"))
    b.apply(decide_commit_leased(b.state, "L1", "c3", 50_000, 5))
    b.apply(decide_return_lease(b.state, "L1", "idle"))
    b.expire(NOW + TTL)
    b.apply(decide_change_limit(b.state, None, 5))
    names = {type(e).__name__ for e, _ in b.log}
    assert names == BUDGET_EVENT_TYPE_NAMES - {"BudgetReleased"}
    for event, _ in b.log:
        data = _encoder.encode(event)
        assert msgspec.json.decode(data)["type"] == type(event).__name__
        assert _decoder.decode(data) == event
    with pytest.raises(AttributeError):
        b.log[0][0].budget_id = "other"  # type: ignore[misc]


# -- streams and money ------------------------------------------------------------------


def test_stream_names_and_periods():
    assert budget_stream_for_session("abc") == "budget-session-abc"
    assert budget_stream_for_tenant("acme", "2026-11") == "budget-tenant-acme-2026-11"
    assert month_period(0) == "1970-01"
    assert month_period(1_796_083_199.5) == "2026-11"  # 2026-11-30T23:59:59.5Z
    assert month_period(1_796_083_200) == "2026-12"  # 2026-12-01T00:00:00Z
    assert Budget(owner="s9").s.stream == "budget-session-s9"
    assert Budget(scope="tenant", owner="acme", period="2026-11").s.stream == \
        "budget-tenant-acme-2026-11"


@pytest.mark.parametrize("usd, micro", [
    (0.0, 0), (1.0, 1_000_000), (0.1, 100_000), (0.35, 350_000), (2.675, 2_675_000),
    (0.0000005, 1), (0.0000004, 0), (0.0000015, 2), (0.0000025, 3), (1e-7, 0),
    (123.4567895, 123_456_790), (-0.0000005, -1), (3, 3_000_000),
])
def test_usd_to_micro_rounds_half_up(usd, micro):
    assert usd_to_micro(usd) == micro


def test_money_helpers():
    assert micro_to_usd(350_000) == 0.35
    assert micro_to_usd(usd_to_micro(12.345678)) == 12.345678
    assert [format_usd(m) for m in (0, 800_000, 350_000, 1_234, 12_500_000, -50_000)] == \
        ["0.00", "0.80", "0.35", "0.001234", "12.50", "-0.05"]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            usd_to_micro(bad)


@given(st.integers(min_value=0, max_value=10**15))
def test_micro_usd_round_trip(micro):
    assert usd_to_micro(micro_to_usd(micro)) == micro


# -- properties -------------------------------------------------------------------------

CALL_IDS = [f"c{i}" for i in range(6)]
limits_usd = st.none() | st.integers(min_value=0, max_value=3 * USD)
limits_tokens = st.none() | st.integers(min_value=0, max_value=5_000)
amounts_usd = st.integers(min_value=0, max_value=2 * USD)
amounts_tokens = st.integers(min_value=0, max_value=3_000)
call_ids = st.sampled_from(CALL_IDS)
ttls = st.sampled_from([0.0, 1.0, 5.0, 30.0, 1e9])


def usage(state: BudgetState) -> dict[str, tuple[int, int | None]]:
    """Per dimension: committed + reserved, less what calls spent beyond their reservations
    (the overruns, which no decision can prevent), and the limit."""
    return {
        "usd": (state.committed_micro_usd + state.reserved_micro_usd - state.overrun_micro_usd,
                state.limit_micro_usd),
        "tokens": (state.committed_tokens + state.reserved_tokens - state.overrun_tokens,
                   state.limit_tokens),
    }


class BudgetMachine(RuleBasedStateMachine):
    """Any interleaving of decisions keeps the budget within its limits."""

    change_limits = False

    def __init__(self) -> None:
        super().__init__()
        self.b: Budget | None = None
        self.now = NOW
        self.spent = (0, 0)  # the actual cost of every commit
        self.over_before: dict[str, int] = {}

    @initialize(limit_usd=limits_usd, limit_tokens=limits_tokens,
                scope=st.sampled_from(["session", "tenant"]))
    def open(self, limit_usd, limit_tokens, scope):
        self.b = Budget(limit_micro_usd=limit_usd, limit_tokens=limit_tokens, scope=scope,
                        period="2026-11" if scope == "tenant" else None)

    def step(self, events: list[Event]) -> list[Event]:
        assert self.b is not None
        before = usage(self.b.s)
        version = self.b.s.version
        self.b.apply(events)
        assert self.b.s.version == version + len(events)
        after = usage(self.b.s)
        for dim, (used, limit) in after.items():
            if limit is not None and used > limit:
                # only possible after a limit was lowered below usage, and then usage
                # never grows until it is back under the limit
                assert self.change_limits and used <= before[dim][0], (dim, before, after)
        return events

    @rule(call_id=call_ids, micro_usd=amounts_usd, tokens=amounts_tokens, ttl=ttls)
    def reserve(self, call_id, micro_usd, tokens, ttl):
        s = self.b.s
        was_open = call_id in s.reservations
        events = self.step(decide_reserve(s, call_id, micro_usd, tokens, self.now, ttl))
        if was_open:
            assert events == []
            return
        assert all(isinstance(e, BudgetReleased) and e.reason == EXPIRED for e in events[:-1])
        verdict = events[-1]
        exhausted = (s.limit_micro_usd is not None and s.committed_micro_usd >= s.limit_micro_usd
                     or s.limit_tokens is not None and s.committed_tokens >= s.limit_tokens)
        if isinstance(verdict, BudgetReserved):
            assert not exhausted  # an overspent (or exactly spent) budget admits nothing
            assert self.b.s.reservations[call_id] == Reservation(micro_usd, tokens,
                                                                 self.now + ttl)
        else:
            assert isinstance(verdict, BudgetExceeded)
            assert call_id not in self.b.s.reservations
            assert verdict.reason.startswith(f"{s.scope} budget: ")
            assert exhausted or (verdict.available_micro_usd is not None
                                 and micro_usd > verdict.available_micro_usd) or \
                   (verdict.available_tokens is not None and tokens > verdict.available_tokens)

    @rule(call_id=call_ids, micro_usd=amounts_usd, tokens=amounts_tokens)
    def commit(self, call_id, micro_usd, tokens):
        s = self.b.s
        res = s.reservations.get(call_id)
        events = self.step(decide_commit(s, call_id, micro_usd, tokens))
        if res is None and call_id in s.lapsed:  # outlived its reservation: charged, late
            ev = only(events)
            assert ev.late and (ev.overrun_micro_usd, ev.overrun_tokens) == (micro_usd, tokens)
            assert call_id not in self.b.s.lapsed
            assert self.b.s.committed_micro_usd == s.committed_micro_usd + micro_usd
            self.spent = (self.spent[0] + micro_usd, self.spent[1] + tokens)
            return
        if res is None:
            assert events == []
            return
        ev = only(events)
        assert isinstance(ev, BudgetCommitted)
        assert (ev.micro_usd, ev.tokens) == (micro_usd, tokens)  # the actual cost, never clamped
        assert ev.overrun_micro_usd == max(0, micro_usd - res.micro_usd)
        assert ev.overrun_tokens == max(0, tokens - res.tokens)
        n = self.b.s
        assert call_id not in n.reservations
        assert n.committed_micro_usd == s.committed_micro_usd + micro_usd
        assert n.committed_tokens == s.committed_tokens + tokens
        assert n.overrun_micro_usd == s.overrun_micro_usd + ev.overrun_micro_usd
        assert n.overrun_tokens == s.overrun_tokens + ev.overrun_tokens
        self.spent = (self.spent[0] + micro_usd, self.spent[1] + tokens)
        assert n.reserved_micro_usd == s.reserved_micro_usd - res.micro_usd
        assert n.reserved_tokens == s.reserved_tokens - res.tokens

    @rule(call_id=call_ids, reason=st.sampled_from(["failed", "cancelled"]))
    def release(self, call_id, reason):
        s = self.b.s
        events = self.step(decide_release(s, call_id, reason))
        assert len(events) == (call_id in s.reservations)
        assert call_id not in self.b.s.reservations
        assert self.b.s.committed_micro_usd == s.committed_micro_usd

    @rule()
    def expire(self):
        s = self.b.s
        events = self.step(decide_expire(s, self.now))
        due = {c for c, r in s.reservations.items() if r.expires_at <= self.now}
        assert {e.call_id for e in events} == due
        assert all(r.expires_at > self.now for r in self.b.s.reservations.values())

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 5.0, 30.0, 100.0]))
    def tick(self, dt):
        self.now += dt

    @rule(data=st.data())
    def redeliver(self, data):
        """A duplicate delivery of any folded event at its version changes nothing."""
        event, version = data.draw(st.sampled_from(self.b.log))
        assert fold_budget(self.b.s, event, version) == self.b.s

    @precondition(lambda self: self.change_limits)
    @rule(limit_usd=limits_usd, limit_tokens=limits_tokens)
    def change_limit(self, limit_usd, limit_tokens):
        self.b.apply(decide_change_limit(self.b.s, limit_usd, limit_tokens))
        assert (self.b.s.limit_micro_usd, self.b.s.limit_tokens) == (limit_usd, limit_tokens)

    @invariant()
    def within_limits_and_non_negative(self):
        if self.b is None:
            return
        s = self.b.s
        for value in (s.reserved_micro_usd, s.reserved_tokens, s.committed_micro_usd,
                      s.committed_tokens):
            assert value >= 0
        assert s.reserved_micro_usd == sum(r.micro_usd for r in s.reservations.values())
        assert s.reserved_tokens == sum(r.tokens for r in s.reservations.values())
        for remaining in (s.remaining_micro_usd, s.remaining_tokens):
            assert remaining is None or remaining >= 0
        assert (s.committed_micro_usd, s.committed_tokens) == self.spent  # committed is spent
        if not self.change_limits:
            for dim, (used, limit) in usage(s).items():
                assert limit is None or used <= limit, (dim, used, limit)

    @invariant()
    def fold_from_scratch_equals_incremental_state(self):
        if self.b is None:
            return
        assert fold_budget_events(self.b.log) == self.b.s
        decoded = [(_decoder.decode(_encoder.encode(e)), v) for e, v in self.b.log]
        assert fold_budget_events(decoded) == self.b.s


class LimitChangingBudgetMachine(BudgetMachine):
    """Limits may also be changed, even below usage: usage then only goes down."""

    change_limits = True


_machine_settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = _machine_settings
TestLimitChangingBudgetMachine = LimitChangingBudgetMachine.TestCase
TestLimitChangingBudgetMachine.settings = _machine_settings


# op lists: the same properties from generated scripts, plus duplicate delivery

ops = st.lists(st.one_of(
    st.tuples(st.just("reserve"), call_ids, amounts_usd, amounts_tokens, ttls),
    st.tuples(st.just("commit"), call_ids, amounts_usd, amounts_tokens),
    st.tuples(st.just("release"), call_ids),
    st.tuples(st.just("expire")),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 10.0, 100.0])),
), max_size=40)


def run_ops(limit_usd, limit_tokens, script) -> Budget:
    b, now = Budget(limit_micro_usd=limit_usd, limit_tokens=limit_tokens), NOW
    for op, *args in script:
        if op == "reserve":
            call_id, micro_usd, tokens, ttl = args
            b.reserve(call_id, micro_usd, tokens, now=now, ttl_s=ttl)
        elif op == "commit":
            b.commit(*args)
        elif op == "release":
            b.release(args[0], "failed")
        elif op == "expire":
            b.expire(now)
        else:
            now += args[0]
    return b


@settings(max_examples=200, deadline=None)
@given(limits_usd, limits_tokens, ops)
def test_generated_scripts_never_overspend(limit_usd, limit_tokens, script):
    b = run_ops(limit_usd, limit_tokens, script)
    for used, limit in usage(b.s).values():
        assert limit is None or used <= limit
    assert min(b.s.reserved_micro_usd, b.s.reserved_tokens, b.s.committed_micro_usd,
               b.s.committed_tokens) >= 0
    assert fold_budget_events(b.log) == b.s


@settings(max_examples=200, deadline=None)
@given(limits_usd, limits_tokens, ops, st.data())
def test_duplicate_delivery_does_not_change_the_state(limit_usd, limit_tokens, script, data):
    b = run_ops(limit_usd, limit_tokens, script)
    # each event delivered again right after itself, or any already-folded event again
    # later, at its version: the fold ignores it
    doubled = [item for item in b.log for _ in range(2)]
    assert fold_budget_events(doubled) == b.s
    extra = data.draw(st.lists(st.tuples(st.integers(0, len(b.log) - 1),
                                         st.integers(0, len(b.log) - 1)), max_size=10))
    log = list(b.log)
    for src, at in sorted(extra, key=lambda p: -p[1]):
        if src <= at:  # redeliver event `src` after event `at` has been folded
            log.insert(at + 1, b.log[src])
    assert fold_budget_events(log) == b.s


# -- the prompt's worst case ------------------------------------------------------------


def test_prompt_bound_counts_utf8_bytes_and_template_tokens():
    from shared.domain.budget import (TEMPLATE_TOKENS_FOR_TOOLS, TEMPLATE_TOKENS_PER_CALL,
                               TEMPLATE_TOKENS_PER_MESSAGE, prompt_token_bound)
    from shared.contracts.messages import ChatMessage

    per_call, per_msg = TEMPLATE_TOKENS_PER_CALL, TEMPLATE_TOKENS_PER_MESSAGE
    assert prompt_token_bound([ChatMessage(role="user", content="hi")]) == 2 + per_msg + per_call
    # bytes, not characters: "é" is 2 bytes, "😀" 4 (a byte-fallback tokenizer may spend 4)
    assert prompt_token_bound([ChatMessage(role="user", content="é😀")]) == 6 + per_msg + per_call
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    call = ChatMessage(role="assistant", tool_calls=[{"id": "1", "function": {"name": "f"}}])
    with_tools = prompt_token_bound([call], tools)
    assert with_tools == (len(msgspec.json.encode(call.tool_calls)) + per_msg + per_call
                          + len(msgspec.json.encode(tools)) + TEMPLATE_TOKENS_FOR_TOOLS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=5))
def test_prompt_bound_is_at_least_the_bytes_of_the_text(texts):
    from shared.domain.budget import prompt_token_bound
    from shared.contracts.messages import ChatMessage

    messages = [ChatMessage(role="user", content=t) for t in texts]
    assert prompt_token_bound(messages) >= sum(len(t.encode()) for t in texts) + 4 * len(texts)


def test_reserved_prompt_covers_redaction_placeholders():
    from services.orchestrator.calls import reserved_prompt_tokens
    from shared.domain.budget import prompt_token_bound
    from shared.contracts.messages import ChatMessage

    messages = (ChatMessage(role="user", content="mail a@b.io " * 20),)
    plain = prompt_token_bound(messages)
    redacted = reserved_prompt_tokens(messages, None, ("email",))
    # "[REDACTED:email]" is longer than "a@b.io": what is sent is bounded, not what was typed
    assert redacted == plain + 20 * (len("[REDACTED:email]") - len("a@b.io"))
    assert reserved_prompt_tokens(messages, None, ()) == plain
