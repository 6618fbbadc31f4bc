"""Agent runs, pure: the state of a run as a fold of its stream, and what to do next.

A run (stream `run-{id}`) alternates LLM calls and the tool calls the model asks for:

    RunStarted -> [RunStepStarted -> RunLLMCallLinked -> RunModelAnswered
                   -> (RunToolCallStarted -> RunToolResult)* ]* -> RunFinished

`fold_run(events)` is the state; `decide_next(state, now)` the one next action. The
orchestrator that holds the run's lease executes the action, appends its events at the
stream's version and decides again. A crash anywhere leaves a prefix of those events;
whoever takes the run over folds it and decides from there, so:

- a step whose answer is recorded is never asked again; an LLM call linked but not
  answered was interrupted and is sent again under a new call id (`CallModel`);
- a tool call with a result is never run again; one started without a result was
  interrupted: `read_only` and `idempotent` tools are started again (a new attempt, a
  new tool call id), a `side_effecting` one is `MarkUnknown` (outcome unknown) and then
  waits for a human to approve running it again (`AskApproval`, reason
  "outcome_unknown");
- a tool named in the run's `approval` list waits for a human before it runs;
  a rejection is fed back to the model as the tool's result;
- `max_steps` LLM calls at most; a cost at or above `max_cost_micro_usd` stops the run
  (the run's own budget reserves each call's worst case, so it is never overspent).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec

from shared.contracts.events import (
    Event,
    RunApprovalGiven,
    RunAwaitingApproval,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunLLMCallLinked,
    RunModelAnswered,
    RunResumed,
    RunStarted,
    RunStepStarted,
    RunToolCallStarted,
    RunToolOutcomeUnknown,
    RunToolResult,
)

RETRYABLE_EFFECTS = frozenset({"read_only", "idempotent"})
TERMINAL = frozenset({"finished", "failed", "cancelled"})
RUN_EVENT_TYPES: tuple[type[Event], ...] = (
    RunStarted, RunResumed, RunStepStarted, RunLLMCallLinked, RunModelAnswered,
    RunToolCallStarted, RunToolResult, RunToolOutcomeUnknown, RunAwaitingApproval,
    RunApprovalGiven, RunFinished, RunFailed, RunCancelled)
RUN_EVENT_NAMES = frozenset(t.__name__ for t in RUN_EVENT_TYPES)

_NS = uuid.UUID("6b1f1c3e-6a51-4a8e-9b7e-3f5f0d0b9a11")


def tool_call_id(run_id: str, step: int, index: int, attempt: int) -> str:
    """The tool call id of one attempt: derived, so a takeover finds the call's stream."""
    return str(uuid.uuid5(_NS, f"{run_id}:{step}:{index}:{attempt}"))


# -- state -------------------------------------------------------------------------------


