"""One LLM call as the orchestrator runs it: the call lifecycle, a use case.

`CallLifecycle.open(caller, CallInput)` takes a typed call (whatever endpoint it came
from: `/v1/chat/completions`, a session message, next the agent runner) through

    session -> model -> policy decision -> admission -> plan -> provider

and raises domain errors (`shared.contracts.errors`) for what it refuses; the HTTP edge
maps them to problem+json in one place (`problems.py`).

- The **policy decision** (`CompiledPolicy.evaluate_chat`: models and providers on
  every target of the route, max tokens, tools, content, rate limits on the current
  window's usage) is recorded as `PolicyEvaluated`.
- **Admission** is one Postgres transaction: the decision's event, the budget
  reservations (`BudgetReserved` on every budget the call is charged to) and the
  call's rate-limit slots (`RateCounter.take`, every scope or none). A call denied for
  any reason (policy, budget, a slot taken meanwhile by another process) consumes no
  slot and reserves nothing.
- The **plan** (`shared.domain.routing.plan_call`): the allowed targets, in order, with
  their redaction and nodes; the provider executes it.
- **Execution** streams frames from a provider over NATS; however the stream ends, the
  actual cost is committed (or the reservation released) and tokens are counted; an
  answer's conversation (`MessageAppended`) commits in the cost's transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared.contracts import subjects
from shared.contracts.errors import (
    BudgetDenied,
    CallFailed,
    InvalidRequest,
    NexusError,
    PolicyDenied,
    ProviderUnavailable,
    SessionClosed,
    UnknownModel,
)
from shared.contracts.events import (
    DroppedTarget,
    MessageAppended,
    Metadata,
    PolicyEvaluated,
    conversation_stream,
    llmcall_stream,
    new_id,
    session_stream,
)
from shared.contracts.frames import Delta, Done, Failed
from shared.contracts.messages import (
    ChatMessage,
    CompletionRequest,
    ModelInfo,
    ModelsReply,
    ModelsRequest,
    messages_text,
)
from shared.domain.budget import CANCELLED, FAILED, prompt_token_bound
from shared.domain.policy import ChatRequestFacts, CompiledPolicy, Decision, redact_kinds
from shared.domain.routing import Fleet, Plan, installed_model_info, plan_call, route_of
from shared.infra.eventstore import EventStore, WrongExpectedVersion
from shared.infra.messaging import Bus, MessagingError
from shared.infra.metrics import ControlMetrics
from shared.infra.streaming import StreamReceiver
from services.orchestrator.budget_manager import BudgetManager, Charge
from services.orchestrator.joint import Rider, append_joint
from services.orchestrator.keys import Caller
from services.orchestrator.policies import PolicyService
from services.orchestrator.ratelimits import RateCounter, RateLimited
from services.orchestrator.read_models.messages import MessagesReadModel
from services.orchestrator.schemas import MessageOut, SessionView
from services.orchestrator.sessions import SessionService
from services.orchestrator.skills import SkillRouter, plan_loads, planned_event, routed_model

log = logging.getLogger("nexus.orchestrator.calls")

DEFAULT_MAX_TOKENS = 1024
MODELS_TTL_S = 10.0
# A policy scans a text longer than this in a worker thread: RE2 releases the GIL while
# it scans, so a large input never holds up the event loop (and every other request).
SCAN_OFF_LOOP_CHARS = 32_768
_scanner = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="policy-scan")

Frame = Delta | Done | Failed
# an answer whose record (cost, conversation, the provider's events) could not be
# appended is not given to the client: it would be an acknowledged call without events
UNRECORDED = Failed(error="StoreUnavailable", status=503, after_first_token=True,
                    detail="the answer could not be recorded (the event store failed); try again")


async def policy_scan(policy: CompiledPolicy, text: str, evaluate, *args):
    """`evaluate(*args)`, which scans `text`; off the event loop when that is long."""
    if policy.has_content_rules and len(text) > SCAN_OFF_LOOP_CHARS:
        return await asyncio.get_running_loop().run_in_executor(
            _scanner, functools.partial(evaluate, *args))
    return evaluate(*args)


def estimate_prompt_tokens(messages: tuple[ChatMessage, ...]) -> int:
    """A typical count (1 token per 4 characters, plus 4 per message), for the context
    check and the default `max_tokens` only; budgets reserve `reserved_prompt_tokens`."""
    return math.ceil(sum(len(m.text) for m in messages) / 4) + 4 * len(messages)


def reserved_prompt_tokens(messages: tuple[ChatMessage, ...], tools: list[dict] | None,
                           redact: tuple[str, ...]) -> int:
    """The prompt tokens a reservation covers: `prompt_token_bound` of the messages as
    sent, i.e. also after redaction (a placeholder can be longer than what it replaces)."""
    bound = prompt_token_bound(messages, tools)
    if redact:
        redacted = tuple(msgspec.structs.replace(m, content=redact_kinds(m.content, redact))
                         if isinstance(m.content, str) else m for m in messages)
        bound = max(bound, prompt_token_bound(redacted, tools))
    return bound


class _SessionMoved(Exception):
    """The session stream moved after the call read the session (admit again)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id


