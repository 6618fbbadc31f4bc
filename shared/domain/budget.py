"""Budgets: reserve before an LLM call, commit the actual cost after, never overspend.

Pure domain, no I/O. A budget is one event stream (`budget-session-<id>` or
`budget-tenant-<tenant>-<period>`); its state is `fold_budget` over that stream, and
every change is decided by a pure `decide_*` function that returns the events to
append. The caller appends them at the state's `version` (optimistic concurrency) and,
on a conflict, re-reads, re-folds and decides again. Because every decision is taken
on the latest state of the stream, the invariant checked by each decision holds for
the whole stream:

    committed + reserved + leased <= limit, for every limited dimension (USD, tokens),

where `reserved` is the sum of the open reservations and `leased` what is left of the
open leases (see leases below; as long as no call costs more than it reserved or held:
see overrun below). A call must fit every budget it is charged to (its session's and its
tenant's month): reserve on each.

Money is integer **micro-dollars** (1 USD = 1_000_000) so that sums never drift;
tokens are integers. A limit of `None` means that dimension is unlimited.

Lifecycle of one call (`call_id` unique per LLM call):

- `decide_reserve` -> `BudgetReserved` (worst case: `prompt_token_bound` + max_tokens,
  each times its price) or `BudgetExceeded` (a denial, kept for audit; it changes nothing).
- `decide_commit` -> `BudgetCommitted` with the actual cost; the rest of the
  reservation is released by the same event (overrun: see below).
- `decide_release` -> `BudgetReleased` on failure or cancellation.
- `decide_expire` -> `BudgetReleased(reason="expired")` for reservations whose owner
  died (`expires_at <= now`). `decide_reserve` also sweeps expired reservations first,
  so a dead owner never blocks a budget past its reservation's TTL.
- `decide_release_instance` -> `BudgetReleased(reason="orchestrator-lost")` for the
  reservations of an orchestrator process known to be dead (each reservation records
  its `instance`): released within seconds instead of the TTL.

Idempotence: the fold ignores events at versions it has already folded (duplicate
delivery), a reserve for an open `call_id` decides nothing, and a commit or release
of a `call_id` that is not open (unknown, already committed or released) decides
nothing and, if appended anyway, folds to no change but the version.

A call outlives its reservation when the reservation is released for its owner while
the call still runs (its TTL passed during a long provider failover, or its
orchestrator was taken for lost): such a *lapsed* reservation is remembered
(`BudgetState.lapsed`, the last `LAPSED_KEPT` per budget) and the call's commit is
still charged, in full, as an overrun marked `late`. What was spent is on the books
however long the call took; the budget may then be overspent by that call, visibly.

Commit records the actual cost, always (`BudgetCommitted.micro_usd` / `tokens`). The
reservation is a true worst case (see `prompt_token_bound`), so the actual cost stays
within it; when it does not (a provider that ignores `max_tokens`), the part above the
reservation is also recorded on the event as `overrun_micro_usd` / `overrun_tokens`,
summed on the state (`overrun_*`, `overruns`), and the budget may then be overspent on
the books, as it was in reality. A limited dimension whose committed amount has reached
its limit denies every further reservation until the limit is raised. Invariant:

    committed + reserved + leased <= limit + overrun, for every limited dimension.

Leases (issue 16, the hot path): instead of one reservation per call, an orchestrator
process takes a *slice* of a budget once and admits many calls against it in memory:

- `decide_lease` -> `BudgetLeased` (the slice, its `expires_at` and `instance`) if it
  fits like a reservation would (`committed + reserved + leased + slice <= limit` in
  every limited dimension, the dimension not exhausted); else nothing but the expiry of
  due reservations and leases: a refused lease is not a denial (no `BudgetExceeded`), the
  caller falls back to reserving per call or to a smaller slice.
- each admitted call's settle: `decide_commit_leased` -> `BudgetCommitted(lease=...)`:
  all of the call's cost is committed and taken out of what is left of the lease
  (`leased` goes down by the same amount); the part above what is left is overrun.
  Admission itself appends nothing: the process keeps its holds in memory and never
  admits more than the lease's left amount, so (calls costing at most what they held)
  a commit against an open lease never overruns.
- `decide_return_lease` -> `BudgetLeaseReturned` gives back what is left (an idle lease,
  a shutdown); `decide_expire` returns leases past `expires_at` ("expired") and
  `decide_release_instance` the leases of a lost process ("orchestrator-lost").

A crash: a lost orchestrator's leases are returned by a survivor (liveness, or the
sweeper at their expiry), so its slices go back to the budget; the calls it admitted and
that finish anyway are charged late (`late=True`), in full, as overrun, exactly like
the commit of a lapsed reservation. A commit against a lease that is not open (returned,
expired, unknown) folds the same way whatever the event says, and a commit against an
open lease takes its overrun from what is left of the lease when it is folded, so the
invariant holds even for commits appended without an expected version (several calls
settling on one lease at once). Unlike a reservation, a lease does not remember which
calls it charged: a retried settle of one call must not be appended twice (the caller's
own idempotence, e.g. the call's stream).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec
from msgspec.structs import replace

from shared.contracts.events import (
    BudgetCommitted,
    BudgetExceeded,
    BudgetLimitChanged,
    BudgetOpened,
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetReserved,
    Event,
)

MICRO_PER_USD = 1_000_000

Scope = Literal["session", "tenant", "run"]
SESSION, TENANT, RUN = "session", "tenant", "run"
FAILED, CANCELLED, EXPIRED = "failed", "cancelled", "expired"
IDLE, USED, SHUTDOWN = "idle", "used", "shutdown"  # lease returns (and EXPIRED, ORCHESTRATOR_LOST)
ORCHESTRATOR_LOST = "orchestrator-lost"
LAPSING_REASONS = frozenset({EXPIRED, ORCHESTRATOR_LOST})
"""Releases not decided by the call's own outcome: the call may still finish and commit."""

