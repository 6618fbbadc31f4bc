"""A run's step timeline, pure: what the dashboard's Runs page shows (issue 15).

The run's own stream (`run-{id}`) says what happened in which order; the streams it
links say where and how: each step's LLM call (`llmcall-{call_id}`: the node that
answered, the attempts) and each tool call (`toolcall-{id}`: the node, the duration).
`linked_ids(run_events)` names the streams to read; `timeline(...)` folds all of them
into one `Step` per LLM step, with its tool calls, approvals and the run's end.
"""

from __future__ import annotations

import msgspec

from shared.contracts.events import (
    Event,
    LLMCallCompleted,
    LLMCallFailed,
    RunApprovalGiven,
    RunAwaitingApproval,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunLLMCallLinked,
    RunModelAnswered,
    RunStarted,
    RunStepStarted,
    RunToolCallStarted,
    RunToolResult,
    ToolCallFailed,
    ToolCallFinished,
    ToolCallStarted,
)


class LLMCall(msgspec.Struct, kw_only=True):
    call_id: str
    model: str
    status: str = "running"  # running, answered, failed, interrupted
    node: str | None = None
    target: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = 0
    latency_ms: float | None = None
    fallbacks: int = 0  # attempts that failed before the answer
    finish_reason: str | None = None


class ToolStep(msgspec.Struct, kw_only=True):
    index: int
    tool: str
    tool_call_id: str | None = None
    attempt: int = 0
    status: str = "pending"  # pending, running, awaiting_approval, finished, failed, rejected, ...
    node: str | None = None
    duration_ms: float | None = None
    is_error: bool | None = None
    approval: str | None = None  # "approved by key:..." / "rejected by ..."
    awaiting_reason: str | None = None
    approval_id: str | None = None  # the tool call id an approval names
    arguments: dict = {}


class Step(msgspec.Struct, kw_only=True):
    step: int
    calls: list[LLMCall] = []
    tools: list[ToolStep] = []


class Timeline(msgspec.Struct, kw_only=True):
    run_id: str
    model: str
    steps: list[Step] = []
    end: str | None = None  # finished, failed: <reason>, cancelled
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = 0


def linked_ids(run_events: list[Event]) -> tuple[list[str], list[str]]:
    """The LLM call ids and tool call ids a run's events name, in order."""
    calls, tools = [], []
    for e in run_events:
        if isinstance(e, RunLLMCallLinked) and e.call_id not in calls:
            calls.append(e.call_id)
        elif isinstance(e, RunToolCallStarted) and e.tool_call_id not in tools:
            tools.append(e.tool_call_id)
    return calls, tools


def _call(call_id: str, model: str, events: list[Event]) -> LLMCall:
    call = LLMCall(call_id=call_id, model=model)
    for e in events:
        if isinstance(e, LLMCallFailed):
            call.fallbacks += 0 if e.final else 1
            if e.final:
                call.status = "failed"
        elif isinstance(e, LLMCallCompleted):
            call.status, call.node, call.target = "answered", e.node, e.target
            call.model = e.model or model
            call.input_tokens, call.output_tokens = e.input_tokens, e.output_tokens
            call.cost_micro_usd, call.latency_ms = e.cost_micro_usd, e.latency_ms
            call.finish_reason = e.finish_reason
    return call


def _tool_facts(tool: ToolStep, events: list[Event]) -> None:
    for e in events:
        if isinstance(e, ToolCallStarted):
            tool.node = e.node
        elif isinstance(e, ToolCallFinished):
            tool.node, tool.duration_ms, tool.is_error = e.node or tool.node, e.duration_ms, e.is_error
        elif isinstance(e, ToolCallFailed):
            tool.node = e.node or tool.node


def timeline(run_events: list[Event], calls: dict[str, list[Event]],
             tool_calls: dict[str, list[Event]]) -> Timeline | None:
    """The run's steps from its events and the events of the calls it links."""
    if not run_events or not isinstance(run_events[0], RunStarted):
        return None
    started = run_events[0]
    out = Timeline(run_id=started.run_id, model=started.model)
    steps: dict[int, Step] = {}
    linked: dict[str, LLMCall] = {}

    def tool_of(step: int, index: int, name: str) -> ToolStep:
        s = steps.setdefault(step, Step(step=step))
        for t in s.tools:
            if t.index == index:
                return t
        t = ToolStep(index=index, tool=name)
        s.tools.append(t)
        return t

    for e in run_events[1:]:
        match e:
            case RunStepStarted():
                steps.setdefault(e.step, Step(step=e.step))
            case RunLLMCallLinked():
                for earlier in steps.setdefault(e.step, Step(step=e.step)).calls:
                    if earlier.status == "running":
                        earlier.status = "interrupted"  # asked again under a new id
                call = _call(e.call_id, started.model, calls.get(e.call_id, []))
                linked[e.call_id] = call
                steps[e.step].calls.append(call)
            case RunModelAnswered():
                call = linked.get(e.call_id)
                if call is not None:
                    if call.status != "answered":  # the call's own stream lags: the run's facts
                        call.status = "answered"
                        call.input_tokens, call.output_tokens = e.input_tokens, e.output_tokens
                        call.cost_micro_usd = e.cost_micro_usd
                    call.model = e.model or call.model
                    call.finish_reason = e.finish_reason or call.finish_reason
                out.input_tokens += e.input_tokens
                out.output_tokens += e.output_tokens
                out.cost_micro_usd += e.cost_micro_usd
                for i, tc in enumerate(e.tool_calls):
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    name = fn.get("name", "?") if isinstance(fn, dict) else "?"
                    tool_of(e.step, i, str(name))
            case RunToolCallStarted():
                t = tool_of(e.step, e.index, e.tool)
                t.tool, t.tool_call_id, t.attempt, t.status = e.tool, e.tool_call_id, e.attempt, "running"
                t.node, t.duration_ms, t.is_error, t.awaiting_reason = None, None, None, None
                _tool_facts(t, tool_calls.get(e.tool_call_id, []))
            case RunAwaitingApproval():
                t = tool_of(e.step, e.index, e.tool)
                t.status, t.awaiting_reason = "awaiting_approval", e.reason
                t.approval_id = e.tool_call_id
                t.arguments = dict(e.arguments)
            case RunApprovalGiven():
                for s in steps.values():
                    for t in s.tools:
                        if t.status == "awaiting_approval" and t.approval_id == e.tool_call_id:
                            t.approval = f"{'approved' if e.approved else 'rejected'} by {e.by}"
                            t.status = "approved" if e.approved else "rejected"
            case RunToolResult():
                t = tool_of(e.step, e.index, e.tool)
                t.status, t.is_error = e.status, e.is_error
            case RunFinished():
                out.end = "finished"
            case RunFailed():
                out.end = f"failed: {e.reason}"
            case RunCancelled():
                out.end = "cancelled"
    out.steps = [steps[k] for k in sorted(steps)]
    return out
