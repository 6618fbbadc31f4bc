"""One LLM call as the orchestrator runs it.

prepare: session -> model -> policy (`PolicyEvaluated`) -> rate limits -> budget
reservation (`BudgetReserved` on every budget the call is charged to);
execute: stream frames from a provider over NATS; then commit the actual cost (or
release on failure/cancellation) and append the conversation (`MessageAppended`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from dataclasses import dataclass, field

from shared.contracts import subjects
from shared.domain.budget import FAILED, CANCELLED, prompt_token_bound
from shared.contracts.events import (
    DroppedTarget,
    Metadata,
    MessageAppended,
    PolicyEvaluated,
    conversation_stream,
    llmcall_stream,
)
from shared.infra.eventstore import EventStore
from shared.contracts.messages import (
    ChatMessage,
    CompletionRequest,
    ModelInfo,
    ModelsReply,
    ModelsRequest,
    PlannedTarget,
    messages_text,
)
from shared.infra.messaging import Bus, MessagingError
from shared.domain.policy import ChatRequestFacts, CompiledPolicy, TargetFacts, redact_kinds
from shared.infra.metrics import ControlMetrics
from shared.domain.selection import NoEligibleNode, NodeSelector
from shared.contracts.frames import Delta, Done, Failed
from shared.infra.streaming import StreamReceiver
from services.orchestrator.budget_manager import BudgetDenied, BudgetManager, Charge
from services.orchestrator.keys import Caller
from services.orchestrator.policies import PolicyService
from services.orchestrator.problems import Problem
from services.orchestrator.ratelimits import RateCounter
from services.orchestrator.schemas import SessionCreate, SessionView
from services.orchestrator.sessions import SessionService

log = logging.getLogger("nexus.orchestrator.chat")

DEFAULT_MAX_TOKENS = 1024
MODELS_TTL_S = 10.0
# A policy scans a text longer than this in a worker thread: RE2 releases the GIL while
# it scans, so a large input never holds up the event loop (and every other request).
SCAN_OFF_LOOP_CHARS = 32_768
_scanner = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="policy-scan")


async def policy_scan(policy: CompiledPolicy, text: str, evaluate, *args):
    """`evaluate(*args)`, which scans `text`; off the event loop when that is long."""
    if policy.has_content_rules and len(text) > SCAN_OFF_LOOP_CHARS:
        return await asyncio.get_running_loop().run_in_executor(
            _scanner, functools.partial(evaluate, *args))
    return evaluate(*args)


def target_facts(info: ModelInfo) -> tuple[TargetFacts, ...]:
    """Every target the model's fallback chain can reach, as the policy sees it."""
    if info.target_info:
        return tuple(TargetFacts(name=t.name, provider=t.provider, model=t.model, hosted=t.hosted)
                     for t in info.target_info)
    # a provider that sent no details: names only, each taken as hosted (redaction applies)
    return tuple(TargetFacts(name=name, provider=name.split("/", 1)[0],
                             model=name.split("/", 1)[-1]) for name in info.targets)


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


@dataclass
class PreparedCall:
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
    output: list[str] = field(default_factory=list)
    output_denied: bool = False