LAPSED_KEPT = 1024
"""Lapsed reservations remembered per budget (most recent); an older one's commit is lost."""


class BudgetNotOpened(LookupError):
    """A decision that needs an open budget was asked of a stream with none."""


# -- events live in the catalogue (shared/events.py) ---------------------------------

BUDGET_EVENT_TYPES: tuple[type[Event], ...] = (
    BudgetOpened,
    BudgetReserved,
    BudgetCommitted,
    BudgetReleased,
    BudgetExceeded,
    BudgetLimitChanged,
    BudgetLeased,
    BudgetLeaseReturned,
)
BUDGET_EVENT_TYPE_NAMES: frozenset[str] = frozenset(t.__name__ for t in BUDGET_EVENT_TYPES)


# -- streams and periods ----------------------------------------------------------------


def budget_stream_for_session(session_id: str) -> str:
    return f"budget-session-{session_id}"


def budget_stream_for_run(run_id: str) -> str:
    """An agent run's own budget (its `max_cost_usd`), charged with its session's."""
    return f"budget-run-{run_id}"


def budget_stream_for_tenant(tenant: str, period: str) -> str:
    return f"budget-tenant-{tenant}-{period}"


def month_period(ts: float) -> str:
    """The UTC month of unix time `ts`, as "YYYY-MM"."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m")


# -- money ------------------------------------------------------------------------------


def usd_to_micro(usd: float) -> int:
    """Dollars to micro-dollars, rounded half up (away from zero) to the micro.

    The float's shortest repr is what is rounded (0.0000005 -> 1, 0.1 -> 100_000),
    so binary noise never shifts a value that was written in decimal.
    """
    if isinstance(usd, float) and not math.isfinite(usd):
        raise ValueError(f"not a finite amount: {usd!r}")
    micro = (Decimal(repr(usd)) * MICRO_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return int(micro)


def micro_to_usd(micro: int) -> float:
    return micro / MICRO_PER_USD


def format_usd(micro: int) -> str:
    """Exact decimal text, at least 2 decimals: 800_000 -> "0.80", 1_234 -> "0.001234"."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USD)
    digits = f"{frac:06d}".rstrip("0")
    return f"{sign}{whole}.{digits.ljust(2, '0')}"