class ToolSlot(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call the model asked for, across its attempts."""

    index: int
    model_call_id: str
    tool: str
    arguments: dict[str, Any] = {}
    problem: str | None = None  # unusable as asked (unknown tool, arguments not an object)
    attempt: int = 0  # the last attempt started (0: none yet)
    tool_call_id: str | None = None  # of that attempt
    effect: str = "side_effecting"
    in_flight: bool = False  # started, no result, not declared unknown
    unknown: bool = False  # interrupted side-effecting attempt: outcome unknown
    approved_once: bool = False  # a human approved an attempt of it
    awaiting: RunAwaitingApproval | None = None
    approval: RunApprovalGiven | None = None  # the answer to `awaiting`
    result: RunToolResult | None = None


class StepState(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    call_ids: tuple[str, ...] = ()  # every LLM call attempt of the step
    answer: RunModelAnswered | None = None
    slots: tuple[ToolSlot, ...] = ()


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    started: RunStarted
    version: int = 1
    status: str = "running"  # running, awaiting_approval, finished, failed, cancelled
    steps: tuple[StepState, ...] = ()
    cost_micro_usd: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    owner: str = ""
    epoch: int = 1
    answer: str | None = None
    error: str | None = None
    detail: str | None = None

    @property
    def run_id(self) -> str:
        return self.started.run_id

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def pending_approvals(self) -> tuple[RunAwaitingApproval, ...]:
        if not self.steps or self.terminal:
            return ()
        return tuple(s.awaiting for s in self.steps[-1].slots
                     if s.awaiting is not None and s.approval is None and s.result is None)


def function_name(tool: str) -> str:
    """A registry name as an OpenAI function name (`^[a-zA-Z0-9_-]+$`: no dots)."""
    return tool.replace(".", "__")


def tool_of(name: str, tools: tuple[str, ...]) -> str:
    """The registry tool a function name the model used stands for."""
    return name if name in tools else next((t for t in tools if function_name(t) == name), name)


def merge_tool_call_deltas(deltas: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """OpenAI streamed `delta.tool_calls` pieces as whole tool calls, by `index`."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in deltas:
        if not isinstance(piece, dict):
            continue
        index = piece.get("index", len(calls))
        call = calls.setdefault(index if isinstance(index, int) else len(calls), {
            "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        if piece.get("id"):
            call["id"] = piece["id"]
        fn = piece.get("function") if isinstance(piece.get("function"), dict) else {}
        if fn.get("name"):
            call["function"]["name"] = fn["name"]
        args = fn.get("arguments")
        if isinstance(args, str):
            call["function"]["arguments"] += args
        elif isinstance(args, dict):  # a runtime that sends the object whole
            call["function"]["arguments"] = json.dumps(args)
    out = []
    for i, index in enumerate(sorted(calls)):
        call = calls[index]
        if not call["id"]:
            call["id"] = f"call_{i}"
        out.append(call)
    return tuple(out)


def _slots_of(started: RunStarted, answer: RunModelAnswered) -> tuple[ToolSlot, ...]:
    slots = []
    for index, call in enumerate(answer.tool_calls):
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        name = tool_of(str(fn.get("name") or ""), started.tools)  # type: ignore[union-attr]
        raw = fn.get("arguments")  # type: ignore[union-attr]
        problem = None
        args: Any = {}
        try:
            args = json.loads(raw) if isinstance(raw, str) and raw.strip() else (raw or {})
        except ValueError:
            problem = f"the arguments of {name!r} are not valid JSON"
        if problem is None and not isinstance(args, dict):
            problem = f"the arguments of {name!r} must be a JSON object"
            args = {}
        if problem is None and name not in started.tools:
            problem = (f"tool {name!r} is not available to this agent; "
                       f"available: {', '.join(started.tools) or 'none'}")
        slots.append(ToolSlot(index=index, model_call_id=str(call.get("id") or f"call_{index}"),
                              tool=name, arguments=args, problem=problem))
    return tuple(slots)


def _with_slot(state: RunState, step: int, index: int, **changes: Any) -> RunState:
    steps = list(state.steps)
    for i, s in enumerate(steps):
        if s.step == step:
            slots = list(s.slots)
            if 0 <= index < len(slots):
                slots[index] = msgspec.structs.replace(slots[index], **changes)
                steps[i] = msgspec.structs.replace(s, slots=tuple(slots))
    return msgspec.structs.replace(state, steps=tuple(steps))


def _slot(state: RunState, step: int, index: int) -> ToolSlot | None:
    for s in state.steps:
        if s.step == step and 0 <= index < len(s.slots):
            return s.slots[index]
    return None


def evolve(state: RunState | None, event: Event, version: int | None = None) -> RunState | None:
    """The state after one more event of the run's stream (pure)."""
    if isinstance(event, RunStarted):
        return RunState(started=event, version=version or 1, owner=event.owner)
    if state is None:
        return None
    v = version if version is not None else state.version + 1
    state = msgspec.structs.replace(state, version=v)
    if state.terminal:
        return state
    match event:
        case RunResumed():
            return msgspec.structs.replace(state, owner=event.owner, epoch=event.epoch)
        case RunStepStarted():
            return msgspec.structs.replace(
                state, steps=(*state.steps, StepState(step=event.step)), status="running")
        case RunLLMCallLinked():
            steps = tuple(msgspec.structs.replace(s, call_ids=(*s.call_ids, event.call_id))
                          if s.step == event.step else s for s in state.steps)
            return msgspec.structs.replace(state, steps=steps)
        case RunModelAnswered():
            steps = tuple(msgspec.structs.replace(s, answer=event,
                                                  slots=_slots_of(state.started, event))
                          if s.step == event.step and s.answer is None else s
                          for s in state.steps)
            return msgspec.structs.replace(
                state, steps=steps, cost_micro_usd=state.cost_micro_usd + event.cost_micro_usd,
                input_tokens=state.input_tokens + event.input_tokens,
                output_tokens=state.output_tokens + event.output_tokens)
        case RunToolCallStarted():
            slot = _slot(state, event.step, event.index)
            approved = bool(slot and slot.approval and slot.approval.approved)
            return _with_slot(state, event.step, event.index, attempt=event.attempt,
                              tool_call_id=event.tool_call_id, effect=event.effect,
                              in_flight=True, unknown=False, awaiting=None, approval=None,
                              approved_once=approved or bool(slot and slot.approved_once))
        case RunToolOutcomeUnknown():
            return _with_slot(state, event.step, event.index, in_flight=False, unknown=True)
        case RunAwaitingApproval():
            state = _with_slot(state, event.step, event.index, awaiting=event, approval=None)
            return msgspec.structs.replace(state, status="awaiting_approval")
        case RunApprovalGiven():
            for s in state.steps[-1:]:
                for slot in s.slots:
                    if (slot.awaiting is not None and slot.approval is None
                            and slot.awaiting.tool_call_id == event.tool_call_id):
                        state = _with_slot(state, s.step, slot.index, approval=event)
            return msgspec.structs.replace(
                state, status="awaiting_approval" if state.pending_approvals else "running")
        case RunToolResult():
            return _with_slot(state, event.step, event.index, result=event, in_flight=False)
        case RunFinished():
            return msgspec.structs.replace(state, status="finished", answer=event.answer)
        case RunFailed():
            return msgspec.structs.replace(state, status="failed", error=event.reason,
                                           detail=event.detail)
        case RunCancelled():
            return msgspec.structs.replace(state, status="cancelled", error="cancelled",
                                           detail=event.reason)
    return state


def fold_run(events: list[Event] | list[tuple[Event, int]]) -> RunState | None:
    """The run's state from its events (or (event, stream version) pairs)."""
    state: RunState | None = None
    for i, item in enumerate(events, start=1):
        event, version = item if isinstance(item, tuple) else (item, i)
        state = evolve(state, event, version)
    return state


# -- decisions ---------------------------------------------------------------------------


class CallModel(msgspec.Struct, frozen=True):
    step: int
    new_step: bool  # append RunStepStarted first


class ToolAttempt(msgspec.Struct, frozen=True):
    step: int
    index: int
    model_call_id: str
    tool: str
    arguments: dict[str, Any]
    attempt: int
    tool_call_id: str
    approved_by: str | None = None  # the human who approved this attempt


class RunTools(msgspec.Struct, frozen=True):
    """Start these tool calls now (in parallel)."""

    attempts: tuple[ToolAttempt, ...]


class FeedBack(msgspec.Struct, frozen=True):
    """Results that need no tool run (a problem, a rejection): record them."""

    results: tuple[RunToolResult, ...]


class MarkUnknown(msgspec.Struct, frozen=True):
    slots: tuple[ToolSlot, ...]
    step: int


class AskApproval(msgspec.Struct, frozen=True):
    requests: tuple[RunAwaitingApproval, ...]


class Wait(msgspec.Struct, frozen=True):
    """Nothing to do until a human answers (or `until`, when the wait expires)."""

    until: float


class Finish(msgspec.Struct, frozen=True):
    answer: str


class Fail(msgspec.Struct, frozen=True):
    reason: str
    detail: str


class Nothing(msgspec.Struct, frozen=True):
    """The run is over."""


Action = CallModel | RunTools | FeedBack | MarkUnknown | AskApproval | Wait | Finish | Fail | Nothing


def _result(state: RunState, step: int, slot: ToolSlot, content: str, status: str,
            ) -> RunToolResult:
    return RunToolResult(run_id=state.run_id, step=step, index=slot.index,
                         model_call_id=slot.model_call_id, tool_call_id=slot.tool_call_id,
                         tool=slot.tool, content=content, is_error=True, status=status)


def decide_next(state: RunState, now: float, approval_ttl_s: float = 3600.0) -> Action:
    """The one next action of a run, from its state alone. Called only when nothing of
    the run is in flight in this process: an attempt started without a result is one
    that was interrupted."""
    if state.terminal:
        return Nothing()
    s = state.started
    if not state.steps:
        return CallModel(1, True) if s.max_steps >= 1 else Fail("max_steps", "max_steps is 0")
    step = state.steps[-1]
    if step.answer is None:
        if s.max_cost_micro_usd is not None and state.cost_micro_usd >= s.max_cost_micro_usd:
            return Fail("budget", "the run's max_cost_usd is spent")
        return CallModel(step.step, False)
    if not step.slots:
        return Finish(step.answer.content)
    feed: list[RunToolResult] = []
    unknown: list[ToolSlot] = []
    ask: list[RunAwaitingApproval] = []
    run: list[ToolAttempt] = []
    waits: list[float] = []
    for slot in step.slots:
        if slot.result is not None:
            continue
        if slot.problem is not None:
            feed.append(_result(state, step.step, slot, slot.problem, "denied"))
            continue
        nxt = slot.attempt + 1
        nxt_id = tool_call_id(state.run_id, step.step, slot.index, nxt)
        if slot.in_flight:
            if slot.effect in RETRYABLE_EFFECTS:
                run.append(ToolAttempt(step.step, slot.index, slot.model_call_id, slot.tool,
                                       slot.arguments, nxt, nxt_id))
            else:
                unknown.append(slot)
            continue
        needs = slot.unknown or (slot.tool in s.approval and not slot.approved_once)
        if not needs:
            run.append(ToolAttempt(step.step, slot.index, slot.model_call_id, slot.tool,
                                   slot.arguments, nxt, nxt_id))
        elif slot.awaiting is None:
            ask.append(RunAwaitingApproval(
                run_id=state.run_id, step=step.step, index=slot.index, tool_call_id=nxt_id,
                tool=slot.tool, arguments=slot.arguments,
                reason="outcome_unknown" if slot.unknown else "needs_approval",
                expires_at=now + approval_ttl_s))
        elif slot.approval is None:
            waits.append(slot.awaiting.expires_at)
        elif slot.approval.approved:
            run.append(ToolAttempt(step.step, slot.index, slot.model_call_id, slot.tool,
                                   slot.arguments, nxt, slot.awaiting.tool_call_id,
                                   approved_by=slot.approval.by or "a human"))
        else:
            why = slot.approval.reason or "no reason given"
            text = (f"the call of {slot.tool!r} was interrupted and its outcome is unknown; "
                    f"a human declined to run it again: {why}" if slot.unknown
                    else f"a human rejected the call of {slot.tool!r}: {why}")
            feed.append(_result(state, step.step, slot, text,
                                "outcome_unknown" if slot.unknown else "rejected"))
    if feed:
        return FeedBack(tuple(feed))
    if unknown:
        return MarkUnknown(tuple(unknown), step.step)
    if ask:
        return AskApproval(tuple(ask))
    if run:
        return RunTools(tuple(run))
    if waits:
        until = min(waits)
        if now >= until:
            return Fail("approval_expired", "no human answered the approval request in time")
        return Wait(until)
    # every tool call of the step has its result: back to the model
    if step.step >= s.max_steps:
        return Fail("max_steps", f"the run reached max_steps ({s.max_steps}) without an answer")
    if s.max_cost_micro_usd is not None and state.cost_micro_usd >= s.max_cost_micro_usd:
        return Fail("budget", "the run's max_cost_usd is spent")
    return CallModel(step.step + 1, True)


def conversation(state: RunState) -> list[dict[str, Any]]:
    """The messages the model reads at the next call: system prompt, the input, then each
    answered step's assistant message and its tool results (in the model's order)."""
    s = state.started
    out: list[dict[str, Any]] = []
    if s.system_prompt:
        out.append({"role": "system", "content": s.system_prompt})
    out.append({"role": "user", "content": s.input})
    for step in state.steps:
        if step.answer is None:
            continue
        msg: dict[str, Any] = {"role": "assistant", "content": step.answer.content}
        if step.answer.tool_calls:
            msg["tool_calls"] = [dict(c) for c in step.answer.tool_calls]
        out.append(msg)
        for slot in step.slots:
            if slot.result is not None:
                out.append({"role": "tool", "tool_call_id": slot.model_call_id,
                            "content": slot.result.content})
    return out
