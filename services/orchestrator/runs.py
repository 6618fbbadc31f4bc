"""Agent runs, the use cases and the durable run loop.

    runs = app.state.runs                                   # a RunService
    await runs.start(caller, session_id, agent, input, model=None) -> RunOut
    await runs.get(caller, run_id) -> RunOut                # folded from run-<id>
    await runs.of_session(caller, session_id) -> list[RunSummary]
    await runs.cancel(caller, run_id, reason) -> RunOut
    await runs.answer(caller, run_id, tool_call_id, approve, reason) -> RunOut
    async for item in runs.follow(caller, run_id, after=0): ...          # RunItem
    async for item in runs.follow_session(caller, session_id): ...       # RunItem

**The loop** (`_drive`): fold the run's stream (`shared.domain.runs.fold_run`), ask the
pure `decide_next` for the one next action, execute it, append its events at the
stream's version, repeat. LLM calls go through `CallLifecycle.open` (policy, the
session's and the run's own budget, routing, node choice; the agent's tools as OpenAI
`tools`), tool calls through `ToolService.invoke` with a tool call id derived from
(run, step, index, attempt), several at once when the model asks for several. Tool
errors, policy denials and rejections are fed back to the model as the tool's result.
The run's messages (the input, the assistant's answers with their tool calls, the tool
results) are appended to the session's conversation in the same transaction as the
run event that records them. One append per transition (`_commit`): an effect's facts go
with the decisions that follow them and the opening records of the next effect; and that
append rides in the call path's own transaction (a `_Joint`, `joint.py`: with the tool
call's end, with the LLM call's cost commit), falling back to `_commit` when refused.

**Cancel.** `cancel` appends `RunCancelled` and broadcasts `RunInterrupt`; the process
driving the run cancels the effect in flight (`_interruptible`: the LLM call's stream is
closed through the call path, which releases its reservation; tool calls end
`cancelled`), reads the cancel and stops.

**Durability.** A run is driven by the orchestrator process holding its lease
(`run_leases.py`), renewed every lease/4. Each orchestrator looks for lapsed leases
every `NEXUS_RUN_SCAN_S` and claims them; the new owner appends `RunResumed` at the
stream's version (so the previous owner, if it still runs, fails its next append and
stops: fencing), then recovers what was in flight: a tool call attempt whose own
stream ended is recorded from it (never run again), one that never reached the tool
path runs now under the same id; an LLM call without its answer is sent again (its
reservation is released by the budget liveness/sweeper); an interrupted
`side_effecting` tool call is recorded as outcome unknown and asks a human
(`read_only`/`idempotent` ones start again). A run waiting for a human holds no lease
(`parked`) and no task; the answer wakes it, and a wait past
`NEXUS_RUN_APPROVAL_TTL_S` fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from services.orchestrator.calls import CallInput, CallLifecycle, failure_error
from services.orchestrator.keys import Caller
from services.orchestrator.read_models.runs import RunsReadModel
from services.orchestrator.run_leases import RunLeases
from services.orchestrator.schemas import (
    RunApprovalRequest,
    RunOut,
    RunSummary,
    RunToolCallOut,
    ToolCallView,
)
from services.orchestrator.sessions import SessionService
from services.orchestrator.tools import ToolService
from shared.contracts import subjects
from shared.contracts.errors import (
    BudgetDenied,
    Conflict,
    InvalidEntity,
    NexusError,
    NoNodeAvailable,
    NotFound,
    PolicyDenied,
    ProviderUnavailable,
    SessionClosed,
)
from shared.contracts.events import (
    BudgetOpened,
    Event,
    MessageAppended,
    Metadata,
    RecordedEvent,
    RunApprovalGiven,
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
    ToolCallApprovalGiven,
    ToolCallDecided,
    ToolCallFailed,
    ToolCallFinished,
    conversation_stream,
    run_stream,
    toolcall_stream,
)
from shared.contracts.frames import Delta, Done, Failed
from shared.contracts.messages import ChatMessage, RunInterrupt, RunLive
from shared.domain import runs as R
from shared.domain.budget import RUN, budget_stream_for_run, usd_to_micro
from shared.domain.tools import ToolSpec
from shared.infra.eventstore import EventStore, ProjectionRunner, WrongExpectedVersion
from shared.infra.messaging import Bus
from shared.infra.metrics import histogram, summed_counter
from shared.infra.tracing import tracer

log = logging.getLogger("nexus.orchestrator.runs")

LLM_ATTEMPTS = 5  # LLM calls of one step while no provider answers, before the run fails
RESULT_CAP = 16 * 1024  # of a tool's output fed back to the model (the tool call keeps all)
AgentResolver = Callable[..., Awaitable[Any]]  # AgentService.resolve(caller, name, version=None)


class LeaseLost(Exception):
    """Another process took the run over (or it ended meanwhile): stop driving it."""


class RunMetrics:
    def __init__(self) -> None:
        self.runs = summed_counter("nexus.agent.runs", unit="{run}",
                                   description="Agent runs ended, by outcome")
        self.steps = histogram("nexus.agent.run.steps", unit="{step}",
                               description="LLM steps per ended run")
        self.cost = histogram("nexus.agent.run.cost", unit="USD", description="Cost per ended run")
        self.takeovers = summed_counter("nexus.agent.run.takeovers", unit="{run}",
                                        description="Runs taken over from another process")

    def ended(self, outcome: str, steps: int, cost_micro_usd: int) -> None:
        self.runs.add(1, {"outcome": outcome})
        self.steps.record(steps, {"outcome": outcome})
        self.cost.record(cost_micro_usd / 1e6, {"outcome": outcome})


@dataclass(frozen=True)
class RunItem:
    """One item of a run's stream: a recorded event (`version` is its place in the
    run's stream: an SSE id / a `Last-Event-ID`) or a live text delta (no version)."""

    run_id: str
    kind: str  # "event" or "delta"
    type: str  # the event's type, or "delta"
    data: dict[str, Any]
    version: int | None = None