# -- worst-case prompt tokens ----------------------------------------------------------

TEMPLATE_TOKENS_PER_MESSAGE = 16
"""Tokens a chat template may add around one message: turn markers, the role, newlines
(ChatML, Llama 3, Gemma and Mistral templates add 4 to 8)."""

TEMPLATE_TOKENS_PER_CALL = 32
"""Tokens a chat template may add once per call: BOS, the generation prompt, a default
system preamble (Llama 3.1's date lines are about 25)."""

TEMPLATE_TOKENS_FOR_TOOLS = 128
"""Tokens a template may add to introduce tool definitions, on top of their JSON."""


def prompt_token_bound(messages: Iterable[Any], tools: list[dict[str, Any]] | None = None) -> int:
    """An upper bound of the prompt tokens a model counts for these messages (and tools).

    Byte-level BPE (GPT, Llama 3, Qwen) and SentencePiece with byte fallback (Gemma,
    Llama 2, Mistral) never produce a token that covers less than one byte of the text,
    so a text of N UTF-8 bytes is at most N tokens. Each message is bounded by the UTF-8
    bytes of its content (multi-part content and tool calls: of their JSON, more bytes
    than the text a template renders of them), name and tool call id, plus
    `TEMPLATE_TOKENS_PER_MESSAGE` (which also covers the role); the call adds
    `TEMPLATE_TOKENS_PER_CALL`, and tool definitions their JSON bytes plus
    `TEMPLATE_TOKENS_FOR_TOOLS`. The constants are the assumption: a template that adds
    more than they allow (or image parts, whose tokens are not bytes) can still overrun,
    which the commit then records (`overrun_*`). Pessimistic by design: English text is
    about 4 bytes per token, so this reserves about 4 times the typical prompt cost.
    """
    total = TEMPLATE_TOKENS_PER_CALL
    for message in messages:
        total += TEMPLATE_TOKENS_PER_MESSAGE + sum(
            _utf8_len(getattr(message, part, None))
            for part in ("content", "name", "tool_calls", "tool_call_id"))
    if tools:
        total += len(msgspec.json.encode(tools)) + TEMPLATE_TOKENS_FOR_TOOLS
    return total


def _utf8_len(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode())
    return len(msgspec.json.encode(value))


# -- state ------------------------------------------------------------------------------


class Reservation(msgspec.Struct, frozen=True):
    micro_usd: int
    tokens: int
    expires_at: float
    instance: str | None = None  # the orchestrator process holding it


class Lease(msgspec.Struct, frozen=True):
    """An open lease; `micro_usd` / `tokens` are what is LEFT of its slice."""

    micro_usd: int
    tokens: int
    expires_at: float
    instance: str | None = None  # the orchestrator process holding it


class BudgetState(msgspec.Struct, frozen=True):
    """The fold of one budget stream. Treat `reservations` and `leases` as read-only."""

    budget_id: str
    scope: str
    owner: str
    period: str | None
    limit_micro_usd: int | None
    limit_tokens: int | None
    version: int
    reserved_micro_usd: int = 0
    reserved_tokens: int = 0
    committed_micro_usd: int = 0
    committed_tokens: int = 0
    reservations: dict[str, Reservation] = msgspec.field(default_factory=dict)
    overrun_micro_usd: int = 0  # committed beyond the calls' own reservations (in committed)
    overrun_tokens: int = 0
    overruns: int = 0  # commits that exceeded their reservation
    lapsed: tuple[str, ...] = ()  # calls released while running (expired, owner lost), oldest first
    leases: dict[str, Lease] = msgspec.field(default_factory=dict)  # open leases: what is left of each
    leased_micro_usd: int = 0  # the sum of what is left of the open leases
    leased_tokens: int = 0

    @property
    def remaining_micro_usd(self) -> int | None:
        """What can still be reserved or leased (never negative); None when unlimited."""
        return _remaining(self.limit_micro_usd, self.committed_micro_usd,
                          self.reserved_micro_usd + self.leased_micro_usd)

    @property
    def remaining_tokens(self) -> int | None:
        return _remaining(self.limit_tokens, self.committed_tokens,
                          self.reserved_tokens + self.leased_tokens)

    @property
    def stream(self) -> str:
        if self.scope == TENANT:
            return budget_stream_for_tenant(self.owner, self.period or "")
        return budget_stream_for_session(self.owner)