class CallInput(msgspec.Struct, frozen=True, kw_only=True):
    """One LLM call as a client asks for it, whatever the endpoint.

    `session_id`: the session it belongs to; None: the caller key's default session.
    `with_history`: the session's conversation goes before `messages`. The user text
    recorded in the conversation is that of the last user message (else the last one).
    """

    session_id: str | None
    model: str
    messages: tuple[ChatMessage, ...]
    with_history: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # an agent run's call: its id chosen by the run, also charged to the run's own
    # budget, and the conversation recorded by the run (with its tool calls) instead
    call_id: str | None = None
    run_id: str | None = None
    record_conversation: bool = True
    tool_names: tuple[str, ...] | None = None  # the registry names behind `tools` (policy)
    stream: bool = True  # the answer is passed on as it comes; False: used only whole

    @property
    def user_text(self) -> str:
        last = next((m for m in reversed(self.messages) if m.role == "user"), self.messages[-1])
        return last.text


@dataclass
class Call:
    """An admitted call: its request (with the plan) and what settling it needs."""

    call_id: str
    caller: Caller
    session: SessionView
    model: ModelInfo
    request: CompletionRequest
    charge: Charge
    metadata: Metadata
    new_user_text: str
    rate_subjects: dict[str, str]
    policy: CompiledPolicy | None
    policy_label: str | None
    plan: Plan
    output: list[str] = field(default_factory=list)
    output_denied: bool = False
    record_conversation: bool = True
    rider: Rider | None = None  # an agent run's events for the answer, settled with it
    # the call's own events for the settle's transaction: its admission's (policy,
    # routing) when it was admitted from budget leases, the provider's record of the
    # answer (`Done.record`) and the output policy's decision
    call_events: list[Any] = field(default_factory=list)
    # `OpenCall.collect(behind=True)`: the answer's `Done` passes as soon as its settle's
    # statement has left, and the caller acknowledges it after `OpenCall.recorded()`
    record_behind: bool = False
    settled: asyncio.Future[bool] | None = None  # the settle, once started


def failure_error(failed: Failed) -> NexusError:
    """The domain error of a call that ended without an answer."""
    if failed.error == "PolicyDenied":
        return PolicyDenied(failed.rule or "content.output.deny", failed.detail)
    return CallFailed(failed.error, f"{failed.error}: {failed.detail}", failed.status)


