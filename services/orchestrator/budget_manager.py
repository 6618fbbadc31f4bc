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

**Leases** (escrow, issue 16; `NEXUS_BUDGET_LEASE_CALLS` > 0): instead of a reservation
appended per call, the process takes a slice of a budget once (`BudgetLeased`, a
version-checked append like a reservation, counted against the limit) and admits calls
against it in memory: each call holds its worst case out of the slice's free part, and
its settle appends `BudgetCommitted(lease=...)` (no version check: the slice is already
counted), which moves the actual cost from the slice into `committed`. No overspend:
`committed + reserved + leased <= limit` is decided on the stream's latest state for
every lease, and a process never holds more than what is left of its slices. A slice
is at most a quarter of the budget's room (near the limit calls take the exact path, a
reservation each, so a slice idle in another process denies little), starts at
`LEASE_FIRST_CALLS` calls' worst case and doubles while slices are used up quickly, up
to `NEXUS_BUDGET_LEASE_CALLS`; it is returned (`BudgetLeaseReturned`) once it has been
idle `LEASE_IDLE_S`, used up, near its expiry, or at shutdown. The next slice is taken
ahead, in a task of its own, once the current one has room for less than a quarter of
its calls (`LEASE_AHEAD_SHARE`): the call that uses a slice up finds the next one there,
so no call waits for a lease's append while calls keep coming (at 64 calls a slice and
two budgets per call, one call in 32 waited for two appends). A slice taken ahead and
never used goes back like an idle one. A lost process's slices
are returned by a survivor (`liveness.py`, "orchestrator-lost") or expire; a call it
admitted that finishes anyway is charged late, in full, as overrun. Calls whose policy
has rate limits (their slots are taken in the admission's transaction) take the exact
path. The call's own admission events (its `PolicyEvaluated`) are then recorded by its
settle, with the cost: `reserve` returns them.
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
    IDLE,
    SHUTDOWN,
    TENANT,
    USED,
    BudgetState,
    Lease,
    budget_stream_for_run,
    commit_on_lease,
    budget_stream_for_session,
    budget_stream_for_tenant,
    decide_change_limit,
    decide_commit,
    decide_lease,
    decide_return_lease,
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
    BudgetLeased,
    Event,
    Metadata,
    TenantBudgetSet,
    llmcall_stream,
    new_id,
    tenant_stream,
)
from shared.contracts.errors import BudgetDenied
from shared.infra.eventstore import EventStore, WrongExpectedVersion
from services.orchestrator.joint import Append, Rider, append_joint
from services.orchestrator.read_models.budgets import BudgetsReadModel

log = logging.getLogger("nexus.orchestrator.budget")

MAX_RETRIES = 200
TENANT_LIMITS_TTL_S = 5.0
LEASE_FIRST_CALLS = 8  # a first slice covers this many worst cases of the call taking it
LEASE_IDLE_S = 5.0  # a slice unused this long is returned
LEASE_QUICK_S = 1.0  # a slice used up sooner: the next one is twice as large
LEASE_ROOM_SHARE = 4  # a slice is at most 1/4 of the budget's room
LEASE_AHEAD_SHARE = 4  # the next slice is taken once less than 1/4 of the calls are left