def _remaining(limit: int | None, committed: int, reserved: int) -> int | None:
    return None if limit is None else max(0, limit - committed - reserved)


# -- fold -------------------------------------------------------------------------------


def fold_budget(state: BudgetState | None, event: Event, version: int) -> BudgetState | None:
    """Apply one budget event (at stream `version`) to the state. Pure.

    Versions at or below `state.version` were folded already and are ignored
    (duplicate delivery). Every other event of an opened budget advances `version`,
    even one that changes nothing else (a denial, a commit of an unknown call), so the
    state's version is always the stream's last version: the expected version of the
    next append. Events before `BudgetOpened` fold to None.

    Reserved amounts move only by the exact amounts of the open reservations, leased
    amounts only by what is left of the open leases, and amounts are clamped at zero, so
    reserved and leased totals are never negative.

    Leases: `BudgetLeased` opens a lease (an id already open changes nothing);
    `BudgetCommitted` with `lease` set commits all of the cost and takes
    `min(cost, left)` out of an open lease, the rest being overrun (computed here, equal
    to the event's `overrun_*` when it was decided at the stream's version); against a
    lease that is not open it is late: all of it committed and all of it overrun.
    `BudgetLeaseReturned` gives back what is left of an open lease.
    """
    if state is not None and version <= state.version:
        return state
    match event:
        case BudgetOpened() if state is None:
            return BudgetState(
                budget_id=event.budget_id, scope=event.scope, owner=event.owner,
                period=event.period, limit_micro_usd=event.limit_micro_usd,
                limit_tokens=event.limit_tokens, version=version)
        case _ if state is None:
            return None
        case BudgetReserved(call_id=call_id) if call_id not in state.reservations:
            res = Reservation(max(0, event.micro_usd), max(0, event.tokens), event.expires_at,
                              event.instance)
            return replace(
                state, version=version,
                reserved_micro_usd=state.reserved_micro_usd + res.micro_usd,
                reserved_tokens=state.reserved_tokens + res.tokens,
                reservations={**state.reservations, call_id: res},
                lapsed=tuple(c for c in state.lapsed if c != call_id))
        case BudgetLeased(lease_id=lease_id) if lease_id not in state.leases:
            lease = Lease(max(0, event.micro_usd), max(0, event.tokens), event.expires_at,
                          event.instance)
            return replace(
                state, version=version,
                leased_micro_usd=state.leased_micro_usd + lease.micro_usd,
                leased_tokens=state.leased_tokens + lease.tokens,
                leases={**state.leases, lease_id: lease})
        case BudgetCommitted(lease=str(lease_id)):
            return _commit_leased(state, event, lease_id, version)
        case BudgetLeaseReturned(lease_id=lease_id) if lease_id in state.leases:
            lease = state.leases[lease_id]
            return replace(
                state, version=version,
                leased_micro_usd=max(0, state.leased_micro_usd - lease.micro_usd),
                leased_tokens=max(0, state.leased_tokens - lease.tokens),
                leases={k: v for k, v in state.leases.items() if k != lease_id})
        case BudgetCommitted(call_id=call_id) if call_id in state.reservations:
            over_usd, over_tokens = max(0, event.overrun_micro_usd), max(0, event.overrun_tokens)
            return replace(
                _without(state, call_id), version=version,
                committed_micro_usd=state.committed_micro_usd + max(0, event.micro_usd),
                committed_tokens=state.committed_tokens + max(0, event.tokens),
                overrun_micro_usd=state.overrun_micro_usd + over_usd,
                overrun_tokens=state.overrun_tokens + over_tokens,
                overruns=state.overruns + (1 if over_usd or over_tokens else 0))
        case BudgetCommitted(call_id=call_id) if call_id in state.lapsed:
            # a late commit: its reservation was already given back, so all of it is overrun
            usd, tokens = max(0, event.micro_usd), max(0, event.tokens)
            return replace(
                state, version=version,
                committed_micro_usd=state.committed_micro_usd + usd,
                committed_tokens=state.committed_tokens + tokens,
                overrun_micro_usd=state.overrun_micro_usd + usd,
                overrun_tokens=state.overrun_tokens + tokens,
                overruns=state.overruns + (1 if usd or tokens else 0),
                lapsed=tuple(c for c in state.lapsed if c != call_id))
        case BudgetReleased(call_id=call_id) if call_id in state.reservations:
            lapsed = state.lapsed
            if event.reason in LAPSING_REASONS:
                lapsed = (*lapsed, call_id)[-LAPSED_KEPT:]
            return replace(_without(state, call_id), version=version, lapsed=lapsed)
        case BudgetLimitChanged():
            return replace(state, version=version, limit_micro_usd=event.limit_micro_usd,
                           limit_tokens=event.limit_tokens)
    # BudgetExceeded, a second BudgetOpened, a duplicate reserve, a commit or release of
    # a call that is not open: nothing changes but the version.
    return replace(state, version=version)