@dataclass
class _Run:
    """A run this process drives: its state, caller and how to append."""

    state: R.RunState
    caller: Caller
    meta: Metadata
    epoch: int
    specs: dict[str, ToolSpec] = field(default_factory=dict)
    tool_defs: list[dict[str, Any]] = field(default_factory=list)
    offered: list[str] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: asyncio.Future[Any] | None = None  # the effect under way: a cancel interrupts it

    @property
    def started(self) -> RunStarted:
        return self.state.started


@dataclass(frozen=True)
class _Next:
    """What the loop does next; its opening records are appended already (the LLM call
    of a `CallModel` is linked as `call_id`; the attempts of a `RunTools` started; a
    `Finish`/`Fail` recorded)."""

    action: R.Action
    call_id: str | None = None


class _Joint:
    """A rider (joint.py): the run's events for an effect's outcome, appended by the call
    path in the transaction that records the call's own end. `facts(outcome)` are the
    run's events and conversation messages for it; when `opening()` says so (the last
    result of a step, an answer), what follows them up to the next effect goes too
    (`_opening`), and `nxt` is the driver's next action. The run's lock is held from
    `appends` to `recorded`; `done` says whether the events were recorded."""

    def __init__(self, service: RunService, run: _Run,
                 facts: Callable[[Any], tuple[list[Event], list[MessageAppended]]],
                 opening: Callable[[], bool] = lambda: True,
                 on_recorded: Callable[[], None] | None = None) -> None:
        self.service = service
        self.run = run
        self.facts = facts
        self.opening = opening
        self.on_recorded = on_recorded
        self.done = False
        self.nxt: _Next | None = None
        self._events: list[Event] = []
        self._base = -1
        self._locked = False

    async def appends(self, outcome: Any) -> list[tuple[str, list[Event], int | None]]:
        run = self.run
        await run.lock.acquire()
        self._locked = True
        events, messages = self.facts(outcome)
        if self.opening():
            state = run.state
            for e in events:
                state = R.evolve(state, e)  # type: ignore[assignment]
            more, said, self.nxt = self.service._opening(run, state)
            events, messages = [*events, *more], [*messages, *said]
        self._events, self._base = events, run.state.version
        appends: list[tuple[str, list[Event], int | None]] = [
            (run_stream(run.state.run_id), events, run.state.version)]
        if messages:
            appends.append((conversation_stream(run.started.session_id), list(messages), None))
        return appends

    async def recorded(self, ok: bool) -> None:
        try:
            if ok and self.run.state.version == self._base:  # else caught up meanwhile
                await self.service._applied(self.run, self._events)
            if ok:
                self.done = True
                if self.on_recorded is not None:
                    self.on_recorded()
            else:
                self.nxt = None
        finally:
            if self._locked:
                self._locked = False
                self.run.lock.release()


def _content_of(view: ToolCallView) -> tuple[str, bool, str]:
    """(text for the model, is_error, status) of a tool call's outcome."""
    if view.status == "finished":
        text = view.output or ""
        if view.result is not None:
            result = json.dumps(view.result)
            if result not in text:
                text = f"{text}\nresult: {result}" if text else result
        return text[:RESULT_CAP], bool(view.is_error), "finished"
    return (f"the tool call failed ({view.error}): {view.detail or ''}"[:RESULT_CAP], True,
            "failed")


def _content_of_events(events: list[Event]) -> tuple[str, bool, str] | None:
    """The outcome recorded on a tool call's own stream, if it ended."""
    for e in events:
        if isinstance(e, ToolCallFinished):
            view = ToolCallView(tool_call_id=e.tool_call_id, session_id=e.session_id, tool=e.tool,
                                tool_version=0, status="finished", output=e.output,
                                result=e.result, is_error=e.is_error)
            return _content_of(view)
        if isinstance(e, ToolCallFailed):
            status = "denied" if e.reason in ("denied", "invalid_arguments") else (
                "rejected" if e.reason == "rejected" else "failed")
            return (f"the tool call failed ({e.reason}): {e.detail}"[:RESULT_CAP], True, status)
    return None


def _pending_tool_approval(events: list[Event]) -> bool:
    decided = [e for e in events if isinstance(e, ToolCallDecided)]
    return bool(decided and decided[-1].verdict == "needs_approval"
                and not any(isinstance(e, ToolCallApprovalGiven) for e in events))


