"""The run state machine (shared/domain/runs.py), pure: a simulated executor that can
crash after any appended event drives runs to their end, and the invariants hold:

- a step's LLM call that has an answer is never sent again;
- a tool call with a result is never run again; a side-effecting tool call that was
  interrupted is run again only after a human approved exactly that;
- the fold of the same events is the same state; every run ends exactly once.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.contracts.events import (
    RunApprovalGiven,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunLLMCallLinked,
    RunModelAnswered,
    RunStarted,
    RunStepStarted,
    RunToolCallStarted,
    RunToolOutcomeUnknown,
    RunToolResult,
)
from shared.domain import runs as R

EFFECTS = {"write": "side_effecting", "read": "read_only", "put": "idempotent", "gated": "side_effecting"}


def started(max_steps=6, approval=("gated",), max_cost=None) -> RunStarted:
    return RunStarted(run_id="r1", session_id="s1", tenant="t", agent="a", agent_version=1,
                      input="go", model="m", tools=tuple(EFFECTS), approval=approval,
                      max_steps=max_steps, max_cost_micro_usd=max_cost)


def answer(step: int, call_id: str, tools: list[str]) -> RunModelAnswered:
    calls = tuple({"id": f"c{step}{i}", "type": "function",
                   "function": {"name": t, "arguments": json.dumps({"n": i})}}
                  for i, t in enumerate(tools))
    return RunModelAnswered(run_id="r1", step=step, call_id=call_id,
                            content="" if tools else "the answer", tool_calls=calls,
                            cost_micro_usd=10)


class Crash(Exception):
    pass


class Sim:
    """Executes decisions; `crash_after` appended events it raises Crash (a kill -9)."""

    def __init__(self, script: list[list[str]], crashes: set[int], approvals: list[bool]) -> None:
        self.events: list = [started()]
        self.script = script
        self.crashes = crashes
        self.approvals = approvals
        self.executed: list[tuple[str, int, int]] = []  # (tool, step, index): real side effects
        self.model_calls: list[int] = []

    def append(self, event) -> None:
        self.events.append(event)
        if len(self.events) in self.crashes:
            self.crashes.discard(len(self.events))
            raise Crash

    def run_once(self) -> bool:
        """Drive until the run ends or waits; False when it waits for a human."""
        while True:
            state = R.fold_run(self.events)
            action = R.decide_next(state, now=100.0)
            match action:
                case R.Nothing():
                    return True
                case R.CallModel(step=step, new_step=new):
                    if new:
                        self.append(RunStepStarted(run_id="r1", step=step))
                    call_id = f"llm{len(self.model_calls)}"
                    self.append(RunLLMCallLinked(run_id="r1", step=step, call_id=call_id))
                    self.model_calls.append(step)
                    tools = self.script[step - 1] if step - 1 < len(self.script) else []
                    self.append(answer(step, call_id, tools))
                case R.RunTools(attempts=attempts):
                    for a in attempts:
                        self.append(RunToolCallStarted(
                            run_id="r1", step=a.step, index=a.index, model_call_id=a.model_call_id,
                            tool_call_id=a.tool_call_id, tool=a.tool, effect=EFFECTS[a.tool],
                            attempt=a.attempt))
                        self.executed.append((a.tool, a.step, a.index))
                        self.append(RunToolResult(run_id="r1", step=a.step, index=a.index,
                                                  model_call_id=a.model_call_id,
                                                  tool_call_id=a.tool_call_id, tool=a.tool,
                                                  content="ok"))
                case R.FeedBack(results=results):
                    for r in results:
                        self.append(r)
                case R.MarkUnknown(slots=slots, step=step):
                    for s in slots:
                        self.append(RunToolOutcomeUnknown(run_id="r1", step=step, index=s.index,
                                                          tool_call_id=s.tool_call_id or "",
                                                          tool=s.tool))
                case R.AskApproval(requests=requests):
                    for r in requests:
                        self.append(r)
                case R.Wait():
                    return False
                case R.Finish(answer=text):
                    self.append(RunFinished(run_id="r1", answer=text, steps=len(state.steps),
                                            cost_micro_usd=state.cost_micro_usd))
                case R.Fail(reason=reason):
                    self.append(RunFailed(run_id="r1", reason=reason))

    def human(self) -> None:
        state = R.fold_run(self.events)
        for pending in state.pending_approvals:
            ok = self.approvals.pop(0) if self.approvals else True
            self.events.append(RunApprovalGiven(run_id="r1", tool_call_id=pending.tool_call_id,
                                                approved=ok, by="h"))

    def drive(self) -> None:
        for _ in range(500):
            try:
                if self.run_once():
                    return
                self.human()
            except Crash:
                continue  # a takeover: the next process folds the same events
        raise AssertionError("the run did not end")


tools_st = st.lists(st.lists(st.sampled_from(sorted(EFFECTS) + ["nope"]), max_size=3),
                    max_size=5)


@settings(max_examples=300, deadline=None)
@given(tools_st, st.sets(st.integers(min_value=2, max_value=80), max_size=12),
       st.lists(st.booleans(), max_size=10))
def test_crashes_anywhere_never_repeat_finished_work(script, crashes, approvals) -> None:
    sim = Sim(script, set(crashes), approvals)
    sim.drive()
    events = sim.events
    ends = [e for e in events if isinstance(e, RunFinished | RunFailed | RunCancelled)]
    assert len(ends) == 1, "a run ends exactly once"
    answers = [e.step for e in events if isinstance(e, RunModelAnswered)]
    assert len(answers) == len(set(answers)), "an answered step is never asked again"
    results = [(e.step, e.index) for e in events if isinstance(e, RunToolResult)]
    assert len(results) == len(set(results)), "a tool call gets one result"
    # a tool call with a result is never started again
    for i, e in enumerate(events):
        if isinstance(e, RunToolResult):
            assert not any(isinstance(x, RunToolCallStarted) and (x.step, x.index) == (e.step, e.index)
                           for x in events[i + 1:])
    # a side-effecting attempt interrupted is started again only after an approval of it
    for i, e in enumerate(events):
        if isinstance(e, RunToolCallStarted) and e.attempt > 1 and e.effect == "side_effecting":
            assert any(isinstance(x, RunToolOutcomeUnknown) and (x.step, x.index) == (e.step, e.index)
                       for x in events[:i])
            assert any(isinstance(x, RunApprovalGiven) and x.approved
                       and x.tool_call_id == e.tool_call_id for x in events[:i])
    # gated tools never run without an approval
    for e in events:
        if isinstance(e, RunToolCallStarted) and e.tool == "gated":
            assert any(isinstance(x, RunApprovalGiven) and x.approved and x.tool_call_id == e.tool_call_id
                       for x in events)
    assert R.fold_run(events) == R.fold_run(list(events)), "the fold is deterministic"
    assert R.fold_run(events).terminal


@settings(max_examples=100, deadline=None)
@given(tools_st)
def test_without_crashes_each_tool_call_runs_once_and_max_steps_holds(script) -> None:
    sim = Sim(script, set(), [True] * 20)
    sim.drive()
    state = R.fold_run(sim.events)
    assert len(sim.executed) == len(set(sim.executed))
    assert len(state.steps) <= 6
    if len(script) >= 6 and all(script[:6]):
        assert state.status == "failed" and state.error == "max_steps"


def test_interrupted_read_only_call_is_retried_and_side_effecting_one_asks() -> None:
    events = [started(), RunStepStarted(run_id="r1", step=1),
              RunLLMCallLinked(run_id="r1", step=1, call_id="x"),
              answer(1, "x", ["read", "write"])]
    state = R.fold_run(events)
    first = R.decide_next(state, 0)
    assert isinstance(first, R.RunTools) and [a.tool for a in first.attempts] == ["read", "write"]
    for a in first.attempts:
        events.append(RunToolCallStarted(run_id="r1", step=1, index=a.index,
                                         model_call_id=a.model_call_id, tool_call_id=a.tool_call_id,
                                         tool=a.tool, effect=EFFECTS[a.tool], attempt=1))
    again = R.decide_next(R.fold_run(events), 0)  # a takeover: both were in flight
    assert isinstance(again, R.MarkUnknown) and [s.tool for s in again.slots] == ["write"]
    events.append(RunToolOutcomeUnknown(run_id="r1", step=1, index=1, tool_call_id="t", tool="write"))
    then = R.decide_next(R.fold_run(events), 0)
    assert isinstance(then, R.AskApproval) and then.requests[0].reason == "outcome_unknown"
    events.append(then.requests[0])
    retry = R.decide_next(R.fold_run(events), 0)
    assert isinstance(retry, R.RunTools) and [a.tool for a in retry.attempts] == ["read"]
    assert retry.attempts[0].attempt == 2


def test_an_approval_never_given_expires() -> None:
    events = [started(), RunStepStarted(run_id="r1", step=1),
              RunLLMCallLinked(run_id="r1", step=1, call_id="x"), answer(1, "x", ["gated"])]
    ask = R.decide_next(R.fold_run(events), now=10, approval_ttl_s=5)
    assert isinstance(ask, R.AskApproval)
    events.append(ask.requests[0])
    assert R.decide_next(R.fold_run(events), now=12) == R.Wait(15)
    assert isinstance(R.decide_next(R.fold_run(events), now=15), R.Fail)


def test_budget_spent_stops_before_the_next_call() -> None:
    events = [started(max_cost=15), RunStepStarted(run_id="r1", step=1),
              RunLLMCallLinked(run_id="r1", step=1, call_id="x"), answer(1, "x", ["read"]),
              RunToolResult(run_id="r1", step=1, index=0, model_call_id="c10", tool_call_id="t",
                            tool="read", content="ok")]
    assert R.decide_next(R.fold_run(events), 0) == R.CallModel(2, True)
    events[3] = RunModelAnswered(**{**{f: getattr(events[3], f) for f in events[3].__struct_fields__},
                                    "cost_micro_usd": 15})
    assert R.decide_next(R.fold_run(events), 0) == R.Fail("budget", "the run's max_cost_usd is spent")