class OpenCall:
    """A call whose first frame has arrived (so it did not fail before its first token):
    the remaining frames, passed through, remembering how the call ended."""

    def __init__(self, call: Call, frames: AsyncIterator[Frame], first: Frame) -> None:
        self.call = call
        self.first = first
        self._frames = frames
        self.last: Frame = first

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def session_id(self) -> str:
        return self.call.session.session_id

    async def frames(self) -> AsyncIterator[Frame]:
        """Every frame, the first included; ends after `Done` or `Failed`."""
        frame = self.first
        while True:
            self.last = frame
            yield frame
            if not isinstance(frame, Delta):
                return
            try:
                frame = await anext(self._frames)
            except StopAsyncIteration:
                return

    async def collect(self, *, behind: bool = False) -> tuple[Done, str, list[dict[str, Any]]]:
        """The whole answer: `Done`, the text and the tool-call deltas; a failure raises.

        Recorded before it returns, or with `behind` while its record commits: the
        caller then builds its answer meanwhile and must await `recorded()` before it
        gives the answer to anyone (no answer acknowledged before its events are)."""
        self.call.record_behind = behind
        tool_calls: list[dict[str, Any]] = []
        pending = False
        try:
            async for frame in self.frames():
                if isinstance(frame, Delta):
                    if frame.tool_calls:
                        tool_calls.extend(frame.tool_calls)
                elif isinstance(frame, Done):
                    pending = behind
                    return frame, "".join(self.call.output), tool_calls
                else:
                    raise failure_error(frame)
            raise CallFailed("NoAnswer", "the provider closed the stream without an answer")
        finally:
            if not pending:
                await self.aclose()

    async def recorded(self) -> None:
        """The answer `collect(behind=True)` returned is recorded (its cost, conversation
        and events committed); raises the failure when that failed."""
        await self.aclose()
        if not (self.call.settled is not None and self.call.settled.result()):
            raise failure_error(UNRECORDED)

    async def aclose(self) -> None:
        """Done or client gone: cancels the upstream, settles the budget."""
        await self._frames.aclose()  # type: ignore[attr-defined]

    def answered(self) -> bool:
        """Ended with a final answer (spent): an answer, or one the policy refused."""
        last = self.last
        return isinstance(last, Done) or (isinstance(last, Failed) and last.error == "PolicyDenied")