def _parent_context(first: RecordedEvent) -> Any:
    """The trace of the request that started the run: every span of the run joins it."""
    meta = first.metadata
    if not meta.trace_id or not meta.span_id:
        return None
    ctx = SpanContext(trace_id=int(meta.trace_id, 16), span_id=int(meta.span_id, 16),
                      is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def run_out(state: R.RunState) -> RunOut:
    s = state.started
    calls = []
    pending = {a.tool_call_id for a in state.pending_approvals}
    for step in state.steps:
        for slot in step.slots:
            if slot.result is not None:
                status, is_error = slot.result.status, slot.result.is_error
            elif slot.awaiting is not None and slot.awaiting.tool_call_id in pending:
                status, is_error = "awaiting_approval", None
            elif slot.in_flight:
                status, is_error = "running", None
            else:
                status, is_error = "pending", None
            calls.append(RunToolCallOut(step=step.step, tool=slot.tool,
                                        tool_call_id=slot.tool_call_id, attempts=slot.attempt,
                                        status=status, is_error=is_error))
    return RunOut(
        run_id=s.run_id, session_id=s.session_id, agent=s.agent, agent_version=s.agent_version,
        model=s.model, status=state.status, steps=len(state.steps), max_steps=s.max_steps,
        cost_usd=state.cost_micro_usd / 1e6,
        max_cost_usd=s.max_cost_micro_usd / 1e6 if s.max_cost_micro_usd is not None else None,
        input_tokens=state.input_tokens, output_tokens=state.output_tokens,
        answer=state.answer, error=state.error, detail=state.detail,
        pending_approvals=[RunApprovalRequest(
            tool_call_id=a.tool_call_id, tool=a.tool, arguments=dict(a.arguments),
            reason=a.reason, expires_at=datetime.fromtimestamp(a.expires_at, UTC))
            for a in state.pending_approvals],
        tool_calls=calls)


class RunService:
    def __init__(self, store: EventStore, runner: ProjectionRunner, bus: Bus,
                 calls: CallLifecycle, tools: ToolService, sessions: SessionService,
                 resolve_agent: AgentResolver, *, instance: str, lease_s: float,
                 scan_s: float, approval_ttl_s: float) -> None:
        self.store = store
        self.runner = runner
        self.bus = bus
        self.calls = calls
        self.tools = tools
        self.sessions = sessions
        self.resolve_agent = resolve_agent
        self.instance = instance
        self.lease_s = lease_s
        self.scan_s = scan_s
        self.approval_ttl_s = approval_ttl_s
        self.leases = RunLeases(store, instance, lease_s)
        self.read_model = RunsReadModel(store)
        self.metrics = RunMetrics()
        self._tasks: dict[str, asyncio.Task] = {}
        self._driving: dict[str, _Run] = {}  # the runs whose driver task is past its start
        self._stopping = False
        self.agent_selector = None  # skills.AgentSelector: a run that names no agent (SKILLS)

    # -- use cases ------------------------------------------------------------------------

    async def start(self, caller: Caller, session_id: str, agent: str | None, input: str,
                    model: str | None = None) -> RunOut:
        session = await self.sessions.require(caller, session_id)
        if session.status != "open":
            raise SessionClosed(session_id)
        selection = None  # no agent named: the session's, else (and for "auto") the best fit
        if agent == "auto" or (agent is None and session.agent is None):
            if self.agent_selector is None:
                raise InvalidEntity("agent: required", [{"field": "agent", "message": "required"}],
                                    "run.agent")
            selection = await self.agent_selector.select(caller, input, agent or "")
            agent = selection.agent
        agent = agent or session.agent or ""
        pinned = session.agent == agent and session.agent_version is not None
        try:  # the session's own agent at the version it pinned at start; others as they are now
            definition = (await self.resolve_agent(caller, agent, session.agent_version,
                                                   source=session.agent_source or "tenant")
                          if pinned else await self.resolve_agent(caller, agent))
        except NotFound:
            raise InvalidEntity(f"no agent named {agent!r}",
                                [{"field": "agent", "message": f"no agent named {agent!r}"}],
                                "run.agent") from None
        specs = {}
        for name in definition.tools:
            try:
                specs[name] = (await self.tools.resolve(caller.tenant, name))[0]
            except NotFound:
                raise InvalidEntity(
                    f"agent {agent!r} names tool {name!r}, which the tenant cannot call",
                    [{"field": "agent", "message": f"unknown tool {name!r}"}], "run.agent") from None
        approval = tuple(t for t in definition.tools
                         if t in definition.approval or specs[t].needs_approval)
        run_id = str(uuid.uuid4())
        max_cost = (usd_to_micro(definition.max_cost_usd)
                    if definition.max_cost_usd is not None else None)
        started = RunStarted(
            run_id=run_id, session_id=session_id, tenant=caller.tenant, agent=definition.name,
            agent_version=definition.version, input=input,
            model=model or definition.effective_model(None),
            system_prompt=definition.system_prompt, tools=tuple(definition.tools),
            approval=approval, max_steps=definition.max_steps, max_cost_micro_usd=max_cost,
            temperature=definition.temperature, key_id=caller.key_id, role=caller.role,
            owner=self.instance, selection=selection)
        meta = Metadata(tenant=caller.tenant, actor=caller.actor, correlation_id=session_id,
                        causation_id=run_id)
        appends: list[tuple[str, list[Event], int | None]] = [(run_stream(run_id), [started], 0)]
        if max_cost is not None:
            budget = budget_stream_for_run(run_id)
            appends.append((budget, [BudgetOpened(budget_id=budget, scope=RUN, owner=run_id,
                                                  limit_micro_usd=max_cost)], 0))
        appends.append((conversation_stream(session_id), [MessageAppended(
            session_id=session_id, message_id=str(uuid.uuid4()), role="user", content=input,
            run_id=run_id)], None))

        async def lease(conn: Any) -> None:
            await self.leases.insert(conn, run_id, caller.tenant)

        await self.store.append_atomic(appends, meta, before=lease)
        self._spawn(run_id, 1)
        return run_out(R.fold_run([started]))  # type: ignore[arg-type]

    async def get(self, caller: Caller, run_id: str) -> RunOut:
        return run_out((await self._records(caller, run_id))[1])

    async def of_session(self, caller: Caller, session_id: str) -> list[RunSummary]:
        await self.sessions.require(caller, session_id)
        await self.runner.wait_for_head(("runs",))
        return [RunSummary(run_id=r["run_id"], session_id=r["session_id"], agent=r["agent"],
                           agent_version=r["agent_version"], status=r["status"], steps=r["steps"],
                           cost_usd=r["cost_micro_usd"] / 1e6, answer=r["answer"],
                           error=r["error"], created_at=r["created_at"],
                           updated_at=r["updated_at"])
                for r in await self.read_model.of_session(caller.tenant, session_id)]

    async def cancel(self, caller: Caller, run_id: str, reason: str = "") -> RunOut:
        for _ in range(50):
            _, state = await self._records(caller, run_id)
            if state.terminal:
                raise Conflict(f"run {run_id!r} is {state.status} already")
            try:
                await self.store.append(run_stream(run_id), [RunCancelled(
                    run_id=run_id, reason=reason or "cancelled by the client", by=caller.actor)],
                    expected_version=state.version, metadata=self._meta(caller, state))
            except WrongExpectedVersion:
                continue
            await self.leases.wake(run_id)  # a parked run: whoever claims it drops the lease
            self._interrupt(run_id)  # driven here: the LLM call or tool calls stop now
            with contextlib.suppress(Exception):  # driven elsewhere: its driver is told
                await self.bus.publish(subjects.RUN_INTERRUPT, RunInterrupt(run_id=run_id),
                                       traced=False)
            await self._publish_event(state.started, state.version + 1)
            return await self.get(caller, run_id)
        raise Conflict(f"run {run_id!r} is too busy to cancel right now; retry")

    async def answer(self, caller: Caller, run_id: str, tool_call_id: str, approve: bool,
                     reason: str = "") -> RunOut:
        """A human's answer to a tool call the run waits on; the run resumes."""
        for _ in range(50):
            _, state = await self._records(caller, run_id)
            if tool_call_id not in {a.tool_call_id for a in state.pending_approvals}:
                raise Conflict(f"run {run_id!r} is not waiting for an approval of "
                               f"{tool_call_id!r} (it is {state.status})")
            try:
                await self.store.append(run_stream(run_id), [RunApprovalGiven(
                    run_id=run_id, tool_call_id=tool_call_id, approved=approve, reason=reason,
                    by=caller.actor)], expected_version=state.version,
                    metadata=self._meta(caller, state))
            except WrongExpectedVersion:
                continue
            await self._publish_event(state.started, state.version + 1)
            await self.leases.wake(run_id)
            epoch = await self.leases.claim(run_id)  # this process drives it on at once
            if epoch is not None:
                self._spawn(run_id, epoch)
            return await self.get(caller, run_id)
        raise Conflict(f"run {run_id!r} is too busy right now; retry")

    async def follow(self, caller: Caller, run_id: str, after: int = 0) -> AsyncIterator[RunItem]:
        """The run's events after version `after`, then live: text deltas as the model
        generates them and each event as it is appended, until the run ends."""
        _, state = await self._records(caller, run_id)
        queue: asyncio.Queue[RunLive] = asyncio.Queue(maxsize=10_000)
        sub = await self._listen(subjects.run_live(state.started.session_id, run_id), queue)
        try:
            version = after
            while True:
                records = await self.store.read_stream(run_stream(run_id), from_version=version + 1)
                for rec in records:
                    version = rec.stream_version
                    yield RunItem(run_id, "event", rec.type, msgspec.to_builtins(rec.event), version)
                    if rec.type in ("RunFinished", "RunFailed", "RunCancelled"):
                        return
                try:
                    live = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    continue
                if live.kind == "delta":
                    yield RunItem(run_id, "delta", "delta", {"step": live.step, "text": live.text})
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def follow_session(self, caller: Caller, session_id: str) -> AsyncIterator[RunItem]:
        """Every run of the session, live from now on: deltas and each appended event."""
        await self.sessions.require(caller, session_id)
        queue: asyncio.Queue[RunLive] = asyncio.Queue(maxsize=10_000)
        sub = await self._listen(subjects.session_runs_live(session_id), queue)
        seen: dict[str, int] = {}
        try:
            while True:
                live = await queue.get()
                if live.kind == "delta":
                    yield RunItem(live.run_id, "delta", "delta", {"step": live.step, "text": live.text})
                    continue
                if live.run_id not in seen:
                    seen[live.run_id] = max(0, live.version - 1)
                records = await self.store.read_stream(run_stream(live.run_id),
                                                       from_version=seen[live.run_id] + 1)
                for rec in records:
                    if rec.metadata.tenant != caller.tenant:
                        break
                    seen[live.run_id] = rec.stream_version
                    yield RunItem(live.run_id, "event", rec.type, msgspec.to_builtins(rec.event),
                                  rec.stream_version)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- background: leases, takeovers ----------------------------------------------------

    async def run_forever(self) -> None:
        """Renew this process's leases; take over the runs whose lease lapsed; interrupt
        the runs it drives that another process cancels."""
        last_renew = 0.0
        interrupts = None
        while not self._stopping:
            try:
                if interrupts is None:
                    interrupts = await self.bus.subscribe(
                        subjects.RUN_INTERRUPT, RunInterrupt, self._on_interrupt)
                if time.monotonic() - last_renew >= self.lease_s / 4:
                    last_renew = time.monotonic()
                    await self.leases.renew_all(list(self._tasks))
                for run_id in await self.leases.due():
                    if run_id in self._tasks:
                        continue
                    epoch = await self.leases.claim(run_id)
                    if epoch is not None:
                        self.metrics.takeovers.add(1)
                        self._spawn(run_id, epoch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("run lease loop failed; trying again")
            await asyncio.sleep(self.scan_s)

    async def _on_interrupt(self, message: RunInterrupt, _msg: Any) -> None:
        self._interrupt(message.run_id)

    def _interrupt(self, run_id: str) -> None:
        """Cancel the effect in flight of a run this process drives (if any)."""
        run = self._driving.get(run_id)
        if run is not None and run.inflight is not None and not run.inflight.done():
            run.inflight.cancel()

    async def stop(self) -> None:
        """Stop driving (SIGTERM): in-flight work is cancelled, leases handed on at once."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def _spawn(self, run_id: str, epoch: int) -> None:
        if run_id in self._tasks or self._stopping:
            return
        task = asyncio.create_task(self._drive(run_id, epoch), name=f"run-{run_id}")
        self._tasks[run_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(run_id, None))

    # -- the loop -------------------------------------------------------------------------

    async def _drive(self, run_id: str, epoch: int) -> None:
        keep_lease = False
        try:
            records = await self.store.read_stream(run_stream(run_id))
            state = R.fold_run([(r.event, r.stream_version) for r in records])
            if state is None or state.terminal:
                await self.leases.drop(run_id)
                keep_lease = True
                return
            s = state.started
            caller = Caller(tenant=s.tenant, key_id=s.key_id, role=s.role)
            run = _Run(state=state, caller=caller, meta=self._meta(caller, state), epoch=epoch)
            self._driving[run_id] = run
            with tracer().start_as_current_span(
                    f"invoke_agent {s.agent}", context=_parent_context(records[0]),
                    kind=SpanKind.INTERNAL, attributes={
                        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": s.agent,
                        "gen_ai.agent.id": f"{s.agent}@{s.agent_version}",
                        "gen_ai.conversation.id": s.session_id, "gen_ai.request.model": s.model,
                        "nexus.run.id": run_id, "nexus.run.epoch": epoch}) as span:
                if epoch > 1:
                    await self._append(run, [RunResumed(run_id=run_id, owner=self.instance,
                                                        epoch=epoch)])
                await self._prepare(run)
                await self._recover(run)
                keep_lease = await self._loop(run)
                span.set_attribute("nexus.run.status", run.state.status)
        except LeaseLost as exc:
            keep_lease = True  # ended inside a step, or not ours any more
            if not isinstance(exc, _Stop):
                log.info("run taken over by another process, or ended meanwhile",
                         extra={"run_id": run_id})
        except asyncio.CancelledError:
            pass  # shutting down: the lease is handed on below
        except Exception:
            log.exception("driving a run failed", extra={"run_id": run_id})
        finally:
            self._driving.pop(run_id, None)
            if not keep_lease:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.leases.release(run_id, epoch))

    async def _prepare(self, run: _Run) -> None:
        """The agent's tools as the model sees them (OpenAI function definitions): those
        the session's policy allows (a call of another is still tried, and its denial
        fed back)."""
        s = run.started
        session = await self.sessions.require(run.caller, s.session_id)
        policy, _ = await self.tools.policies.compiled(run.caller.tenant, session.policy,
                                                       session.policy_version, session.policy_rules)
        for name in s.tools:
            try:
                spec = (await self.tools.resolve(run.caller.tenant, name))[0]
            except NotFound:
                continue  # removed since: a call of it is fed back as failed
            run.specs[name] = spec
            if policy is not None and not policy.evaluate_tool(name).allowed:
                continue
            run.offered.append(name)
            run.tool_defs.append({"type": "function", "function": {
                "name": R.function_name(name), "description": spec.description or name,
                "parameters": spec.parameters}})

    async def _loop(self, run: _Run) -> bool:
        """Drive until the run ends or waits; True when the lease was dropped or parked.

        One append per transition: the facts an effect produced (an answer, a tool's
        result) are appended together with every record-only decision that follows them
        and the opening records of the next effect (`_commit`), so a tool step costs two
        appends: [answer, tool calls started] and [result, next step started, LLM call
        linked]."""
        nxt = await self._commit(run, [])
        while True:
            match nxt.action:
                case R.Nothing():
                    await self.leases.drop(run.state.run_id)
                    return True
                case R.Finish() | R.Fail():  # recorded by the commit
                    await self.leases.drop(run.state.run_id)
                    self._count_end(run.state)
                    return True
                case R.Wait(until=until):
                    # no compute held: the lease is given up until an answer or the expiry
                    await self.leases.park(run.state.run_id, run.epoch, until)
                    if await self.store.stream_version(run_stream(run.state.run_id)) != run.state.version:
                        await self.leases.wake(run.state.run_id)  # answered meanwhile
                    return True
                case R.CallModel():
                    answered = await self._interruptible(run, self._call_model(
                        run, nxt.action, nxt.call_id or ""))
                    nxt = (answered if isinstance(answered, _Next)
                           else await self._commit(run, *(answered or ([], []))))
                case R.RunTools(attempts=attempts):
                    results, recorded = await self._interruptible(run, self._run_tools(run, attempts))
                    nxt = recorded or await self._commit(run, results, [
                        self._tool_message(run, r) for r in results])
                case _:
                    raise AssertionError(f"unexpected next action {nxt.action!r}")

    async def _interruptible(self, run: _Run, work: Awaitable[Any]) -> Any:
        """Run an effect (an LLM call, tool calls) as a task a cancel can interrupt: the
        call path's own cleanup settles it (the upstream stopped, the reservation
        released); the driver then reads the cancel from the stream and stops."""
        task = asyncio.ensure_future(work)
        run.inflight = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                await self._catch_up(run)  # the cancel is in the stream: LeaseLost
                raise RuntimeError("interrupted, but no cancel is recorded") from None
            raise
        finally:
            run.inflight = None
            if not task.done():
                task.cancel()

    def _opening(self, run: _Run, state: R.RunState,
                 ) -> tuple[list[Event], list[MessageAppended], _Next]:
        """The events every decision after `state` records up to (and including the
        opening of) the next one with an effect, which is returned."""
        events: list[Event] = []
        messages: list[MessageAppended] = []
        now = time.time()

        def add(*new: Event) -> None:
            nonlocal state
            for e in new:
                events.append(e)
                state = R.evolve(state, e)  # type: ignore[assignment]

        while True:
            action = R.decide_next(state, now, self.approval_ttl_s)
            match action:
                case R.FeedBack(results=results):
                    add(*results)
                    messages.extend(self._tool_message(run, r) for r in results)
                case R.MarkUnknown(slots=slots, step=step):
                    add(*(RunToolOutcomeUnknown(run_id=state.run_id, step=step, index=s.index,
                                                tool_call_id=s.tool_call_id or "", tool=s.tool)
                          for s in slots))
                case R.AskApproval(requests=requests):
                    add(*requests)
                case R.CallModel(step=step, new_step=new_step):
                    call_id = str(uuid.uuid4())
                    if new_step:
                        add(RunStepStarted(run_id=state.run_id, step=step))
                    add(RunLLMCallLinked(run_id=state.run_id, step=step, call_id=call_id))
                    return events, messages, _Next(action, call_id)
                case R.RunTools(attempts=attempts):
                    for a in attempts:
                        spec = run.specs.get(a.tool)
                        add(RunToolCallStarted(
                            run_id=state.run_id, step=a.step, index=a.index,
                            model_call_id=a.model_call_id, tool_call_id=a.tool_call_id,
                            tool=a.tool, effect=spec.effect if spec else "side_effecting",
                            attempt=a.attempt))
                    return events, messages, _Next(action)
                case R.Finish(answer=answer):
                    add(RunFinished(run_id=state.run_id, answer=answer, steps=len(state.steps),
                                    cost_micro_usd=state.cost_micro_usd))
                    return events, messages, _Next(action)
                case R.Fail(reason=reason, detail=detail):
                    add(RunFailed(run_id=state.run_id, reason=reason, detail=detail,
                                  steps=len(state.steps), cost_micro_usd=state.cost_micro_usd))
                    return events, messages, _Next(action)
                case _:  # Wait, Nothing: nothing to record
                    return events, messages, _Next(action)

    async def _commit(self, run: _Run, facts: list[Event],
                      conversation: list[MessageAppended] | None = None) -> _Next:
        """Append `facts` with what follows from them (`_opening`) in one transaction at
        the run's version; what to do next."""
        async with run.lock:
            for _ in range(20):
                state = run.state
                for e in facts:
                    state = R.evolve(state, e)  # type: ignore[assignment]
                more, said, nxt = self._opening(run, state)
                events = [*facts, *more]
                if not events:
                    return nxt
                try:
                    await self._write(run, events, [*(conversation or ()), *said])
                except WrongExpectedVersion:
                    await self._catch_up(run)
                    continue
                return nxt
            raise LeaseLost

    async def _call_model(self, run: _Run, action: R.CallModel, call_id: str,
                          ) -> tuple[list[Event], list[MessageAppended]] | _Next | None:
        """The step's LLM call (linked already): the next action when the call path
        recorded the answer (with what follows it, in its settle's transaction: a
        `_Joint`), else the answer to record, or None to ask again (no provider now)."""
        s = run.started
        messages = tuple(msgspec.convert(m, ChatMessage) for m in R.conversation(run.state))
        call_input = CallInput(session_id=s.session_id, model=s.model, messages=messages,
                               temperature=s.temperature, tools=run.tool_defs or None,
                               call_id=call_id, run_id=s.run_id, record_conversation=False,
                               tool_names=tuple(run.offered))
        tool_deltas: list[dict[str, Any]] = []
        done: Done | None = None
        joint = _Joint(self, run, lambda o: self._answered(run, action.step, call_id, o[0], o[1],
                                                           tool_deltas))
        try:
            call = await self.calls.open(run.caller, call_input, rider=joint)
            try:
                async for frame in call.frames():
                    if isinstance(frame, Delta):
                        if frame.content:
                            await self._publish(s, RunLive(run_id=s.run_id, kind="delta",
                                                           step=action.step, text=frame.content))
                        if frame.tool_calls:
                            tool_deltas.extend(frame.tool_calls)
                    elif isinstance(frame, Done):
                        done = frame
                    elif isinstance(frame, Failed):
                        raise failure_error(frame)
            finally:
                await call.aclose()
            text = "".join(call.call.output)
        except BudgetDenied as exc:
            await self._fail(run, "budget", f"{exc.budget} budget: {exc.detail}")
            raise _Stop from None
        except PolicyDenied as exc:
            await self._fail(run, "policy", f"{exc.rule}: {exc.detail}")
            raise _Stop from None
        except SessionClosed as exc:
            await self._fail(run, "session_closed", exc.detail)
            raise _Stop from None
        except ProviderUnavailable as exc:  # no provider now: the step is asked again
            attempts = len(run.state.steps[-1].call_ids)
            if attempts >= LLM_ATTEMPTS:
                await self._fail(run, "llm_error", f"ProviderUnavailable: {exc.detail}")
                raise _Stop from None
            log.warning("no provider for a run's LLM call; retrying",
                        extra={"run_id": s.run_id, "attempt": attempts})
            await asyncio.sleep(min(8.0, 0.5 * 2 ** attempts))
            return None
        except NexusError as exc:
            await self._fail(run, "llm_error", f"{type(exc).__name__}: {exc.detail}")
            raise _Stop from None
        if done is None:
            await self._fail(run, "llm_error", "the provider ended the call without an answer")
            raise _Stop
        if joint.done:
            assert joint.nxt is not None
            return joint.nxt
        return self._answered(run, action.step, call_id, done, text, tool_deltas)

    @staticmethod
    def _answered(run: _Run, step: int, call_id: str, done: Done, text: str,
                  tool_deltas: list[dict[str, Any]],
                  ) -> tuple[list[Event], list[MessageAppended]]:
        """The model's answer: the run's event and the conversation's message."""
        s = run.started
        tool_calls = R.merge_tool_call_deltas(tool_deltas)
        answered = RunModelAnswered(
            run_id=s.run_id, step=step, call_id=call_id, content=text,
            tool_calls=tool_calls, finish_reason=done.finish_reason,
            input_tokens=done.usage.input_tokens, output_tokens=done.usage.output_tokens,
            cost_micro_usd=done.cost_micro_usd, model=done.model)
        message = MessageAppended(
            session_id=s.session_id, message_id=str(uuid.uuid4()), role="assistant", content=text,
            call_id=call_id, model=done.model, provider=done.provider, node=done.node,
            input_tokens=done.usage.input_tokens, output_tokens=done.usage.output_tokens,
            cost_micro_usd=done.cost_micro_usd, finish_reason=done.finish_reason,
            tool_calls=tool_calls or None, run_id=s.run_id)
        return [answered], [message]

    async def _run_tools(self, run: _Run, attempts: tuple[R.ToolAttempt, ...],
                         ) -> tuple[list[RunToolResult], _Next | None]:
        """The tool calls (started already), in parallel. The tool path records each result
        with the call's end (a `_Joint`), the step's last one with what follows it (then
        its next action is returned). A result it could not record (the run's stream moved
        on) is appended here as it comes, or, the last, returned to be committed with
        what follows it."""
        batch = {a.tool_call_id for a in attempts}  # the attempts whose result is not recorded
        tasks = {asyncio.ensure_future(self._tool_result(run, a, batch)) for a in attempts}
        try:
            while True:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                outcomes = [t.result() for t in done]
                results = [r for r, joint in outcomes if joint is None]
                if not tasks:
                    recorded = next((j.nxt for _, j in outcomes if j is not None and j.nxt), None)
                    return results, recorded
                if results:
                    await self._append(run, list(results),
                                       conversation=[self._tool_message(run, r) for r in results])
                    batch.difference_update(r.tool_call_id for r in results)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)

    async def _tool_result(self, run: _Run, attempt: R.ToolAttempt, batch: set[str] | None = None,
                           ) -> tuple[RunToolResult, _Joint | None]:
        """The attempt's result, and the joint that recorded it (None: not recorded). With
        `batch`, the tool path records it; the last of the batch with what follows."""
        joint = None
        if batch is not None:
            def facts(view: ToolCallView) -> tuple[list[Event], list[MessageAppended]]:
                result = self._result(run, attempt, *_content_of(view))
                return [result], [self._tool_message(run, result)]

            joint = _Joint(
                self, run, facts, opening=lambda: batch == {attempt.tool_call_id},
                on_recorded=lambda: batch.discard(attempt.tool_call_id))
        content, is_error, status = await self._invoke(run, attempt, joint)
        result = self._result(run, attempt, content, is_error, status)
        return result, (joint if joint is not None and joint.done else None)

    @staticmethod
    def _result(run: _Run, attempt: R.ToolAttempt, content: str, is_error: bool,
                status: str) -> RunToolResult:
        return RunToolResult(
            run_id=run.started.run_id, step=attempt.step, index=attempt.index,
            model_call_id=attempt.model_call_id, tool_call_id=attempt.tool_call_id,
            tool=attempt.tool, content=content, is_error=is_error, status=status)

    async def _run_tool(self, run: _Run, attempt: R.ToolAttempt) -> None:
        """One attempt that is recorded as started (a recovery): run it, record it."""
        await self._record_result(run, (await self._tool_result(run, attempt))[0])

    async def _invoke(self, run: _Run, attempt: R.ToolAttempt,
                      joint: _Joint | None = None) -> tuple[str, bool, str]:
        s = run.started
        try:
            view = await self.tools.invoke(run.caller, s.session_id, attempt.tool,
                                           dict(attempt.arguments), run_id=s.run_id,
                                           call_id=attempt.tool_call_id, rider=joint)
            if view.status == "pending_approval":  # the run asked its human already
                view = await self.tools.answer_approval(
                    run.caller, s.session_id, attempt.tool_call_id, approve=True,
                    reason=f"approved in run {s.run_id} by {attempt.approved_by or 'the run'}",
                    rider=joint)
            return _content_of(view)
        except PolicyDenied as exc:
            return f"denied by policy ({exc.rule}): {exc.detail}", True, "denied"
        except InvalidEntity as exc:
            return f"invalid arguments: {exc.detail}", True, "denied"
        except (NoNodeAvailable, NotFound, SessionClosed, Conflict) as exc:
            return f"the tool call failed: {exc.detail}", True, "failed"

    @staticmethod
    def _tool_message(run: _Run, result: RunToolResult) -> MessageAppended:
        return MessageAppended(
            session_id=run.started.session_id, message_id=str(uuid.uuid4()), role="tool",
            content=result.content, tool_call_id=result.model_call_id, run_id=run.started.run_id)

    async def _record_result(self, run: _Run, result: RunToolResult) -> None:
        await self._append(run, [result], conversation=[self._tool_message(run, result)])

    async def _recover(self, run: _Run) -> None:
        """After a takeover: attempts in flight that ended (or never began) on their own
        stream are settled from it, never run twice."""
        if not run.state.steps:
            return
        step = run.state.steps[-1]
        rerun = []
        for slot in step.slots:
            if not slot.in_flight or slot.tool_call_id is None:
                continue
            events = [r.event for r in await self.store.read_stream(toolcall_stream(slot.tool_call_id))]
            outcome = _content_of_events(events)
            attempt = R.ToolAttempt(step.step, slot.index, slot.model_call_id, slot.tool,
                                    dict(slot.arguments), slot.attempt, slot.tool_call_id)
            if outcome is not None:
                content, is_error, status = outcome
                await self._record_result(run, RunToolResult(
                    run_id=run.state.run_id, step=step.step, index=slot.index,
                    model_call_id=slot.model_call_id, tool_call_id=slot.tool_call_id,
                    tool=slot.tool, content=content, is_error=is_error, status=status))
            elif not events or _pending_tool_approval(events):  # never reached the tool path: run it now, same id
                rerun.append(self._run_tool(run, attempt))
            # else: it was running on a node when its driver died: decide_next says
        if rerun:
            await asyncio.gather(*rerun)

    # -- events ---------------------------------------------------------------------------

    async def _append(self, run: _Run, events: list[Event],
                      conversation: list[MessageAppended] | None = None) -> None:
        """Append at the run's version (fencing); a conflict that is not ours to absorb
        (another owner, or the run ended: cancelled) raises `LeaseLost`."""
        async with run.lock:
            for _ in range(20):
                try:
                    await self._write(run, events, conversation or [])
                except WrongExpectedVersion:
                    await self._catch_up(run)
                    continue
                return
            raise LeaseLost

    async def _write(self, run: _Run, events: list[Event],
                     conversation: list[MessageAppended]) -> None:
        """One transaction: `events` at the run's version, the messages to the session's
        conversation; then the state is evolved and viewers told (`run.lock` held)."""
        appends: list[tuple[str, list[Event], int | None]] = [
            (run_stream(run.state.run_id), events, run.state.version)]
        if conversation:
            appends.append((conversation_stream(run.started.session_id), list(conversation), None))
        await self.store.append_atomic(appends, run.meta)
        await self._applied(run, events)

    async def _applied(self, run: _Run, events: list[Event]) -> None:
        """`events` were appended at the run's version: evolve the state, tell viewers."""
        state = run.state
        for i, event in enumerate(events, start=1):
            state = R.evolve(state, event, run.state.version + i)  # type: ignore[assignment]
        run.state = state
        await self._publish_event(run.started, state.version)

    async def _catch_up(self, run: _Run) -> None:
        records = await self.store.read_stream(run_stream(run.state.run_id),
                                               from_version=run.state.version + 1)
        for rec in records:
            if rec.stream_version <= run.state.version:
                continue  # applied meanwhile (a joint append recorded it)
            if isinstance(rec.event, RunResumed) and rec.event.epoch != run.epoch:
                raise LeaseLost
            run.state = R.evolve(run.state, rec.event, rec.stream_version)  # type: ignore[assignment]
        if run.state.terminal:
            await self.leases.drop(run.state.run_id)
            self._count_end(run.state)
            raise LeaseLost

    async def _end(self, run: _Run, event: Event) -> None:
        await self._append(run, [event])
        await self.leases.drop(run.state.run_id)
        self._count_end(run.state)

    async def _fail(self, run: _Run, reason: str, detail: str) -> None:
        await self._end(run, RunFailed(run_id=run.state.run_id, reason=reason, detail=detail,
                                       steps=len(run.state.steps),
                                       cost_micro_usd=run.state.cost_micro_usd))

    def _count_end(self, state: R.RunState) -> None:
        self.metrics.ended(state.status if state.status != "failed" else f"failed:{state.error}",
                           len(state.steps), state.cost_micro_usd)

    async def _records(self, caller: Caller, run_id: str) -> tuple[list[RecordedEvent], R.RunState]:
        """The run's events and state, if it is a run of the caller's tenant; else NotFound."""
        records = await self.store.read_stream(run_stream(run_id))
        if (not records or records[0].metadata.tenant != caller.tenant
                or not isinstance(records[0].event, RunStarted)):
            raise NotFound("run", run_id)
        state = R.fold_run([(r.event, r.stream_version) for r in records])
        assert state is not None
        return records, state

    @staticmethod
    def _meta(caller: Caller, state: R.RunState) -> Metadata:
        return Metadata(tenant=caller.tenant, actor=caller.actor,
                        correlation_id=state.started.session_id, causation_id=state.run_id)

    # -- live -----------------------------------------------------------------------------

    async def _publish(self, started: RunStarted, live: RunLive) -> None:
        with contextlib.suppress(Exception):  # viewers are best effort; events are the truth
            await self.bus.publish(subjects.run_live(started.session_id, started.run_id), live,
                                   traced=False)

    async def _publish_event(self, started: RunStarted, version: int) -> None:
        await self._publish(started, RunLive(run_id=started.run_id, kind="event", version=version))

    async def _listen(self, subject: str, queue: asyncio.Queue[RunLive]) -> Any:
        decoder = msgspec.json.Decoder(RunLive)

        async def on_message(msg: Any) -> None:
            with contextlib.suppress(Exception):
                queue.put_nowait(decoder.decode(msg.data))

        return await self.bus.nc.subscribe(subject, cb=on_message)


class _Stop(LeaseLost):
    """The run ended inside a step (recorded already): stop the loop."""
