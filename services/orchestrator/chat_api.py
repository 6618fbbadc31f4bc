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
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.params import Parameter
from litestar.response import Stream

from shared.domain.budget import budget_stream_for_session, budget_stream_for_tenant, micro_to_usd, month_period
from shared.contracts.messages import ChatMessage
from shared.contracts.frames import Delta, Done, Failed
from services.orchestrator import idempotency as idem
from services.orchestrator.auth import require_admin, require_platform
from services.orchestrator.budget_manager import BudgetManager
from services.orchestrator.chat import ChatService, PreparedCall
from services.orchestrator.keys import Caller
from services.orchestrator.policies import PolicyService, rules_or_problem
from services.orchestrator.problems import Problem
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
_enc = msgspec.json.Encoder()


def _sse(obj: object) -> bytes:
    return b"data: " + _enc.encode(obj) + b"\n\n"


def _chunk(call: PreparedCall, created: int, delta: dict[str, Any],
           finish: str | None = None) -> dict[str, Any]:
    return {"id": f"chatcmpl-{call.call_id}", "object": "chat.completion.chunk", "created": created,
            "model": call.request.model, "choices": [{"index": 0, "delta": delta,
                                                      "finish_reason": finish}]}


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.usage.input_tokens, "completion_tokens": done.usage.output_tokens,
            "total_tokens": done.usage.input_tokens + done.usage.output_tokens}


def _failed_problem(failed: Failed) -> Problem:
    if failed.error == "PolicyDenied":
        return Problem(403, "policy-denied", failed.detail, rule=failed.rule)
    slug = {"UnknownModel": "unknown-model", "Cancelled": "cancelled"}.get(failed.error, "upstream-failed")
    status = failed.status if 400 <= failed.status < 600 else 502
    return Problem(status, slug, f"{failed.error}: {failed.detail}")


class _Tap:
    """The call's frames, passed through; remembers how the call ended."""

    def __init__(self, frames: AsyncIterator[Delta | Done | Failed]) -> None:
        self.frames = frames
        self.last: Delta | Done | Failed | None = None

    def __aiter__(self) -> _Tap:
        return self

    async def __anext__(self) -> Delta | Done | Failed:
        self.last = await anext(self.frames)
        return self.last

    async def aclose(self) -> None:
        await self.frames.aclose()  # type: ignore[attr-defined]

    def answered(self) -> bool:
        """Ended with a final answer (spent): an answer, or one the policy refused."""
        last = self.last
        return isinstance(last, Done) or (isinstance(last, Failed) and last.error == "PolicyDenied")


async def _first(frames: AsyncIterator[Delta | Done | Failed]) -> Delta | Done | Failed:
    async for frame in frames:
        return frame
    raise Problem(502, "upstream-failed", "the provider closed the stream without an answer")


def _headers(call: PreparedCall) -> dict[str, str]:
    return {"X-Nexus-Session": call.session.session_id, "X-Nexus-Call-Id": call.call_id}