class CallLifecycle:
    def __init__(self, store: EventStore, bus: Bus, sessions: SessionService,
                 budgets: BudgetManager, policies: PolicyService, rates: RateCounter,
                 fleet: Fleet, *, request_timeout_s: float) -> None:
        self.fleet = fleet
        self.metrics = ControlMetrics()
        self.store = store
        self.bus = bus
        self.sessions = sessions
        self.budgets = budgets
        self.policies = policies
        self.rates = rates
        self.messages = MessagesReadModel(store)
        self.request_timeout_s = request_timeout_s
        self._models: tuple[float, dict[str, ModelInfo]] = (0.0, {})
        self._node_provider: tuple[str, int] = ("", 4096)  # who serves installed models
        self.router: SkillRouter | None = None  # skill routing (`auto`, `skill:<name>`)

    # -- the use case -----------------------------------------------------------------

    async def open(self, caller: Caller, call_input: CallInput,
                   rider: Rider | None = None) -> OpenCall:
        """Admit the call, send it and wait for its first frame; raises a domain error
        for a refusal or a failure before the first token. `rider`: an agent run's events
        for the answer, appended in the settle's transaction (joint.py)."""
        call = await self.admit(caller, call_input)
        call.rider = rider
        frames = self.execute(call)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            raise CallFailed("NoAnswer", "the provider closed the stream without an answer") from None
        except BaseException:
            await frames.aclose()
            raise
        if isinstance(first, Failed):
            await frames.aclose()
            raise failure_error(first)
        return OpenCall(call, frames, first)

    async def conversation(self, caller: Caller, session_id: str) -> tuple[MessageOut, ...]:
        """Both sides of the caller's session's conversation; read-your-writes: with the
        answer the client has just received (its events committed before its last byte)."""
        await self.sessions.require(caller, session_id)
        await self.sessions.runner.wait_for_stream(conversation_stream(session_id), ("messages",))
        return await self.messages.conversation(session_id)

    # -- models -----------------------------------------------------------------------

    async def models(self) -> dict[str, ModelInfo]:
        """The provider's models and routes (cached), plus every model installed on an
        online node that no route names (callable by its own name: `installed_model_info`)."""
        fetched_at, models = self._models
        if time.monotonic() - fetched_at > MODELS_TTL_S or not models:
            try:
                reply = await self.bus.request(subjects.PROVIDER_MODELS, ModelsRequest(),
                                               ModelsReply, timeout=self.request_timeout_s)
            except MessagingError as exc:
                if not models:
                    raise ProviderUnavailable(f"no provider answered: {exc}") from None
            else:
                models = {m.name: m for m in reply.models}
                self._models = (time.monotonic(), models)
                self._node_provider = (reply.node_provider, reply.node_context)
        provider, context = self._node_provider
        served = getattr(self.fleet, "served_models", None)
        if not provider or served is None:
            return models
        extra = {}
        for m in served():
            if m in models:
                continue
            configured = models.get(f"{provider}/{m}")  # a node model the provider prices
            extra[m] = msgspec.structs.replace(configured, name=m) if configured else \
                installed_model_info(m, provider, context)
        return {**models, **extra} if extra else models

    # -- sessions ---------------------------------------------------------------------

    async def session_for(self, caller: Caller, session_id: str | None,
                          cached: bool = False) -> SessionView:
        """The named session (open, of this tenant), or the caller key's default session.
        `cached`: as this process last saw it open, if it did (the caller then fences its
        admission on the session stream's version: `admit`)."""
        if session_id is None:
            return await self.sessions.default_session(caller, cached=cached)
        if cached and (view := self.sessions.cached_open(caller, session_id)) is not None:
            return view
        view = await self.sessions.require(caller, session_id)
        if view.status != "open":
            raise SessionClosed(session_id)
        self.sessions.remember_open(view)
        return view

    async def admit(self, caller: Caller, call_input: CallInput) -> Call:
        """Admit the call (or raise the refusal). The session comes from memory when this
        process has seen it open; the admission's append then requires the session
        stream unchanged (a close anywhere moves it), and a refused fence admits again
        on the session as read now (closed: `SessionClosed`)."""
        for attempt in range(3):
            try:
                return await self._admit(caller, call_input, cached=attempt == 0)
            except _SessionMoved as moved:
                session_id = moved.session_id
        raise SessionClosed(session_id)  # its stream only moves when it closes

    async def _admit(self, caller: Caller, call_input: CallInput, *, cached: bool) -> Call:
        session = await self.session_for(caller, call_input.session_id, cached=cached)
        messages = call_input.messages
        if call_input.with_history:
            messages = (*await self.messages.history(session.session_id), *messages)
        models = await self.models()
        model = call_input.model
        routed = None
        if self.router is not None and routed_model(model):  # `auto` / `skill:<name>`
            routed = await self.router.route(caller, session, model, messages, models, self.policies)
            model, info = routed.model, routed.info
        else:
            info = models.get(model)
        if info is None:
            raise UnknownModel(model, tuple(models))
        max_tokens = call_input.max_tokens
        prompt_tokens = estimate_prompt_tokens(messages)
        if max_tokens is not None and max_tokens + prompt_tokens > info.context:
            raise InvalidRequest(
                f"max_tokens: {max_tokens} plus the prompt (~{prompt_tokens} tokens) "
                f"exceeds the context of {model!r} ({info.context} tokens)",
                [{"field": "max_tokens", "message": "exceeds the model's context"}])
        call_id = call_input.call_id or new_id()
        metadata = Metadata(tenant=caller.tenant, actor=caller.actor,
                            correlation_id=session.session_id,
                            causation_id=call_input.run_id or call_id)
        route = route_of(info)
        policy, label = await self.policies.compiled(caller.tenant, session.policy,
                                                     session.policy_version, session.policy_rules)
        decision: Decision | None = None
        rate_subjects: dict[str, str] = {}
        slots: dict[str, tuple[str, int | None]] = {}
        policy_events: tuple[tuple[str, list], ...] = ()
        if policy is not None:
            scopes = {"tenant": caller.tenant, "key": caller.key_id, "session": session.session_id}
            rate_subjects = {s: scopes[s] for s in policy.rate_scopes}
            slots = {s: (subject, self._calls_limit(policy, s))
                     for s, subject in rate_subjects.items()}
            # every target of the route is evaluated (each with its own hosted flag)
            facts = ChatRequestFacts(
                model=model, targets=tuple(t.facts() for t in route), max_tokens=max_tokens,
                input_text=messages_text(messages),
                tools=call_input.tool_names if call_input.tool_names is not None else
                tuple(t.get("function", {}).get("name", "") for t in call_input.tools or ()))
            decision = await policy_scan(policy, facts.input_text, policy.evaluate_chat, facts,
                                         await self.rates.usage(rate_subjects))
            self._count(decision)
            if not decision.allowed:
                await self._deny(decision, session, call_id, label, metadata)
            policy_events = ((llmcall_stream(call_id), [self._evaluated(
                decision, session, call_id, label)]),)
            if max_tokens is None and decision.max_tokens is not None:
                max_tokens = decision.max_tokens
        if routed is not None:  # the routing decision commits with the policy's
            policy_events = routed.with_events(call_id, policy_events)
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, info.context - prompt_tokens))
        redact = tuple(decision.redact) if decision is not None else ()
        prompt_bound = reserved_prompt_tokens(messages, call_input.tools, redact)
        charge = await self.budgets.charge_for(call_id, caller.tenant, session.session_id,
                                               run_id=call_input.run_id)
        take = functools.partial(self.rates.take, slots=slots) if slots else None
        # the session as read: still open when the admission commits (a close moves it)
        fence = ((session_stream(session.session_id), session.version),)
        deferred: tuple[tuple[str, list], ...] = ()  # admitted from leases: the settle's
        try:  # the verdict, the reservations and the rate slots commit together, or nothing
            if charge.streams:
                deferred = await self.budgets.reserve(
                    charge, math.ceil(prompt_bound * info.input_usd_per_mtok
                                      + max_tokens * info.output_usd_per_mtok),
                    prompt_bound + max_tokens, metadata, with_events=policy_events, before=take,
                    require=fence)
            elif policy_events:
                await self.store.append_atomic([(s, e, None) for s, e in policy_events],
                                               metadata, before=take, require=fence)
            elif cached:  # nothing appended at admission fences a remembered view: read it
                await self.session_for(caller, session.session_id)
        except WrongExpectedVersion as exc:  # the session moved (closed) since it was read
            if exc.stream_id != fence[0][0]:
                raise
            self.sessions.forget(session.session_id)
            raise _SessionMoved(session.session_id) from None
        except BudgetDenied as exc:
            self.metrics.budget_denials.add(1, {"budget": exc.budget})
            raise
        except RateLimited as exc:  # another call took the last slot since the usage was read
            assert decision is not None
            await self._deny(Decision(allowed=False, rule=f"rate.calls_per_minute.{exc.scope}",
                                      scope=exc.scope, reason=str(exc)),
                             session, call_id, label, metadata, count=True)
        plan = plan_call(route, decision, self.fleet)
        strategy, loads = plan_loads(plan, self.fleet)  # recorded by the provider's LLMCallStarted
        request = CompletionRequest(
            call_id=call_id, session_id=session.session_id, tenant=caller.tenant, model=model,
            messages=messages, max_tokens=max_tokens, temperature=call_input.temperature,
            top_p=call_input.top_p, stop=call_input.stop, tools=call_input.tools,
            tool_choice=call_input.tool_choice, redact=redact, nodes=plan.nodes,
            targets=plan.targets, plan_strategy=strategy, plan_loads=loads, caller_records=True,
            stream=call_input.stream, batch_frames=True)
        call = Call(call_id, caller, session, info, request, charge, metadata,
                    call_input.user_text, rate_subjects, policy, label, plan,
                    record_conversation=call_input.record_conversation)
        for stream, events in deferred:  # the call's stream only (`policy_events`)
            assert stream == llmcall_stream(call_id), stream
            call.call_events.extend(events)
        return call

    @staticmethod
    def _calls_limit(policy: CompiledPolicy, scope: str) -> int | None:
        limits = getattr(policy.rules, f"rate_per_{scope}")
        return limits.calls_per_minute if limits else None

    @staticmethod
    def _evaluated(decision: Decision, session: SessionView, call_id: str,
                   label: str | None) -> PolicyEvaluated:
        return PolicyEvaluated(
            session_id=session.session_id, call_id=call_id, action="chat",
            allowed=decision.allowed, rule=decision.rule, reason=decision.reason,
            policy=label, scope=decision.scope,
            targets=tuple(t.target for t in decision.allowed_targets),
            dropped=tuple(DroppedTarget(target=t.target, rule=t.rule, reason=t.reason)
                          for t in decision.dropped_targets))

    def _count(self, decision: Decision) -> None:
        self.metrics.policy.add(1, {"rule": decision.rule, "allowed": str(decision.allowed).lower()})

    async def _deny(self, decision: Decision, session: SessionView, call_id: str,
                    label: str | None, metadata: Metadata, count: bool = False) -> None:
        """Record a denial (nothing else is written for the call) and raise it."""
        if count:
            self._count(decision)
        await self.store.append(llmcall_stream(call_id),
                                [self._evaluated(decision, session, call_id, label)],
                                expected_version=None, metadata=metadata)
        raise PolicyDenied(decision.rule, decision.reason, label)

    # -- execution --------------------------------------------------------------------

    async def execute(self, call: Call) -> AsyncIterator[Frame]:
        """Frames of the call; settles budget and conversation however the stream ends.

        A provider that vanishes before the first token (killed, partitioned) is not the
        client's problem: the request goes once more to the queue, i.e. to another
        provider instance. After the first token a lost provider ends the stream with a
        clear failure.
        """
        outcome: Done | Failed | None = None

        def start() -> asyncio.Future[bool]:
            if call.settled is None:
                call.settled = asyncio.ensure_future(self._settle(call, outcome))
            return call.settled

        async def settle() -> bool:  # before the client sees the end: no answer acknowledged
            settled = start()          # whose cost and conversation are not yet recorded
            if settled.done():  # the finally after the end frame: nothing to wait for
                return settled.result()
            return await asyncio.shield(settled)

        try:
            for attempt in (1, 2):
                sent_any = False
                try:
                    async with StreamReceiver(self.bus, subjects.PROVIDER_COMPLETE, call.request,
                                              first_frame_timeout_s=self.request_timeout_s) as stream:
                        async for frame in stream.frames():
                            if isinstance(frame, Delta):
                                if frame.content:
                                    call.output.append(frame.content)
                                sent_any = True
                            else:
                                outcome = frame
                                if isinstance(frame, Done):
                                    call.call_events.extend(frame.record)
                                    denied = await self._check_output(call)
                                    if denied is None and call.record_behind:
                                        start()  # its statement leaves in the turn below;
                                        await asyncio.sleep(0)  # `OpenCall.recorded` waits
                                    elif not await settle():
                                        frame = UNRECORDED
                                    elif denied is not None:
                                        frame = denied
                                else:
                                    await settle()
                            yield frame
                    break
                except MessagingError as exc:
                    if not sent_any and attempt == 1:
                        log.warning("provider lost before the first token; retrying once",
                                    extra={"call_id": call.call_id, "error": str(exc)})
                        continue
                    outcome = Failed(error="ProviderUnavailable", detail=str(exc), status=503,
                                     after_first_token=sent_any)
                    await settle()
                    yield outcome
        finally:
            await settle()

    async def _check_output(self, call: Call) -> Failed | None:
        """`content.deny_output` of the session's policy, on the whole answer."""
        if call.policy is None or not call.policy.rules.content.deny_output:
            return None
        text = "".join(call.output)
        decision = await policy_scan(call.policy, text, call.policy.check_output, text)
        call.call_events.append(PolicyEvaluated(  # recorded by the settle, with the cost
            session_id=call.session.session_id, call_id=call.call_id, action="output",
            allowed=decision.allowed, rule=decision.rule, reason=decision.reason,
            policy=call.policy_label))
        self._count(decision)
        if decision.allowed:
            return None
        call.output_denied = True  # the cost is spent (committed), the answer not kept
        return Failed(error="PolicyDenied", detail=decision.reason, status=403,
                      after_first_token=True, rule=decision.rule)

    async def _settle(self, call: Call, outcome: Done | Failed | None) -> bool:
        """Record how the call ended; False when that failed (logged: the sweeper then
        releases the reservation, and an answer is not given to the client)."""
        try:
            if isinstance(outcome, Done):
                tokens = outcome.usage.input_tokens + outcome.usage.output_tokens
                if call.charge.streams:
                    self.metrics.budget_committed.add(outcome.cost_micro_usd / 1e6)
                # one transaction: the cost committed with the conversation and a run's
                # events for the answer (`rider`, joint.py) on the last budget; without a
                # budget, the conversation and the rider's events alone. Token counters
                # (when a rate limit counts them): an independent write, meanwhile.
                rider = call.rider if not call.output_denied else None
                answer = (outcome, "".join(call.output))
                conversation = ([self._conversation(call, outcome)]
                                if call.record_conversation and not call.output_denied else [])
                if call.call_events:  # the provider's record of the answer, the output check
                    conversation.append((llmcall_stream(call.call_id), call.call_events, None))
                recording = (self.budgets.commit(call.charge, outcome.cost_micro_usd, tokens,
                                                 call.metadata, rider, answer,
                                                 with_events=conversation)
                             if call.charge.streams else
                             self._record_answer(call, conversation, rider, answer))
                if call.rate_subjects and tokens > 0:
                    commits, _ = await asyncio.gather(
                        recording, self.rates.add_tokens(call.rate_subjects, tokens))
                else:  # nothing to count: no second write, no tasks to run both
                    commits = await recording
                for commit in commits:
                    if commit.overrun_micro_usd or commit.overrun_tokens:
                        scope = "session" if commit.budget_id.startswith("budget-session-") else "tenant"
                        self.metrics.budget_overruns.add(1, {"budget": scope})
                        self.metrics.budget_overrun_tokens.add(commit.overrun_tokens, {"budget": scope})
                        log.warning("a call cost more than it reserved", extra={
                            "call_id": call.call_id, "budget": commit.budget_id,
                            "overrun_tokens": commit.overrun_tokens,
                            "overrun_micro_usd": commit.overrun_micro_usd})
            else:
                await self._record_plan(call)
                if call.charge.streams:
                    reason = (FAILED if isinstance(outcome, Failed) and outcome.error != "Cancelled"
                              else CANCELLED)
                    await self.budgets.release(call.charge, reason, call.metadata)
        except Exception:
            log.exception("settling a call failed; the sweeper releases its reservation",
                          extra={"call_id": call.call_id})
            return False
        return True

    async def _record_plan(self, call: Call) -> None:
        """`CallPlanned`, for a call that got no answer (an answered call's plan is in
        its `LLMCallStarted`, appended by the provider anyway: no extra append on the
        hot path): the targets and nodes of the plan, each node's load as the selector
        saw it (what `GET /v1/calls/{id}/explain` shows)."""
        await self.store.append(llmcall_stream(call.call_id), [
            *call.call_events, planned_event(call.call_id, call.plan, self.fleet)],
            expected_version=None, metadata=call.metadata)

    async def _record_answer(self, call: Call, conversation: list, rider: Rider | None,
                             answer: tuple[Done, str]) -> list:
        """A call without a budget: the conversation and `rider`'s events, at once."""
        await append_joint(self.store, conversation, call.metadata, rider, answer)
        return []

    @staticmethod
    def _conversation(call: Call, outcome: Done) -> tuple[str, list, None]:
        return (conversation_stream(call.session.session_id), [
            MessageAppended(session_id=call.session.session_id, message_id=new_id(),
                            role="user", content=call.new_user_text, call_id=call.call_id),
            MessageAppended(session_id=call.session.session_id, message_id=new_id(),
                            role="assistant", content="".join(call.output),
                            call_id=call.call_id, model=outcome.model,
                            provider=outcome.provider, node=outcome.node,
                            input_tokens=outcome.usage.input_tokens,
                            output_tokens=outcome.usage.output_tokens,
                            cost_micro_usd=outcome.cost_micro_usd,
                            finish_reason=outcome.finish_reason),
        ], None)