def _commit_leased(state: BudgetState, event: BudgetCommitted, lease_id: str,
                   version: int) -> BudgetState:
    usd, tokens = max(0, event.micro_usd), max(0, event.tokens)
    lease = state.leases.get(lease_id)
    leases = state.leases
    take_usd = take_tokens = 0  # what comes out of the lease; the rest is overrun
    if lease is not None:
        take_usd, take_tokens = min(usd, lease.micro_usd), min(tokens, lease.tokens)
        leases = {**leases, lease_id: replace(lease, micro_usd=lease.micro_usd - take_usd,
                                              tokens=lease.tokens - take_tokens)}
    over_usd, over_tokens = usd - take_usd, tokens - take_tokens
    return replace(
        state, version=version, leases=leases,
        leased_micro_usd=max(0, state.leased_micro_usd - take_usd),
        leased_tokens=max(0, state.leased_tokens - take_tokens),
        committed_micro_usd=state.committed_micro_usd + usd,
        committed_tokens=state.committed_tokens + tokens,
        overrun_micro_usd=state.overrun_micro_usd + over_usd,
        overrun_tokens=state.overrun_tokens + over_tokens,
        overruns=state.overruns + (1 if over_usd or over_tokens else 0))


def _without(state: BudgetState, call_id: str) -> BudgetState:
    res = state.reservations[call_id]
    return replace(
        state,
        reserved_micro_usd=max(0, state.reserved_micro_usd - res.micro_usd),
        reserved_tokens=max(0, state.reserved_tokens - res.tokens),
        reservations={k: v for k, v in state.reservations.items() if k != call_id})


def fold_budget_events(events: list[tuple[Event, int]] | list[Event],
                       state: BudgetState | None = None) -> BudgetState | None:
    """Fold a log: `(event, version)` pairs, or bare events numbered 1, 2, ..."""
    for i, item in enumerate(events, start=1):
        event, version = item if isinstance(item, tuple) else (item, i)
        state = fold_budget(state, event, version)
    return state


# -- decisions --------------------------------------------------------------------------


def decide_open(state: BudgetState | None, budget_id: str, scope: Scope, owner: str, *,
                limit_micro_usd: int | None = None, limit_tokens: int | None = None,
                period: str | None = None) -> list[Event]:
    """`[BudgetOpened]` for a new stream; nothing if the budget is already open."""
    if state is not None:
        return []
    if scope not in (SESSION, TENANT, RUN):
        raise ValueError(f"unknown budget scope {scope!r}")
    _check_limits(limit_micro_usd, limit_tokens)
    return [BudgetOpened(budget_id=budget_id, scope=scope, owner=owner,
                         limit_micro_usd=limit_micro_usd, limit_tokens=limit_tokens,
                         period=period)]


