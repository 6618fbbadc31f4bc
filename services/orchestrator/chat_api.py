"""The LLM path over HTTP: OpenAI-compatible `/v1/chat/completions` and `/v1/models`,
session messages, budgets (with time travel) and policies.

A chat request belongs to a session: `X-Nexus-Session: <id>`, or without it the
caller key's default session. Streaming answers are `text/event-stream` in the OpenAI
chunk format; the response starts only when the first frame arrives, so a failure
before the first token (all fallbacks exhausted, overload, denial) is still a proper
HTTP problem; a failure after it is an SSE chunk with an `error` object, then `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.params import Parameter
from litestar.response import Stream

from shared.domain.budget import budget_stream_for_session, budget_stream_for_tenant, micro_to_usd, month_period
from shared.contracts.errors import NexusError
from shared.contracts.messages import ChatMessage
from shared.contracts.frames import Delta, Done
from services.orchestrator import idempotency as idem
from services.orchestrator.auth import require_admin, require_platform
from services.orchestrator.budget_manager import BudgetManager
from services.orchestrator.calls import CallInput, CallLifecycle, OpenCall
from services.orchestrator.keys import Caller
from services.orchestrator.policies import PolicyService, rules_or_problem
from services.orchestrator.problems import Problem, problem_for
from services.orchestrator.schemas import (
    BudgetOut,
    ChatCompletionIn,
    MessageList,
    MessageOut,
    PolicyIn,
    PolicyOut,
    SessionBudgets,
    SessionMessageIn,
    SessionReply,
    TenantBudgetIn,
)
from services.orchestrator.sessions import SessionService

SESSION_HEADER = "x-nexus-session"
AT_PATTERN = (r"^([0-9]{1,18}|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}"
              r"(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2}))$")
_enc = msgspec.json.Encoder()
T = TypeVar("T")


def _sse(obj: object) -> bytes:
    return b"data: " + _enc.encode(obj) + b"\n\n"


def _chunk(call: OpenCall, created: int, delta: dict[str, Any],
           finish: str | None = None) -> dict[str, Any]:
    return {"id": f"chatcmpl-{call.call_id}", "object": "chat.completion.chunk", "created": created,
            "model": call.call.request.model, "choices": [{"index": 0, "delta": delta,
                                                           "finish_reason": finish}]}


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.usage.input_tokens, "completion_tokens": done.usage.output_tokens,
            "total_tokens": done.usage.input_tokens + done.usage.output_tokens}


def _headers(call: OpenCall) -> dict[str, str]:
    return {"X-Nexus-Session": call.session_id, "X-Nexus-Call-Id": call.call_id}


async def _at_edge(work: Awaitable[T]) -> T:
    """The use case's domain errors as problems (inside `run_once`, which records a
    final refusal for the retries)."""
    try:
        return await work
    except NexusError as exc:
        raise problem_for(exc) from None


async def _answer(calls: CallLifecycle, caller: Caller, call_input: CallInput,
                  as_stream: Callable[[OpenCall], AsyncIterator[bytes]],
                  as_body: Callable[[OpenCall, Done, str, list[dict[str, Any]]], Any]
                  ) -> idem.Recorded:
    """The tail both chat endpoints share: run the call, answer as a stream or a body."""
    call = await calls.open(caller, call_input)
    if call_input.stream:
        return idem.Recorded(200, {**_headers(call), "Cache-Control": "no-cache"},
                             "text/event-stream", chunks=as_stream(call), final=call.answered)
    # the answer is made while its record commits; it leaves once that is done
    return idem.Recorded.json(as_body(call, *await call.collect(behind=True)),
                              headers=_headers(call), ready=lambda: _at_edge(call.recorded()))


async def _openai_stream(call: OpenCall, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI chunks; a failure after the first token is a chunk with an `error` object."""
    created = int(time.time())
    try:
        yield _sse(_chunk(call, created, {"role": "assistant", "content": ""}))
        async for frame in call.frames():
            if isinstance(frame, Delta):
                delta: dict[str, Any] = {}
                if frame.content:
                    delta["content"] = frame.content
                if frame.tool_calls:
                    delta["tool_calls"] = frame.tool_calls
                yield _sse(_chunk(call, created, delta))
            elif isinstance(frame, Done):
                yield _sse(_chunk(call, created, {}, frame.finish_reason))
                if include_usage:
                    yield _sse({**_chunk(call, created, {}), "choices": [], "usage": _usage(frame)})
            else:
                yield _sse({"error": {"message": f"{frame.error}: {frame.detail}",
                                      "type": "upstream_error", "code": frame.error}})
        yield b"data: [DONE]\n\n"
    finally:
        await call.aclose()  # client gone or done: cancels the upstream, settles the budget


