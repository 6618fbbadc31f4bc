"""The budget manager: reserve before a call, commit after, release on failure.

"Never overspent, under any concurrency and with several orchestrator processes":
every change is decided on the latest state of the budget's stream and appended at
that stream's version (`expected_version`). When another process appended first the
append fails, the state is caught up and the decision taken again. A call charged to
two budgets (its session's and its tenant's month) reserves on both in one atomic
append.

Correctness comes from Postgres alone. Two things only reduce contention: a per-stream
asyncio lock, so the calls of one process take turns on a budget instead of racing
each other into version conflicts, and denials (`BudgetExceeded`) recorded on the
call's own stream (`llmcall-<id>`), since they change no budget.

The folded states (and their locks) are cached per stream, at most `cache_size` of them
(`NEXUS_BUDGET_CACHE_SIZE`), least recently used first out; an evicted budget is folded
again from the store when it is next used. A stream whose lock is held is never evicted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from shared.domain.budget import (
    TENANT,
    BudgetState,
    budget_stream_for_run,
    budget_stream_for_session,
    budget_stream_for_tenant,
    decide_change_limit,
    decide_commit,
    decide_expire,
    decide_open,
    decide_release,
    decide_release_instance,
    decide_reserve,
    fold_budget,
    month_period,
)
from shared.contracts.events import (
    BudgetCommitted,
    BudgetExceeded,
    Event,
    Metadata,
    TenantBudgetSet,
    llmcall_stream,
    tenant_stream,
)
from shared.contracts.errors import BudgetDenied
from shared.infra.eventstore import EventStore, WrongExpectedVersion
from services.orchestrator.joint import Append, Rider, append_joint
from services.orchestrator.read_models.budgets import BudgetsReadModel

log = logging.getLogger("nexus.orchestrator.budget")

MAX_RETRIES = 200
TENANT_LIMITS_TTL_S = 5.0


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(attempt, 6))))


@dataclass(frozen=True)
class Charge:
    """What a call is charged to: the budget streams that exist for it."""

    call_id: str
    streams: tuple[str, ...]
    tenant: str
    session_id: str


class _LockTable:
    """Per-stream locks, created on demand and dropped with the stream's cached state."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __getitem__(self, stream: str) -> asyncio.Lock:
        lock = self._locks.get(stream)
        if lock is None:
            lock = self._locks[stream] = asyncio.Lock()
        return lock

    def busy(self, stream: str) -> bool:
        lock = self._locks.get(stream)
        return lock is not None and (lock.locked() or bool(getattr(lock, "_waiters", None)))

    def drop(self, stream: str) -> None:
        self._locks.pop(stream, None)

    def __len__(self) -> int:
        return len(self._locks)