def decide_reserve(state: BudgetState | None, call_id: str, micro_usd: int, tokens: int,
                   now: float, ttl_s: float, instance: str | None = None) -> list[Event]:
    """Reserve a call's worst-case cost, or deny it; the reservation records the
    `instance` (orchestrator process) that holds it.

    Reservations and leases already expired at `now` are released first
    (`BudgetReleased` / `BudgetLeaseReturned`, reason "expired"), then the verdict,
    always the last event: `BudgetReserved` if
    `committed + reserved + leased + amount <= limit` in every limited dimension, else
    `BudgetExceeded` naming each dimension that does not fit. A dimension whose committed
    amount has reached its limit (an overrun, or a limit lowered) fits nothing, not even
    a zero amount, until the limit is raised. Nothing if `call_id` is
    already open (a retried reserve). Raises `BudgetNotOpened` without a budget.
    """
    if state is None:
        raise BudgetNotOpened("no budget opened on this stream")
    if micro_usd < 0 or tokens < 0:
        raise ValueError(f"negative reservation: {micro_usd} micro-USD, {tokens} tokens")
    if call_id in state.reservations:
        return []
    events, after = _expired(state, now)
    avail_usd, avail_tokens = after.remaining_micro_usd, after.remaining_tokens
    problems = _misfits(after, micro_usd, tokens)
    if problems:
        events.append(BudgetExceeded(
            budget_id=state.budget_id, call_id=call_id, requested_micro_usd=micro_usd,
            requested_tokens=tokens, available_micro_usd=avail_usd,
            available_tokens=avail_tokens, reason=f"{state.scope} budget: " + "; ".join(problems)))
    else:
        events.append(BudgetReserved(budget_id=state.budget_id, call_id=call_id,
                                     micro_usd=micro_usd, tokens=tokens,
                                     expires_at=float(now + ttl_s), instance=instance))
    return events


def _expired(state: BudgetState, now: float) -> tuple[list[Event], BudgetState]:
    """The expiry events due at `now` and the state after them."""
    events = decide_expire(state, now)
    after = fold_budget_events([(e, state.version + i) for i, e in enumerate(events, 1)], state)
    assert after is not None
    return events, after


def _misfits(after: BudgetState, micro_usd: int, tokens: int) -> list[str]:
    """Why these amounts do not fit the budget, per dimension; [] when they fit."""
    avail_usd, avail_tokens = after.remaining_micro_usd, after.remaining_tokens
    problems = []
    spent_usd = _exhausted(after.limit_micro_usd, after.committed_micro_usd)
    spent_tokens = _exhausted(after.limit_tokens, after.committed_tokens)
    if avail_usd is not None and (micro_usd > avail_usd or spent_usd):
        problems.append(f"{format_usd(micro_usd)} USD requested, "
                        f"{format_usd(avail_usd)} USD available" + (
                            f" (limit reached: {format_usd(after.committed_micro_usd)} of "
                            f"{format_usd(after.limit_micro_usd or 0)} USD committed)"
                            if spent_usd else ""))
    if avail_tokens is not None and (tokens > avail_tokens or spent_tokens):
        problems.append(f"{tokens} tokens requested, {avail_tokens} tokens available" + (
            f" (limit reached: {after.committed_tokens} of {after.limit_tokens} tokens "
            "committed)" if spent_tokens else ""))
    return problems


def _exhausted(limit: int | None, committed: int) -> bool:
    return limit is not None and committed >= limit