class ChatService:
    def __init__(self, store: EventStore, bus: Bus, sessions: SessionService,
                 budgets: BudgetManager, policies: PolicyService, rates: RateCounter,
                 selector: NodeSelector, *, request_timeout_s: float) -> None:
        self.selector = selector
        self.metrics = ControlMetrics()
        self.store = store
        self.bus = bus
        self.sessions = sessions
        self.budgets = budgets
        self.policies = policies
        self.rates = rates
        self.request_timeout_s = request_timeout_s
        self._models: tuple[float, dict[str, ModelInfo]] = (0.0, {})

    # -- models ---------------------------------------------------------------------

    async def models(self) -> dict[str, ModelInfo]:
        fetched_at, models = self._models
        if time.monotonic() - fetched_at > MODELS_TTL_S or not models:
            try:
                reply = await self.bus.request(subjects.PROVIDER_MODELS, ModelsRequest(),
                                               ModelsReply, timeout=self.request_timeout_s)
            except MessagingError as exc:
                if models:
                    return models
                raise Problem(503, "provider-unavailable", f"no provider answered: {exc}") from None
            models = {m.name: m for m in reply.models}
            self._models = (time.monotonic(), models)
        return models

    # -- sessions -------------------------------------------------------------------

    async def session_for(self, caller: Caller, session_id: str | None) -> SessionView:
        """The named session (open, of this tenant), or the caller key's default session."""
        if session_id is None:
            default = await self.sessions.start(
                caller, SessionCreate(metadata={"default_for_key": caller.key_id}),
                idempotency_key=f"default-session:{caller.key_id}", request_hash=None)
            return default
        view = await self.sessions.require(caller, session_id)
        if view.status != "open":
            raise Problem(409, "session-closed", f"session {session_id!r} is closed")
        return view

    async def history(self, session_id: str) -> tuple[ChatMessage, ...]:
        rows = await self.store.pool.fetch(
            "SELECT role, content FROM messages WHERE session_id = $1 ORDER BY position", session_id)
        return tuple(ChatMessage(role=r["role"], content=r["content"]) for r in rows)

    # -- prepare --------------------------------------------------------------------

    async def prepare(self, caller: Caller, session: SessionView, *, model: str,
                      messages: tuple[ChatMessage, ...], new_user_text: str,
                      max_tokens: int | None, temperature: float | None, top_p: float | None,
                      stop: tuple[str, ...] | None, tools: list[dict] | None,
                      tool_choice: object) -> PreparedCall:
        models = await self.models()
        info = models.get(model)
        if info is None:
            raise Problem(404, "unknown-model", f"model {model!r} is not served here; "
                          f"known: {', '.join(sorted(models)) or 'none'}",
                          errors=[{"field": "model", "message": "unknown model"}])
        prompt_tokens = estimate_prompt_tokens(messages)
        if max_tokens is not None and max_tokens + prompt_tokens > info.context:
            raise Problem(400, "validation",
                          f"max_tokens: {max_tokens} plus the prompt (~{prompt_tokens} tokens) "
                          f"exceeds the context of {model!r} ({info.context} tokens)",
                          errors=[{"field": "max_tokens", "message": "exceeds the model's context"}])
        call_id = str(uuid.uuid4())
        metadata = Metadata(tenant=caller.tenant, actor=caller.actor, correlation_id=session.session_id,
                            causation_id=call_id)
        policy, label = await self.policies.compiled(caller.tenant, session.policy,
                                                     session.policy_version, session.policy_rules)
        rate_subjects: dict[str, str] = {}
        redact: tuple[str, ...] = ()
        planned: tuple[PlannedTarget, ...] = ()
        if policy is not None:
            scopes = {"tenant": caller.tenant, "key": caller.key_id, "session": session.session_id}
            rate_subjects = {s: scopes[s] for s in policy.rate_scopes}
            # every target of the chain is evaluated (each with its own hosted flag)
            facts = ChatRequestFacts(
                model=model, targets=target_facts(info), max_tokens=max_tokens,
                input_text=messages_text(messages),
                tools=tuple(t.get("function", {}).get("name", "") for t in tools or ()))
            decision = await policy_scan(policy, facts.input_text, policy.evaluate_chat, facts,
                                         await self.rates.usage(rate_subjects))
            if decision.allowed:
                for scope, subject in rate_subjects.items():
                    limits = getattr(policy.rules, f"rate_per_{scope}")
                    if not await self.rates.admit(scope, subject, limits.calls_per_minute if limits else None):
                        decision = type(decision)(
                            allowed=False, rule=f"rate.calls_per_minute.{scope}", scope=scope,
                            reason=f"{scope} rate limit reached: {limits.calls_per_minute} calls per minute")
                        break
            self.metrics.policy.add(1, {"rule": decision.rule,
                                        "allowed": str(decision.allowed).lower()})
            evaluated = PolicyEvaluated(
                session_id=session.session_id, call_id=call_id, action="chat",
                allowed=decision.allowed, rule=decision.rule, reason=decision.reason,
                policy=label, scope=decision.scope,
                targets=tuple(t.target for t in decision.allowed_targets),
                dropped=tuple(DroppedTarget(target=t.target, rule=t.rule, reason=t.reason)
                              for t in decision.dropped_targets))
            if not decision.allowed:
                await self.store.append(llmcall_stream(call_id), [evaluated],
                                        expected_version=None, metadata=metadata)
                status = 429 if decision.rule.startswith("rate.") else 403
                raise Problem(status, "policy-denied", decision.reason, rule=decision.rule,
                              policy=label)
            redact = tuple(decision.redact)
            # the provider tries only these, each redacted as its own hosted flag says
            planned = tuple(PlannedTarget(name=t.target, redact=t.redact)
                            for t in decision.allowed_targets)
            if max_tokens is None and decision.max_tokens is not None:
                max_tokens = decision.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, info.context - prompt_tokens))
        prompt_bound = reserved_prompt_tokens(messages, tools, redact)
        worst_tokens = prompt_bound + max_tokens
        worst_cost = math.ceil(prompt_bound * info.input_usd_per_mtok
                               + max_tokens * info.output_usd_per_mtok)
        charge = await self.budgets.charge_for(call_id, caller.tenant, session.session_id)
        policy_events = ((llmcall_stream(call_id), [evaluated]),) if policy is not None else ()
        if not charge.streams and policy_events:
            await self.store.append(llmcall_stream(call_id), [evaluated], expected_version=None,
                                    metadata=metadata)
        if charge.streams:
            try:  # the policy verdict commits with the reservation (one transaction)
                await self.budgets.reserve(charge, worst_cost, worst_tokens, metadata,
                                           with_events=policy_events)
            except BudgetDenied as exc:
                self.metrics.budget_denials.add(1, {"budget": exc.budget})
                raise Problem(402, "budget-exceeded", exc.reason, budget=exc.budget) from None
        nodes = self.choose_nodes(info)
        request = CompletionRequest(
            call_id=call_id, session_id=session.session_id, tenant=caller.tenant, model=model,
            messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop=stop, tools=tools, tool_choice=tool_choice, redact=redact, nodes=nodes,
            targets=planned)
        return PreparedCall(call_id, caller, session, info, request, charge, metadata, new_user_text,
                            rate_subjects, policy, label)

    def choose_nodes(self, info: ModelInfo) -> dict[str, tuple[str, ...]]:
        """Where node-served models of the route run: the selector's pick, then a spare."""
        chosen: dict[str, tuple[str, ...]] = {}
        for model in info.node_models:
            picks: list[str] = []
            for _ in range(2):
                try:
                    node = self.selector.select(model=model).node_id
                except NoEligibleNode:
                    break
                if node not in picks:
                    picks.append(node)
            chosen[model] = tuple(picks)
        return chosen

    # -- execute --------------------------------------------------------------------

    async def execute(self, call: PreparedCall) -> AsyncIterator[Delta | Done | Failed]:
        """Frames of the call; settles budget and conversation however the stream ends.

        A provider that vanishes before the first token (killed, partitioned) is not the
        client's problem: the request goes once more to the queue, i.e. to another
        provider instance. After the first token a lost provider ends the stream with a
        clear failure.
        """
        outcome: Done | Failed | None = None
        try:
            for attempt in (1, 2):
                sent_any = False
                try:
                    async with StreamReceiver(self.bus, subjects.PROVIDER_COMPLETE, call.request,
                                              first_frame_timeout_s=self.request_timeout_s) as stream:
                        async for frame in stream.frames():
                            if isinstance(frame, Delta):
                                call.output.append(frame.content)
                                sent_any = True
                            else:
                                outcome = frame
                                if isinstance(frame, Done):
                                    denied = await self._check_output(call)
                                    if denied is not None:
                                        yield denied
                                        continue
                            yield frame
                    break
                except MessagingError as exc:
                    if not sent_any and attempt == 1:
                        log.warning("provider lost before the first token; retrying once",
                                    extra={"call_id": call.call_id, "error": str(exc)})
                        continue
                    outcome = Failed(error="ProviderUnavailable", detail=str(exc), status=503,
                                     after_first_token=sent_any)
                    yield outcome
        finally:
            await asyncio.shield(self._settle(call, outcome))

    async def _check_output(self, call: PreparedCall) -> Failed | None:
        """`content.deny_output` of the session's policy, on the whole answer."""
        if call.policy is None or not call.policy.rules.content.deny_output:
            return None
        text = "".join(call.output)
        decision = await policy_scan(call.policy, text, call.policy.check_output, text)
        await self.store.append(llmcall_stream(call.call_id), [PolicyEvaluated(
            session_id=call.session.session_id, call_id=call.call_id, action="output",
            allowed=decision.allowed, rule=decision.rule, reason=decision.reason,
            policy=call.policy_label)], expected_version=None, metadata=call.metadata)
        self.metrics.policy.add(1, {"rule": decision.rule, "allowed": str(decision.allowed).lower()})
        if decision.allowed:
            return None
        call.output_denied = True  # the cost is spent (committed), the answer not kept
        return Failed(error="PolicyDenied", detail=decision.reason, status=403,
                      after_first_token=True, rule=decision.rule)

    async def _settle(self, call: PreparedCall, outcome: Done | Failed | None) -> None:
        try:
            if isinstance(outcome, Done):
                tokens = outcome.usage.input_tokens + outcome.usage.output_tokens
                if call.charge.streams:
                    self.metrics.budget_committed.add(outcome.cost_micro_usd / 1e6)
                # independent writes: commit, token counters and the conversation together
                commits, *_ = await asyncio.gather(
                    self.budgets.commit(call.charge, outcome.cost_micro_usd, tokens, call.metadata)
                    if call.charge.streams else asyncio.sleep(0, []),
                    self.rates.add_tokens(call.rate_subjects, tokens),
                    self._record_conversation(call, outcome) if not call.output_denied
                    else asyncio.sleep(0))
                for commit in commits:
                    if commit.overrun_micro_usd or commit.overrun_tokens:
                        scope = "session" if commit.budget_id.startswith("budget-session-") else "tenant"
                        self.metrics.budget_overruns.add(1, {"budget": scope})
                        self.metrics.budget_overrun_tokens.add(commit.overrun_tokens, {"budget": scope})
                        log.warning("a call cost more than it reserved", extra={
                            "call_id": call.call_id, "budget": commit.budget_id,
                            "overrun_tokens": commit.overrun_tokens,
                            "overrun_micro_usd": commit.overrun_micro_usd})
            elif call.charge.streams:
                reason = FAILED if isinstance(outcome, Failed) and outcome.error != "Cancelled" else CANCELLED
                await self.budgets.release(call.charge, reason, call.metadata)
        except Exception:
            log.exception("settling a call failed; the sweeper releases its reservation",
                          extra={"call_id": call.call_id})

    async def _record_conversation(self, call: PreparedCall, outcome: Done) -> None:
        await self.store.append(conversation_stream(call.session.session_id), [
            MessageAppended(session_id=call.session.session_id, message_id=str(uuid.uuid4()),
                            role="user", content=call.new_user_text, call_id=call.call_id),
            MessageAppended(session_id=call.session.session_id, message_id=str(uuid.uuid4()),
                            role="assistant", content="".join(call.output),
                            call_id=call.call_id, model=outcome.model,
                            provider=outcome.provider, node=outcome.node,
                            input_tokens=outcome.usage.input_tokens,
                            output_tokens=outcome.usage.output_tokens,
                            cost_micro_usd=outcome.cost_micro_usd,
                            finish_reason=outcome.finish_reason),
        ], expected_version=None, metadata=call.metadata)