@dataclass
class _Lease:
    """A slice this process holds: what is left of it (on the stream: `BudgetLeased`
    minus the commits against it) and what its admitted calls hold of that."""

    lease_id: str
    stream: str
    tenant: str
    left_usd: int
    left_tokens: int
    expires_at: float
    taken_at: float
    used_at: float
    calls: int = 1  # how many worst cases of the call that took it it was sized for
    held_usd: int = 0
    held_tokens: int = 0
    holds: int = 0
    retired: bool = False  # no new holds; returned once its holds are settled

    def fits(self, micro_usd: int, tokens: int) -> bool:
        return (not self.retired and self.left_usd - self.held_usd >= micro_usd
                and self.left_tokens - self.held_tokens >= tokens)

    def running_low(self, micro_usd: int, tokens: int) -> bool:
        """Room for less than a quarter of its calls of this size: time to take the next."""
        ahead = max(1, self.calls // LEASE_AHEAD_SHARE)
        return not self.fits(micro_usd * ahead, tokens * ahead)


def _slice(wanted: int, one: int, room: int | None) -> int | None:
    """A slice's amount in one dimension: `wanted`, at most a share of the `room` (None:
    unlimited); None when that would not fit even `one` call."""
    if room is None:
        return wanted
    amount = min(wanted, room // LEASE_ROOM_SHARE)
    return amount if amount >= one else None


def _as_lease(lease: _Lease) -> Lease:
    return Lease(lease.left_usd, lease.left_tokens, lease.expires_at)


def _lease_metadata(tenant: str, state: BudgetState | None) -> Metadata:
    owner = state.owner if state is not None and state.scope != TENANT else None
    return Metadata(tenant=tenant, actor="orchestrator", correlation_id=owner)


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
                 cache_size: int = 10_000, instance: str | None = None,
                 lease_calls: int = 0) -> None:
        self.store = store
        self.instance = instance  # recorded on each reservation (liveness.py releases a lost one's)
        self.read_model = BudgetsReadModel(store)
        self.ttl_s = reservation_ttl_s
        self.cache_size = max(1, cache_size)
        self._states: OrderedDict[str, BudgetState | None] = OrderedDict()
        self._locks = _LockTable()
        self._tenant_limits: dict[str, tuple[float, TenantBudgetSet | None]] = {}
        self.lease_calls = lease_calls  # 0: no leases
        self._leases: dict[str, _Lease] = {}  # the current slice of each budget stream
        self._spares: dict[str, _Lease] = {}  # the next slice, taken ahead (module doc)
        self._taking: dict[str, asyncio.Task[None]] = {}  # next slices being taken ahead
        self._returning: set[asyncio.Task[None]] = set()  # returns under way (kept: not GC'd)
        self._holds: dict[str, list[tuple[_Lease, int, int]]] = {}  # call id -> its holds
        self._next_calls: dict[str, int] = {}  # the next slice's size per stream, in calls

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

    def _remember_at(self, stream: str, event: Event, version: int) -> None:
        """Fold `event`, appended at `version` without a version check, into the cached
        state when that state is the one just before it (else the cache stays as it is
        and the next read catches up): a leased call's commit, so that taking the next
        lease reads no commit back from the store."""
        state = self._states.get(stream)
        if state is not None and state.version == version - 1:
            self._remember(stream, state, [event])

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
                      before=None, require: tuple[tuple[str, int], ...] = ()
                      ) -> tuple[tuple[str, list[Event]], ...]:
        """Reserve on every budget of the charge atomically, or raise `BudgetDenied`.
        Returns the `with_events` it did not append: admitted from this process's
        leases (module doc), the call appends nothing now, and its settle records them.

        `before(conn)` runs in the reservation's transaction, only when the budgets
        allow the call (e.g. taking its rate-limit slots); what it raises undoes the
        reservation and propagates.

        `with_events` (stream, events) are appended in the same transaction, whatever the
        verdict (e.g. the call's `PolicyEvaluated`): one commit instead of two.

        `require` (stream, version): streams that must be unchanged at commit (the call's
        session still open); one that moved raises `WrongExpectedVersion` for it, at once.
        """
        if self.lease_calls and before is None and await self._hold(charge, micro_usd, tokens):
            for stream, version in require:  # a read, not an append: still as the call saw it
                actual = await self.store.stream_version(stream)
                if actual != version:
                    self._unhold(charge.call_id)
                    raise WrongExpectedVersion(stream, version, actual)
            return with_events
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
        return ()

    # -- leases (module doc) ------------------------------------------------------------

    def leased(self, call_id: str) -> bool:
        """The call was admitted from leases (its settle records its admission events)."""
        return call_id in self._holds

    async def _hold(self, charge: Charge, micro_usd: int, tokens: int) -> bool:
        """Hold the call's worst case on a slice of every budget of the charge (taking a
        slice where there is none with room); False (nothing held): the exact path."""
        if not charge.streams:
            return False
        held: list[tuple[_Lease, int, int]] = []
        for stream in charge.streams:
            lease = self._leases.get(stream)
            if lease is None or not lease.fits(micro_usd, tokens):
                lease = await self._take_lease(charge, stream, micro_usd, tokens)
            if lease is None or not lease.fits(micro_usd, tokens):
                for taken, usd, tok in held:
                    self._release_hold(taken, usd, tok)
                return False
            lease.held_usd += micro_usd
            lease.held_tokens += tokens
            lease.holds += 1
            lease.used_at = time.monotonic()
            held.append((lease, micro_usd, tokens))
        self._holds[charge.call_id] = held
        for lease, usd, tok in held:
            if lease.running_low(usd, tok):
                self._take_ahead(charge, lease.stream, usd, tok)
        return True

    def _take_ahead(self, charge: Charge, stream: str, micro_usd: int, tokens: int) -> None:
        """Take the stream's next slice in a task of its own, unless one is taken or being
        taken already (module doc)."""
        if stream in self._spares or stream in self._taking:
            return
        task = asyncio.ensure_future(self._take_spare(charge, stream, micro_usd, tokens))
        self._taking[stream] = task
        task.add_done_callback(lambda _: self._taking.pop(stream, None))

    async def _take_spare(self, charge: Charge, stream: str, micro_usd: int, tokens: int) -> None:
        try:
            async with self._locks[stream]:
                current = self._leases.get(stream)
                if stream in self._spares or current is None or current.retired:
                    return  # taken meanwhile, or the slice went: the next call takes one
                spare = await self._new_lease(charge, stream, micro_usd, tokens, current)
                if spare is not None:
                    self._spares[stream] = spare
        except Exception:
            log.exception("taking the next budget lease ahead failed; the call that needs "
                          "it takes one", extra={"budget": stream})

    def _unhold(self, call_id: str) -> list[tuple[_Lease, int, int]]:
        held = self._holds.pop(call_id, [])
        for lease, usd, tok in held:
            self._release_hold(lease, usd, tok)
        return held

    def _release_hold(self, lease: _Lease, micro_usd: int, tokens: int) -> None:
        lease.held_usd -= micro_usd
        lease.held_tokens -= tokens
        lease.holds -= 1
        lease.used_at = time.monotonic()
        if lease.retired and lease.holds == 0:
            self._return_soon(lease)

    async def _take_lease(self, charge: Charge, stream: str, micro_usd: int,
                          tokens: int) -> _Lease | None:
        """A new slice of `stream` sized for this call (module doc), the current one
        retired; None when it would not fit a quarter of the room (the exact path)."""
        async with self._locks[stream]:  # (a slice being taken ahead is waited for here)
            current = self._leases.get(stream)
            if current is not None and current.fits(micro_usd, tokens):
                return current  # another call took one meanwhile
            spare = self._spares.pop(stream, None)
            if spare is not None and spare.fits(micro_usd, tokens):
                if current is not None:
                    self._retire(current)
                self._leases[stream] = spare
                return spare  # taken ahead: nothing to append now
            if spare is not None:  # too small for this call: it goes back
                self._retire(spare)
            lease = await self._new_lease(charge, stream, micro_usd, tokens, current)
            if current is not None:
                self._retire(current)
            if lease is not None:
                self._leases[stream] = lease
            return lease

    async def _new_lease(self, charge: Charge, stream: str, micro_usd: int, tokens: int,
                         current: _Lease | None) -> _Lease | None:
        """Append a new slice of `stream` sized for this call (module doc), under the
        stream's lock; None when it would not fit a quarter of the room."""
        calls = self._next_calls.get(stream, LEASE_FIRST_CALLS)
        now, clock = time.time(), time.monotonic()
        if current is not None and clock - current.taken_at < LEASE_QUICK_S:
            calls = min(self.lease_calls, calls * 2)  # used up quickly: the next is larger
        calls = max(1, min(calls, self.lease_calls))
        self._next_calls[stream] = calls
        for attempt in range(3):
            state = await self.state(stream)
            if state is None:
                return None
            usd = _slice(micro_usd * calls, micro_usd, state.remaining_micro_usd)
            tok = _slice(tokens * calls, tokens, state.remaining_tokens)
            if usd is None or tok is None:
                return None
            lease_id = new_id()
            events = decide_lease(state, lease_id, usd, tok, now, self.ttl_s, self.instance)
            if not events or not isinstance(events[-1], BudgetLeased):
                return None
            try:
                await self.store.append(stream, events, expected_version=state.version,
                                        metadata=_lease_metadata(charge.tenant, state))
            except WrongExpectedVersion:
                await _backoff(attempt)
                continue
            self._remember(stream, state, events)
            return _Lease(lease_id, stream, charge.tenant, usd, tok, events[-1].expires_at,
                          clock, clock, calls)
        return None

    def _retire(self, lease: _Lease) -> None:
        """No new holds on `lease`; returned once its holds are settled (`_release_hold`)."""
        lease.retired = True
        if self._leases.get(lease.stream) is lease:
            del self._leases[lease.stream]
        if lease.holds == 0:
            self._return_soon(lease)

    def _return_soon(self, lease: _Lease) -> None:
        task = asyncio.ensure_future(self._return(lease, USED))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    async def _return(self, lease: _Lease, reason: str) -> None:
        """Give back what is left of a slice with no holds (at the stream's version)."""
        try:
            async with self._locks[lease.stream]:
                for attempt in range(MAX_RETRIES):
                    state = await self.state(lease.stream)
                    events = decide_return_lease(state, lease.lease_id, reason)
                    if not events:
                        return
                    try:
                        await self.store.append(lease.stream, events, expected_version=state.version,
                                                metadata=_lease_metadata(lease.tenant, state))
                        self._remember(lease.stream, state, events)
                        return
                    except WrongExpectedVersion:
                        await _backoff(attempt)
        except Exception:
            log.exception("returning a budget lease failed; it expires or is returned when "
                          "this process is lost", extra={"budget": lease.stream})

    async def return_leases(self, *, idle_s: float = LEASE_IDLE_S) -> int:
        """Return the slices without holds idle `idle_s` or near their expiry (all of
        them with `idle_s=0`, at shutdown); how many."""
        if not idle_s and self._taking:  # at shutdown: the slices being taken ahead too
            await asyncio.gather(*self._taking.values(), return_exceptions=True)
        clock, now = time.monotonic(), time.time()
        due = [lease for lease in list(self._leases.values())
               if lease.holds == 0 and (clock - lease.used_at >= idle_s
                                        or lease.expires_at - now < self.ttl_s / 2)]
        for lease in due:
            self._leases.pop(lease.stream, None)
            self._next_calls.pop(lease.stream, None)
        spares = [lease for lease in list(self._spares.values())  # taken ahead, never used
                  if clock - lease.used_at >= idle_s or lease.expires_at - now < self.ttl_s / 2]
        for lease in spares:
            self._spares.pop(lease.stream, None)
        due += spares
        for lease in list(self._leases.values()):  # busy but near expiry: no new holds
            if lease.expires_at - now < self.ttl_s / 2:
                self._retire(lease)
        await asyncio.gather(*(self._return(lease, IDLE if idle_s else SHUTDOWN)
                               for lease in due))
        return len(due)

    async def run_leases(self) -> None:
        """Return idle slices, every fifth of `LEASE_IDLE_S` (a task of the app)."""
        while self.lease_calls:
            await asyncio.sleep(LEASE_IDLE_S / 5)
            try:
                await self.return_leases()
            except Exception:
                log.exception("returning idle budget leases failed")

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
        if charge.call_id in self._holds:
            return await self._commit_leased(charge, micro_usd, tokens, metadata, rider,
                                             outcome, with_events)
        events = await self._settle(
            charge, lambda s: decide_commit(s, charge.call_id, micro_usd, tokens), metadata,
            rider, outcome, with_events)
        return [e for e in events if isinstance(e, BudgetCommitted)]

    async def _commit_leased(self, charge: Charge, micro_usd: int, tokens: int,
                             metadata: Metadata, rider: Rider | None, outcome: Any,
                             with_events: list[Append] | None) -> list[BudgetCommitted]:
        """A call admitted from leases: its cost out of each slice, with `with_events` and
        `rider`'s, in one append without a version check (the slices are counted)."""
        held = self._holds[charge.call_id]
        commits = [commit_on_lease(lease.stream, _as_lease(lease), lease.lease_id,
                                   charge.call_id, micro_usd, tokens) for lease, _, _ in held]
        try:
            results = await append_joint(
                self.store, [*((lease.stream, [c], None) for (lease, _, _), c
                               in zip(held, commits)), *(with_events or ())],
                metadata, rider, outcome)
            for (lease, _, _), commit, result in zip(held, commits, results):
                lease.left_usd -= min(micro_usd, lease.left_usd)
                lease.left_tokens -= min(tokens, lease.left_tokens)
                self._remember_at(lease.stream, commit, result.next_expected_version)
        finally:
            self._unhold(charge.call_id)
        return commits

    async def release(self, charge: Charge, reason: str, metadata: Metadata) -> None:
        if self._unhold(charge.call_id):  # admitted from leases: nothing was appended
            return
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