def decide_commit(state: BudgetState | None, call_id: str, micro_usd: int,
                  tokens: int) -> list[Event]:
    """Charge a call's actual cost, all of it, and release the rest of its reservation.

    The event's `micro_usd` / `tokens` are the actual cost, never clamped: committed is
    what was spent. When the actual cost exceeds the call's reservation (a provider that
    ignored `max_tokens`, a prompt above its bound), the excess is also recorded as
    `overrun_micro_usd` / `overrun_tokens` (part of the actual cost, not in addition to
    it); the budget may then be overspent, visibly, and `decide_reserve` denies every
    further call on a dimension whose committed amount has reached its limit.

    A call whose reservation lapsed (expired or released for a lost orchestrator while
    it ran) is still charged: all of its cost is overrun and the event says `late`.
    Nothing if `call_id` is neither open nor lapsed: a retried commit, or a commit after
    the call's own release.
    """
    if micro_usd < 0 or tokens < 0:
        raise ValueError(f"negative cost: {micro_usd} micro-USD, {tokens} tokens")
    if state is None:
        return []
    if call_id in state.lapsed:
        return [BudgetCommitted(budget_id=state.budget_id, call_id=call_id, micro_usd=micro_usd,
                                tokens=tokens, overrun_micro_usd=micro_usd,
                                overrun_tokens=tokens, late=True)]
    if call_id not in state.reservations:
        return []
    res = state.reservations[call_id]
    return [BudgetCommitted(budget_id=state.budget_id, call_id=call_id, micro_usd=micro_usd,
                            tokens=tokens, overrun_micro_usd=max(0, micro_usd - res.micro_usd),
                            overrun_tokens=max(0, tokens - res.tokens))]


def decide_release(state: BudgetState | None, call_id: str, reason: str) -> list[Event]:
    """`[BudgetReleased]` for an open reservation; nothing if it is not open."""
    if state is None or call_id not in state.reservations:
        return []
    return [BudgetReleased(budget_id=state.budget_id, call_id=call_id, reason=reason)]


def decide_expire(state: BudgetState | None, now: float) -> list[Event]:
    """Release every open reservation and return every open lease with
    `expires_at <= now` (reason "expired"), oldest first."""
    if state is None:
        return []
    return _give_back(state, EXPIRED, lambda held: held.expires_at <= now)


def _give_back(state: BudgetState, reason: str,
               which: Callable[[Reservation | Lease], bool]) -> list[Event]:
    """Release the open reservations and return the open leases `which` selects, oldest
    (earliest `expires_at`) first."""
    due: list[tuple[float, int, str]] = [
        (res.expires_at, 0, call_id) for call_id, res in state.reservations.items() if which(res)]
    due += [(lease.expires_at, 1, lease_id) for lease_id, lease in state.leases.items()
            if which(lease)]
    due.sort()
    return [BudgetReleased(budget_id=state.budget_id, call_id=key, reason=reason) if kind == 0
            else BudgetLeaseReturned(budget_id=state.budget_id, lease_id=key, reason=reason)
            for _, kind, key in due]


def decide_release_instance(state: BudgetState | None, instance: str) -> list[Event]:
    """Release every open reservation and return every open lease held by `instance`,
    a process known to be dead (reason "orchestrator-lost"), oldest first; nothing if it
    holds none. Appended at the state's version, a reservation committed or released (a
    lease returned) meanwhile is left alone, and a second survivor deciding on the
    caught-up state finds nothing to release. The calls the lost process admitted from
    its leases and that finish anyway are charged late, in full, as overrun."""
    if state is None:
        return []
    return _give_back(state, ORCHESTRATOR_LOST, lambda held: held.instance == instance)


# -- leases (issue 16) -------------------------------------------------------------------


def decide_lease(state: BudgetState | None, lease_id: str, micro_usd: int, tokens: int,
                 now: float, ttl_s: float, instance: str | None = None) -> list[Event]:
    """Take a slice of the budget (`micro_usd`, `tokens`) to admit calls from in memory.

    Reservations and leases already expired at `now` are given back first (as in
    `decide_reserve`), then `BudgetLeased` (expiring at `now + ttl_s`, held by
    `instance`) if `committed + reserved + leased + amount <= limit` in every limited
    dimension and no limited dimension is exhausted; else just the expiry events (maybe
    none): a refused lease is not a denial and records no `BudgetExceeded`. Nothing if
    `lease_id` is already open. Raises `BudgetNotOpened` without a budget, `ValueError`
    on a negative amount.
    """
    if state is None:
        raise BudgetNotOpened("no budget opened on this stream")
    if micro_usd < 0 or tokens < 0:
        raise ValueError(f"negative lease: {micro_usd} micro-USD, {tokens} tokens")
    if lease_id in state.leases:
        return []
    events, after = _expired(state, now)
    if not _misfits(after, micro_usd, tokens):
        events.append(BudgetLeased(budget_id=state.budget_id, lease_id=lease_id,
                                   micro_usd=micro_usd, tokens=tokens,
                                   expires_at=float(now + ttl_s), instance=instance))
    return events