async def _openai_stream(call: PreparedCall, frames: AsyncIterator[Delta | Done | Failed],
                         first: Delta | Done | Failed, include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    try:
        yield _sse(_chunk(call, created, {"role": "assistant", "content": ""}))
        frame = first
        while True:
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
                break
            else:
                yield _sse({"error": {"message": f"{frame.error}: {frame.detail}",
                                      "type": "upstream_error", "code": frame.error}})
                break
            frame = await anext(frames)
        yield b"data: [DONE]\n\n"
    finally:
        await frames.aclose()  # client gone or done: cancels the upstream, settles the budget


async def _collect(call: PreparedCall, frames: AsyncIterator[Delta | Done | Failed],
                   first: Delta | Done | Failed) -> tuple[Done, str, list[dict[str, Any]]]:
    tool_calls: list[dict[str, Any]] = []
    frame = first
    try:
        while True:
            if isinstance(frame, Delta):
                if frame.tool_calls:
                    tool_calls.extend(frame.tool_calls)
            elif isinstance(frame, Done):
                return frame, "".join(call.output), tool_calls
            else:
                raise _failed_problem(frame)
            frame = await anext(frames)
    finally:
        await frames.aclose()


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


def _message_out(row: Any) -> MessageOut:
    return MessageOut(
        message_id=row["message_id"], role=row["role"], content=row["content"],
        call_id=row["call_id"], model=row["model"], provider=row["provider"], node=row["node"],
        input_tokens=row["input_tokens"], output_tokens=row["output_tokens"],
        cost_usd=micro_to_usd(row["cost_micro_usd"]) if row["cost_micro_usd"] is not None else None,
        finish_reason=row["finish_reason"], created_at=row["created_at"])


class ChatController(Controller):
    @post("/v1/chat/completions", status_code=200, responses=idem.RESPONSES)
    async def chat_completions(self, request: Request, data: ChatCompletionIn, caller: Caller,
                               chat: ChatService, idempotency: idem.IdempotencyStore,
                               idempotency_key: idem.KeyHeader = None) -> Response | Stream:
        session_header = request.headers.get(SESSION_HEADER)
        return await idem.run_once(request, caller.tenant, idempotency,
                                   lambda: self._chat_completions(data, caller, chat, session_header),
                                   also=(session_header,))

    async def _chat_completions(self, data: ChatCompletionIn, caller: Caller,
                                chat: ChatService, session_header: str | None) -> idem.Recorded:
        session = await chat.session_for(caller, session_header)
        messages = tuple(ChatMessage(**msgspec.structs.asdict(m)) for m in data.messages)
        last_user = next((m for m in reversed(messages) if m.role == "user"), messages[-1])
        stop = (data.stop,) if isinstance(data.stop, str) else tuple(data.stop) if data.stop else None
        call = await chat.prepare(
            caller, session, model=data.model, messages=messages,
            new_user_text=last_user.text,
            max_tokens=data.max_completion_tokens or data.max_tokens, temperature=data.temperature,
            top_p=data.top_p, stop=stop,
            tools=[msgspec.to_builtins(t) for t in data.tools] if data.tools else None,
            tool_choice=data.tool_choice)
        frames = _Tap(chat.execute(call))
        first = await _first(frames)
        if isinstance(first, Failed):
            await frames.aclose()
            raise _failed_problem(first)
        if data.stream:
            include = bool(data.stream_options and data.stream_options.include_usage)
            return idem.Recorded(200, {**_headers(call), "Cache-Control": "no-cache"},
                                 "text/event-stream",
                                 chunks=_openai_stream(call, frames, first, include),
                                 final=frames.answered)
        done, text, tool_deltas = await _collect(call, frames, first)
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_deltas:
            message["tool_calls"] = _merge_tool_calls(tool_deltas)
        body = {"id": f"chatcmpl-{call.call_id}", "object": "chat.completion",
                "created": int(time.time()), "model": data.model,
                "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason}],
                "usage": _usage(done)}
        return idem.Recorded.json(body, headers=_headers(call))

    @get("/v1/models")
    async def list_models(self, caller: Caller, chat: ChatService) -> dict[str, Any]:
        models = await chat.models()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "nexus",
             "targets": list(info.targets), "context": info.context} for name, info in sorted(models.items())]}

    @post("/v1/sessions/{session_id:str}/messages", status_code=200, responses=idem.RESPONSES)
    async def post_message(self, request: Request, session_id: str, data: SessionMessageIn,
                           caller: Caller, chat: ChatService,
                           idempotency: idem.IdempotencyStore,
                           idempotency_key: idem.KeyHeader = None) -> Response | Stream:
        return await idem.run_once(request, caller.tenant, idempotency,
                                   lambda: self._post_message(session_id, data, caller, chat))

    async def _post_message(self, session_id: str, data: SessionMessageIn, caller: Caller,
                            chat: ChatService) -> idem.Recorded:
        session = await chat.session_for(caller, session_id)
        messages = (*await chat.history(session_id), ChatMessage(role="user", content=data.content))
        call = await chat.prepare(caller, session, model=data.model, messages=messages,
                                  new_user_text=data.content, max_tokens=data.max_tokens,
                                  temperature=data.temperature, top_p=None, stop=None, tools=None,
                                  tool_choice=None)
        frames = _Tap(chat.execute(call))
        first = await _first(frames)
        if isinstance(first, Failed):
            await frames.aclose()
            raise _failed_problem(first)
        if data.stream:
            return idem.Recorded(200, {**_headers(call), "Cache-Control": "no-cache"},
                                 "text/event-stream", chunks=_session_stream(call, frames, first),
                                 final=frames.answered)
        done, text, _ = await _collect(call, frames, first)
        return idem.Recorded.json(SessionReply(session_id=session_id, call_id=call.call_id, message=MessageOut(
            message_id=call.call_id, role="assistant", content=text, call_id=call.call_id,
            model=done.model, provider=done.provider, node=done.node,
            input_tokens=done.usage.input_tokens, output_tokens=done.usage.output_tokens,
            cost_usd=micro_to_usd(done.cost_micro_usd), finish_reason=done.finish_reason,
            created_at=datetime.now().astimezone())), headers=_headers(call))

    @get("/v1/sessions/{session_id:str}/messages")
    async def get_messages(self, session_id: str, caller: Caller, sessions: SessionService,
                           chat: ChatService) -> MessageList:
        await sessions.require(caller, session_id)
        rows = await chat.store.pool.fetch(
            "SELECT * FROM messages WHERE session_id = $1 ORDER BY position", session_id)
        return MessageList(messages=tuple(_message_out(r) for r in rows))

    @get("/v1/sessions/{session_id:str}/budget")
    async def get_budget(self, session_id: str, caller: Caller, sessions: SessionService,
                         budgets: BudgetManager,
                         at: Annotated[str | None, Parameter(description="ISO timestamp or a global position")] = None) -> SessionBudgets:
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

        return await idem.run_once(request, caller.tenant, idempotency, run)  # type: ignore[return-value]

    @get("/v1/policies")
    async def list_policies(self, caller: Caller, policies: PolicyService) -> list[PolicyOut]:
        rows = await policies.store.pool.fetch(
            "SELECT name, version, rules::text AS rules FROM policies WHERE tenant = $1 ORDER BY name",
            caller.tenant)
        return [PolicyOut(name=r["name"], version=r["version"], rules=msgspec.json.decode(r["rules"]))
                for r in rows]


async def _session_stream(call: PreparedCall, frames: AsyncIterator[Delta | Done | Failed],
                          first: Delta | Done | Failed) -> AsyncIterator[bytes]:
    """Session chat as SSE: `token` events, then `done` (usage, cost) or `error`."""
    frame = first
    try:
        while True:
            if isinstance(frame, Delta):
                if frame.content:
                    yield b"event: token\n" + _sse({"content": frame.content})
            elif isinstance(frame, Done):
                yield b"event: done\n" + _sse({
                    "call_id": call.call_id, "model": frame.model, "provider": frame.provider,
                    "finish_reason": frame.finish_reason, "usage": _usage(frame),
                    "cost_usd": micro_to_usd(frame.cost_micro_usd)})
                return
            else:
                yield b"event: error\n" + _sse({"error": frame.error, "detail": frame.detail})
                return
            frame = await anext(frames)
    finally:
        await frames.aclose()


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
    return await budgets.store.pool.fetchval(
        "SELECT coalesce(max(position), 0) FROM events WHERE recorded_at <= $1", moment)


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
        overruns=state.overruns, version=state.version, as_of_position=position)