class BudgetManager:
    def __init__(self, store: EventStore, *, reservation_ttl_s: float = 600.0,
                 cache_size: int = 10_000, instance: str | None = None) -> None:
        self.store = store
        self.instance = instance  # recorded on each reservation (liveness.py releases a lost one's)
        self.read_model = BudgetsReadModel(store)
        self.ttl_s = reservation_ttl_s
        self.cache_size = max(1, cache_size)
        self._states: OrderedDict[str, BudgetState | None] = OrderedDict()
        self._locks = _LockTable()
        self._tenant_limits: dict[str, tuple[float, TenantBudgetSet | None]] = {}

    def _cache(self, stream: str, state: BudgetState | None) -> None:
        """Remember a stream's state as the most recently used; evict beyond `cache_size`."""
        self._states[stream] = state
        self._states.move_to_end(stream)
        if len(self._states) <= self.cache_size:
            return
        for old in list(self._states):
            if len(self._states) <= self.cache_size:
                break
            if old != stream and not self._locks.busy(old):
                del self._states[old]
                self._locks.drop(old)

    def cached_streams(self) -> int:
        """How many budget states this process holds (bounded by `cache_size`)."""
        return len(self._states)

    async def state(self, stream: str, *, to_position: int | None = None,
                    cached: bool = False) -> BudgetState | None:
        """The budget's state: cached and caught up with the stream (or as of a position).

        `cached=True` takes the cached state as it is when there is one: for a first
        attempt whose append is checked against the stream's version anyway (a stale
        state only costs a retry, never a wrong decision).
        """
        if cached and self._states.get(stream) is not None:
            self._states.move_to_end(stream)
            return self._states[stream]
        if to_position is not None:
            state = None
            for rec in await self.store.read_stream(stream, to_position=to_position):
                state = fold_budget(state, rec.event, rec.stream_version)
            return state
        state = self._states.get(stream)
        start = state.version + 1 if state else 1
        for rec in await self.store.read_stream(stream, from_version=start):
            state = fold_budget(state, rec.event, rec.stream_version)
        self._cache(stream, state)
        return state

    def _remember(self, stream: str, state: BudgetState | None, events: list[Event]) -> None:
        """Fold what we just appended (at `state.version` + 1...) into the cache."""
        if state is None:
            return
        base = state.version
        for offset, event in enumerate(events, start=1):
            state = fold_budget(state, event, base + offset)
        self._cache(stream, state)

    async def set_tenant_budget(self, tenant: str, limit_micro_usd: int | None,
                                limit_tokens: int | None, metadata: Metadata) -> None:
        await self.store.append(tenant_stream(tenant), [TenantBudgetSet(
            tenant=tenant, limit_micro_usd=limit_micro_usd, limit_tokens=limit_tokens)],
            expected_version=None, metadata=metadata)
        self._tenant_limits.pop(tenant, None)
        # the current month's budget, if already open, takes the new limits now (raising
        # them is how an overspent month opens again)
        stream = budget_stream_for_tenant(tenant, month_period(time.time()))
        async with self._locks[stream]:
            for attempt in range(MAX_RETRIES):
                state = await self.state(stream)
                if state is None:
                    return
                events = decide_change_limit(state, limit_micro_usd, limit_tokens)
                if not events:
                    return
                try:
                    await self.store.append(stream, events, expected_version=state.version,
                                            metadata=metadata)
                    self._remember(stream, state, events)
                    return
                except WrongExpectedVersion:
                    await _backoff(attempt)

    async def tenant_limits(self, tenant: str) -> TenantBudgetSet | None:
        """The tenant's monthly limits; cached 5 s (a change applies from then on)."""
        cached = self._tenant_limits.get(tenant)
        if cached is not None and time.monotonic() - cached[0] < TENANT_LIMITS_TTL_S:
            return cached[1]
        events = await self.store.read_stream(tenant_stream(tenant))
        last = [e.event for e in events if isinstance(e.event, TenantBudgetSet)]
        limits = last[-1] if last else None
        self._tenant_limits[tenant] = (time.monotonic(), limits)
        return limits

    async def charge_for(self, call_id: str, tenant: str, session_id: str,
                         now: float | None = None, run_id: str | None = None) -> Charge:
        """The budgets a new call must fit: the session's (if any), the agent run's (if
        it has one), the tenant's month (if set)."""
        streams = []
        session = budget_stream_for_session(session_id)
        if await self.state(session, cached=True) is not None:  # budgets never close
            streams.append(session)
        if run_id is not None:
            run = budget_stream_for_run(run_id)
            if await self.state(run, cached=True) is not None:
                streams.append(run)
        limits = await self.tenant_limits(tenant)
        if limits is not None:
            period = month_period(now or time.time())
            stream = budget_stream_for_tenant(tenant, period)
            if await self.state(stream, cached=True) is None:
                events = decide_open(None, stream, TENANT, tenant,
                                     limit_micro_usd=limits.limit_micro_usd,
                                     limit_tokens=limits.limit_tokens, period=period)
                try:
                    await self.store.append(stream, events, expected_version=0,
                                            metadata=Metadata(tenant=tenant, actor="orchestrator"))
                except WrongExpectedVersion:
                    pass  # another process opened it first
            streams.append(stream)
        return Charge(call_id, tuple(streams), tenant, session_id)

    async def reserve(self, charge: Charge, micro_usd: int, tokens: int,
                      metadata: Metadata,
                      with_events: tuple[tuple[str, list[Event]], ...] = (),
                      before=None, require: tuple[tuple[str, int], ...] = ()) -> None:
        """Reserve on every budget of the charge atomically, or raise `BudgetDenied`.

        `before(conn)` runs in the reservation's transaction, only when the budgets
        allow the call (e.g. taking its rate-limit slots); what it raises undoes the
        reservation and propagates.

        `with_events` (stream, events) are appended in the same transaction, whatever the
        verdict (e.g. the call's `PolicyEvaluated`): one commit instead of two.

        `require` (stream, version): streams that must be unchanged at commit (the call's
        session still open); one that moved raises `WrongExpectedVersion` for it, at once.
        """
        locks = []
        for stream in sorted(charge.streams):  # taken one by one: a held lock is never evicted
            lock = self._locks[stream]
            await lock.acquire()
            locks.append(lock)
        try:
            await self._reserve(charge, micro_usd, tokens, metadata, with_events, before, require)
        finally:
            for lock in reversed(locks):
                lock.release()

    async def _reserve(self, charge: Charge, micro_usd: int, tokens: int, metadata: Metadata,
                       with_events: tuple[tuple[str, list[Event]], ...], before=None,
                       require: tuple[tuple[str, int], ...] = ()) -> None:
        extra = [(stream, events, None) for stream, events in with_events]
        for attempt in range(MAX_RETRIES):
            now = time.time()
            appends: list[tuple[str, list[Event], int | None]] = []
            states: dict[str, BudgetState] = {}
            denial: BudgetExceeded | None = None
            for stream in charge.streams:
                state = await self.state(stream, cached=attempt == 0)
                assert state is not None
                states[stream] = state
                events = decide_reserve(state, charge.call_id, micro_usd, tokens, now, self.ttl_s,
                                        self.instance)
                if events and isinstance(events[-1], BudgetExceeded):
                    denial = events[-1]
                    events = events[:-1]  # expired releases still happen
                if events:
                    appends.append((stream, events, state.version))
                if denial is not None:
                    break
            try:
                if denial is not None:
                    await self.store.append_atomic(
                        [*appends, *extra, (llmcall_stream(charge.call_id), [denial], None)],
                        metadata, require=require)
                    for stream, events, _ in appends:
                        self._remember(stream, states[stream], events)
                    scope = ("session" if denial.budget_id.startswith("budget-session-") else
                             "run" if denial.budget_id.startswith("budget-run-") else "tenant")
                    raise BudgetDenied(scope, denial.reason)
                if appends or extra or before is not None:
                    await self.store.append_atomic([*appends, *extra], metadata, before=before,
                                                   require=require)
                    for stream, events, _ in appends:
                        self._remember(stream, states[stream], events)
                return
            except WrongExpectedVersion as exc:
                if exc.stream_id not in charge.streams:
                    raise  # a required stream moved (the session closed): not contention
                await _backoff(attempt)  # another process moved a budget: catch up, decide again
        raise BudgetDenied("contention", "budget is too contended right now; retry")

    async def _settle(self, charge: Charge, decide, metadata: Metadata,
                      rider: Rider | None = None, outcome: Any = None,
                      with_events: list[Append] | None = None) -> list[Event]:
        """`decide` on each budget; `with_events` (appends that must be recorded: the
        call's conversation) and `rider`'s events (joint.py) go with the last one's, in
        its transaction. A commit refused (the budget moved on) is decided again with them
        still attached: they commit exactly once, alone if no budget append takes them."""
        settled: list[Event] = []
        riders = list(with_events or ())
        for stream in charge.streams:
            async with self._locks[stream]:
                for attempt in range(MAX_RETRIES):
                    state = await self.state(stream, cached=attempt == 0)
                    events = decide(state)
                    if not events:
                        break
                    last = stream == charge.streams[-1]
                    joint = rider if last else None
                    try:
                        await append_joint(self.store, [(stream, events, state.version),
                                                        *(riders if last else ())],
                                           metadata, joint, outcome)
                        rider = None if joint is not None else rider  # recorded, or refused
                        riders = [] if last else riders
                        self._remember(stream, state, events)
                        settled += events
                        break
                    except WrongExpectedVersion:
                        await _backoff(attempt)
                else:
                    log.error("could not settle a reservation; the sweeper will release it",
                              extra={"call_id": charge.call_id, "budget": stream})
        if rider is not None or riders:  # nothing appended on the last budget: theirs alone
            await append_joint(self.store, riders, metadata, rider, outcome)
        return settled

    async def commit(self, charge: Charge, micro_usd: int, tokens: int,
                     metadata: Metadata, rider: Rider | None = None,
                     outcome: Any = None,
                     with_events: list[Append] | None = None) -> list[BudgetCommitted]:
        """Commit the actual cost on every budget; the commits appended (overruns on them).
        `with_events` (the conversation) and `rider`'s events for `outcome` (an agent
        run's answer) commit with the last one, in its transaction."""
        events = await self._settle(
            charge, lambda s: decide_commit(s, charge.call_id, micro_usd, tokens), metadata,
            rider, outcome, with_events)
        return [e for e in events if isinstance(e, BudgetCommitted)]

    async def release(self, charge: Charge, reason: str, metadata: Metadata) -> None:
        await self._settle(charge, lambda s: decide_release(s, charge.call_id, reason), metadata)

    async def sweep_expired(self, now: float | None = None) -> int:
        """Release reservations whose owner died (found from the events, so restarts keep them)."""
        now = now or time.time()
        # The `budgets` projection folds the events, open reservations included: ask it
        # which budgets hold an expired one (cheap, and rebuilt from the events after a
        # restart), then decide on each stream's own state.
        return await self._release_on(await self.read_model.with_expired_reservations(now),
                                      lambda state: decide_expire(state, now))

    async def release_orphans(self, instance: str) -> int:
        """Release the open reservations of `instance`, an orchestrator process known to
        be lost (`BudgetReleased`, reason "orchestrator-lost"); how many were released.

        Fenced and idempotent: each budget's releases are decided on its caught-up state
        and appended at its version, so a reservation committed or released meanwhile is
        left alone, and of two survivors doing this at once one appends, the other finds
        nothing left to release.
        """
        return await self._release_on(await self.read_model.with_reservations_of(instance),
                                      lambda state: decide_release_instance(state, instance))

    async def _release_on(self, streams, decide) -> int:
        """Append what `decide(state)` releases on each budget stream, at its version."""
        released = 0
        for stream in streams:
            async with self._locks[stream]:
                for attempt in range(MAX_RETRIES):
                    state = await self.state(stream)
                    events = decide(state)
                    if not events:
                        break
                    owner = state.owner if state.scope == "session" else None
                    try:
                        await self.store.append(stream, events, expected_version=state.version,
                                                metadata=Metadata(actor="orchestrator",
                                                                  correlation_id=owner))
                        self._remember(stream, state, events)
                        released += len(events)
                        break
                    except WrongExpectedVersion:
                        await _backoff(attempt)
        return released