def decide_commit_leased(state: BudgetState | None, lease_id: str, call_id: str,
                         micro_usd: int, tokens: int) -> list[Event]:
    """Charge the actual cost of a call admitted from lease `lease_id`, all of it.

    `[BudgetCommitted(lease=lease_id)]`: the cost comes out of what is left of the lease;
    the part above it (per dimension) is `overrun_*`. When the lease is no longer open
    (returned, expired, lost, unknown) the commit is late: all of the cost is overrun and
    the event says `late`. Always an event (a lease does not remember its calls: the
    caller must not settle one call twice); nothing only without a budget. Raises
    `ValueError` on a negative cost.
    """
    if micro_usd < 0 or tokens < 0:
        raise ValueError(f"negative cost: {micro_usd} micro-USD, {tokens} tokens")
    if state is None:
        return []
    return [commit_on_lease(state.budget_id, state.leases.get(lease_id), lease_id, call_id,
                            micro_usd, tokens)]


def commit_on_lease(budget_id: str, lease: Lease | None, lease_id: str, call_id: str,
                    micro_usd: int, tokens: int) -> BudgetCommitted:
    """`decide_commit_leased` on what is left of the lease as its holder knows it (None:
    not open): the holder, which alone commits against its lease, keeps that in memory,
    so a commit needs no read of the budget."""
    if micro_usd < 0 or tokens < 0:
        raise ValueError(f"negative cost: {micro_usd} micro-USD, {tokens} tokens")
    if lease is None:
        return BudgetCommitted(budget_id=budget_id, call_id=call_id, micro_usd=micro_usd,
                               tokens=tokens, overrun_micro_usd=micro_usd,
                               overrun_tokens=tokens, late=True, lease=lease_id)
    return BudgetCommitted(budget_id=budget_id, call_id=call_id, micro_usd=micro_usd,
                           tokens=tokens, overrun_micro_usd=max(0, micro_usd - lease.micro_usd),
                           overrun_tokens=max(0, tokens - lease.tokens), lease=lease_id)


def decide_return_lease(state: BudgetState | None, lease_id: str, reason: str) -> list[Event]:
    """`[BudgetLeaseReturned]` for an open lease (what is left of it goes back to the
    budget); nothing if it is not open."""
    if state is None or lease_id not in state.leases:
        return []
    return [BudgetLeaseReturned(budget_id=state.budget_id, lease_id=lease_id, reason=reason)]


def decide_change_limit(state: BudgetState | None, limit_micro_usd: int | None,
                        limit_tokens: int | None) -> list[Event]:
    """`[BudgetLimitChanged]`, or nothing if the limits are unchanged.

    A limit may be lowered below what is already committed, reserved or leased (to stop
    spending): remaining is then 0 and no reservation or lease fits, so
    committed + reserved + leased only grows by overruns (commits above their own
    reservations or leases) until it is back under the limit. Raising a limit above what is committed lets calls through again.
    """
    if state is None:
        raise BudgetNotOpened("no budget opened on this stream")
    _check_limits(limit_micro_usd, limit_tokens)
    if (limit_micro_usd, limit_tokens) == (state.limit_micro_usd, state.limit_tokens):
        return []
    return [BudgetLimitChanged(budget_id=state.budget_id, limit_micro_usd=limit_micro_usd,
                               limit_tokens=limit_tokens)]


def _check_limits(limit_micro_usd: int | None, limit_tokens: int | None) -> None:
    for name, value in (("limit_micro_usd", limit_micro_usd), ("limit_tokens", limit_tokens)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