async def _session_stream(call: OpenCall) -> AsyncIterator[bytes]:
    """Session chat as SSE: `token` events, then `done` (usage, cost) or `error`."""
    try:
        async for frame in call.frames():
            if isinstance(frame, Delta):
                if frame.content:
                    yield b"event: token\n" + _sse({"content": frame.content})
            elif isinstance(frame, Done):
                yield b"event: done\n" + _sse({
                    "call_id": call.call_id, "model": frame.model, "provider": frame.provider,
                    "finish_reason": frame.finish_reason, "usage": _usage(frame),
                    "cost_usd": micro_to_usd(frame.cost_micro_usd)})
            else:
                yield b"event: error\n" + _sse({"error": frame.error, "detail": frame.detail})
    finally:
        await call.aclose()


def _merge_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI streams tool calls in pieces keyed by index; join them into whole calls."""
    merged: dict[int, dict[str, Any]] = {}
    for d in deltas:
        entry = merged.setdefault(d.get("index", 0), {"id": None, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
        entry["id"] = d.get("id") or entry["id"]
        fn = d.get("function") or {}
        entry["function"]["name"] += fn.get("name") or ""
        entry["function"]["arguments"] += fn.get("arguments") or ""
    return [merged[i] for i in sorted(merged)]


def openai_input(data: ChatCompletionIn, session_id: str | None) -> CallInput:
    """An OpenAI chat-completions body as a call."""
    stop = (data.stop,) if isinstance(data.stop, str) else tuple(data.stop) if data.stop else None
    return CallInput(
        session_id=session_id, model=data.model,
        messages=tuple(ChatMessage(**msgspec.structs.asdict(m)) for m in data.messages),
        max_tokens=data.max_completion_tokens or data.max_tokens, temperature=data.temperature,
        top_p=data.top_p, stop=stop,
        tools=[msgspec.to_builtins(t) for t in data.tools] if data.tools else None,
        tool_choice=data.tool_choice, stream=data.stream)


def _openai_body(model: str) -> Callable[[OpenCall, Done, str, list[dict[str, Any]]], Any]:
    def body(call: OpenCall, done: Done, text: str, tool_deltas: list[dict[str, Any]]) -> Any:
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_deltas:
            message["tool_calls"] = _merge_tool_calls(tool_deltas)
        return {"id": f"chatcmpl-{call.call_id}", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason}],
                "usage": _usage(done)}

    return body


def _session_body(call: OpenCall, done: Done, text: str, _: list[dict[str, Any]]) -> SessionReply:
    return SessionReply(session_id=call.session_id, call_id=call.call_id, message=MessageOut(
        message_id=call.call_id, role="assistant", content=text, call_id=call.call_id,
        model=done.model, provider=done.provider, node=done.node,
        input_tokens=done.usage.input_tokens, output_tokens=done.usage.output_tokens,
        cost_usd=micro_to_usd(done.cost_micro_usd), finish_reason=done.finish_reason,
        created_at=datetime.now().astimezone()))


def _call_context(request: Request) -> tuple[Caller, CallLifecycle, idem.IdempotencyStore]:
    """What the LLM call routes take, read from the request (its authenticated caller)
    and the application's state rather than resolved as dependencies: Litestar resolving
    these three plain providers cost 6% of the orchestrator's CPU per chat call at 64
    clients (issue 16, round 12, docs/performance.md). The same objects either way."""
    state = request.app.state
    return request.user, state.calls, state.idempotency


class ChatController(Controller):
    @post("/v1/chat/completions", status_code=200, responses=idem.RESPONSES)
    async def chat_completions(self, request: Request, data: ChatCompletionIn,
                               idempotency_key: idem.KeyHeader = None) -> Response | Stream:
        caller, calls, idempotency = _call_context(request)
        session_id = request.headers.get(SESSION_HEADER)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        return await idem.run_once(request, caller.tenant, idempotency, lambda: _at_edge(_answer(
            calls, caller, openai_input(data, session_id),
            lambda call: _openai_stream(call, include_usage), _openai_body(data.model))),
            also=(session_id,))

    @get("/v1/models")
    async def list_models(self, caller: Caller, calls: CallLifecycle) -> dict[str, Any]:
        models = await calls.models()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "nexus",
             "targets": list(info.targets), "context": info.context} for name, info in sorted(models.items())]}

    @post("/v1/sessions/{session_id:str}/messages", status_code=200, responses=idem.RESPONSES)
    async def post_message(self, request: Request, session_id: str, data: SessionMessageIn,
                           idempotency_key: idem.KeyHeader = None) -> Response | Stream:
        caller, calls, idempotency = _call_context(request)
        call_input = CallInput(session_id=session_id, model=data.model, with_history=True,
                               messages=(ChatMessage(role="user", content=data.content),),
                               max_tokens=data.max_tokens, temperature=data.temperature,
                               stream=data.stream)
        return await idem.run_once(request, caller.tenant, idempotency, lambda: _at_edge(_answer(
            calls, caller, call_input, _session_stream, _session_body)))

    @get("/v1/sessions/{session_id:str}/messages")
    async def get_messages(self, session_id: str, caller: Caller, calls: CallLifecycle) -> MessageList:
        return MessageList(messages=await calls.conversation(caller, session_id))

    @get("/v1/sessions/{session_id:str}/budget")
    async def get_budget(self, session_id: str, caller: Caller, sessions: SessionService,
                         budgets: BudgetManager,
                         at: Annotated[str | None, Parameter(
                             description="ISO timestamp with a time zone, or a global position",
                             pattern=AT_PATTERN)] = None) -> SessionBudgets:
        await sessions.require(caller, session_id)
        position = await _position_at(budgets, at)
        session = await budgets.state(budget_stream_for_session(session_id), to_position=position)
        tenant_stream = budget_stream_for_tenant(caller.tenant, month_period(time.time()))
        tenant = await budgets.state(tenant_stream, to_position=position)
        return SessionBudgets(session=_budget_out(session, position),
                              tenant=_budget_out(tenant, position))

    @put("/v1/tenants/{tenant:str}/budget", status_code=200, responses=idem.RESPONSES)
    async def set_tenant_budget(self, request: Request, tenant: str, data: TenantBudgetIn,
                                caller: Caller, budgets: BudgetManager,
                                idempotency: idem.IdempotencyStore,
                                idempotency_key: idem.KeyHeader = None) -> Response[dict[str, Any]]:
        require_platform(caller)
        from shared.domain.budget import usd_to_micro
        from shared.contracts.events import Metadata

        async def run() -> idem.Recorded:
            await budgets.set_tenant_budget(
                tenant, usd_to_micro(data.limit_usd) if data.limit_usd is not None else None,
                data.limit_tokens, Metadata(tenant=tenant, actor=caller.actor))
            return idem.Recorded.json({"tenant": tenant, "limit_usd": data.limit_usd,
                                       "limit_tokens": data.limit_tokens})

        return await idem.run_once(request, caller.tenant, idempotency, run)  # type: ignore[return-value]

    @post("/v1/policies", status_code=201, responses=idem.RESPONSES)
    async def define_policy(self, request: Request, data: PolicyIn, caller: Caller,
                            policies: PolicyService, idempotency: idem.IdempotencyStore,
                            idempotency_key: idem.KeyHeader = None) -> Response[PolicyOut]:
        require_admin(caller)

        async def run() -> idem.Recorded:
            rules = rules_or_problem(data.rules)
            version = await policies.define(caller, data.name, rules)
            return idem.Recorded.json(PolicyOut(name=data.name, version=version,
                                                rules=msgspec.to_builtins(rules)), status=201)

        return await idem.run_once(request, caller.tenant, idempotency,  # type: ignore[return-value]
                                   lambda: _at_edge(run()))

    @get("/v1/policies")
    async def list_policies(self, caller: Caller, policies: PolicyService) -> list[PolicyOut]:
        return await policies.of_tenant(caller.tenant)


async def _position_at(budgets: BudgetManager, at: str | None) -> int | None:
    if at is None:
        return None
    if at.isdigit():
        return int(at)
    try:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise Problem(400, "validation", "at: expected an ISO timestamp or a position",
                      errors=[{"field": "at", "message": "not a timestamp or position"}]) from None
    if moment.tzinfo is None:
        raise Problem(400, "validation", "at: the timestamp needs a time zone (e.g. Z)",
                      errors=[{"field": "at", "message": "no time zone"}])
    return await budgets.store.position_at(moment)


def _budget_out(state, position: int | None) -> BudgetOut | None:
    if state is None:
        return None
    usd = lambda v: micro_to_usd(v) if v is not None else None  # noqa: E731
    return BudgetOut(
        budget_id=state.budget_id, scope=state.scope, limit_usd=usd(state.limit_micro_usd),
        limit_tokens=state.limit_tokens, reserved_usd=micro_to_usd(state.reserved_micro_usd),
        reserved_tokens=state.reserved_tokens, committed_usd=micro_to_usd(state.committed_micro_usd),
        committed_tokens=state.committed_tokens, remaining_usd=usd(state.remaining_micro_usd),
        remaining_tokens=state.remaining_tokens, open_reservations=len(state.reservations),
        overrun_usd=micro_to_usd(state.overrun_micro_usd), overrun_tokens=state.overrun_tokens,
        overruns=state.overruns, leased_usd=micro_to_usd(state.leased_micro_usd),
        leased_tokens=state.leased_tokens, open_leases=len(state.leases),
        version=state.version, as_of_position=position)
