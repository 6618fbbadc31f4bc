"""Budgets: reserve before an LLM call, commit the actual cost after, never overspend.

Pure domain, no I/O. A budget is one event stream (`budget-session-<id>` or
`budget-tenant-<tenant>-<period>`); its state is `fold_budget` over that stream, and
every change is decided by a pure `decide_*` function that returns the events to
append. The caller appends them at the state's `version` (optimistic concurrency) and,
on a conflict, re-reads, re-folds and decides again. Because every decision is taken
on the latest state of the stream, the invariant checked by each decision holds for
the whole stream:

    committed + reserved <= limit, for every limited dimension (USD, tokens),

where `reserved` is the sum of the open reservations (as long as no call costs more than
it reserved: see overrun below). A call must fit every budget
it is charged to (its session's and its tenant's month): reserve on each.

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

    committed + reserved <= limit + overrun, for every limited dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from shared.contracts.events import (
    BudgetCommitted,
    BudgetExceeded,
    BudgetLimitChanged,
    BudgetOpened,
    BudgetReleased,
    BudgetReserved,
    Event,
)

MICRO_PER_USD = 1_000_000

Scope = Literal["session", "tenant", "run"]
SESSION, TENANT, RUN = "session", "tenant", "run"
FAILED, CANCELLED, EXPIRED = "failed", "cancelled", "expired"
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


@dataclass(frozen=True, slots=True)
class Reservation:
    micro_usd: int
    tokens: int
    expires_at: float
    instance: str | None = None  # the orchestrator process holding it


@dataclass(frozen=True, slots=True)
class BudgetState:
    """The fold of one budget stream. Treat `reservations` as read-only."""

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
    reservations: dict[str, Reservation] = field(default_factory=dict)
    overrun_micro_usd: int = 0  # committed beyond the calls' own reservations (in committed)
    overrun_tokens: int = 0
    overruns: int = 0  # commits that exceeded their reservation
    lapsed: tuple[str, ...] = ()  # calls released while running (expired, owner lost), oldest first

    @property
    def remaining_micro_usd(self) -> int | None:
        """What can still be reserved (never negative); None when unlimited."""
        return _remaining(self.limit_micro_usd, self.committed_micro_usd, self.reserved_micro_usd)

    @property
    def remaining_tokens(self) -> int | None:
        return _remaining(self.limit_tokens, self.committed_tokens, self.reserved_tokens)

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

    Reserved amounts move only by the exact amounts of the open reservations and
    amounts are clamped at zero, so reserved totals are never negative.
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

    Reservations already expired at `now` are released first (`BudgetReleased`,
    reason "expired"), then the verdict, always the last event: `BudgetReserved` if
    `committed + reserved + amount <= limit` in every limited dimension, else
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
    events = decide_expire(state, now)
    after = fold_budget_events([(e, state.version + i) for i, e in enumerate(events, 1)], state)
    assert after is not None
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
    """Release every open reservation with `expires_at <= now` (reason "expired"),
    oldest first."""
    if state is None:
        return []
    due = sorted((res.expires_at, call_id) for call_id, res in state.reservations.items()
                 if res.expires_at <= now)
    return [BudgetReleased(budget_id=state.budget_id, call_id=call_id, reason=EXPIRED)
            for _, call_id in due]


def decide_release_instance(state: BudgetState | None, instance: str) -> list[Event]:
    """Release every open reservation held by `instance`, a process known to be dead
    (reason "orchestrator-lost"), oldest first; nothing if it holds none. Appended at
    the state's version, a reservation committed or released meanwhile is left alone,
    and a second survivor deciding on the caught-up state finds nothing to release."""
    if state is None:
        return []
    held = sorted((res.expires_at, call_id) for call_id, res in state.reservations.items()
                  if res.instance == instance)
    return [BudgetReleased(budget_id=state.budget_id, call_id=call_id, reason=ORCHESTRATOR_LOST)
            for _, call_id in held]


def decide_change_limit(state: BudgetState | None, limit_micro_usd: int | None,
                        limit_tokens: int | None) -> list[Event]:
    """`[BudgetLimitChanged]`, or nothing if the limits are unchanged.

    A limit may be lowered below what is already committed or reserved (to stop
    spending): remaining is then 0 and no reservation fits, so committed + reserved
    only grows by overruns (commits above their own reservations) until it is back under
    the limit. Raising a limit above what is committed lets calls through again.
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
