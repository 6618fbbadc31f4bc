"""Session management: start, list, read, close; the session's audit log."""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec

from shared.contracts.events import (
    BudgetLimits,
    Metadata,
    SessionClosed,
    SessionStarted,
    new_id,
    session_stream,
)
from shared.infra.eventstore import EventStore, ProjectionRunner, StoredEvent, WrongExpectedVersion
from shared.infra.tracing import current_ids
from shared.domain.budget import SESSION, budget_stream_for_session, decide_open, usd_to_micro
from services.orchestrator import idempotency
from services.orchestrator.policies import PolicyService, rules_or_problem
from services.orchestrator.keys import Caller
from services.orchestrator.problems import Problem
from services.orchestrator.read_models.sessions import SessionsReadModel
from services.orchestrator.schemas import (
    AuditEvent,
    AuditLog,
    BudgetView,
    SessionCreate,
    SessionList,
    SessionView,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
OPEN_SESSIONS_KEPT = 10_000  # open sessions' views a process keeps for the call path


def _audit_event(e: StoredEvent) -> AuditEvent:
    return AuditEvent(position=e.position, type=e.type, stream_id=e.stream_id,
                      recorded_at=e.recorded_at, trace_id=e.trace_id, data=e.data)


def _cursor(created_at: datetime, session_id: str) -> str:
    """`<microseconds since the epoch>.<session id>`: the OpenAPI pattern `CURSOR` says
    exactly which strings are cursors, and every one of them reads."""
    delta = created_at - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return f"{micros}.{session_id}"


def _uncursor(cursor: str) -> tuple[datetime, str]:
    micros, _, session_id = cursor.partition(".")  # the pattern was checked at the edge
    return _EPOCH + timedelta(microseconds=int(micros)), session_id


class SessionService:
    def __init__(self, store: EventStore, runner: ProjectionRunner, policies: PolicyService) -> None:
        self.store = store
        self.runner = runner
        self.policies = policies
        self.read_model = SessionsReadModel(store)
        # AgentService (set by the app): `start` pins the version of the agent it names
        self.agents: Any = None
        # open sessions this process has served, least recently used out: the call path
        # takes them from here and fences its admission on the session stream's version
        # (calls.py), so a session closed by any process is never served from here
        self._open: OrderedDict[str, SessionView] = OrderedDict()

    def cached_open(self, caller: Caller, session_id: str) -> SessionView | None:
        """An open session of the caller's tenant as this process last saw it, or None.
        Only for a use that checks it is still at `view.version` when it commits."""
        view = self._open.get(session_id)
        if view is None or view.tenant != caller.tenant:
            return None
        self._open.move_to_end(session_id)
        return view

    def remember_open(self, view: SessionView) -> None:
        if view.status != "open":
            return
        self._open[view.session_id] = view
        self._open.move_to_end(view.session_id)
        while len(self._open) > OPEN_SESSIONS_KEPT:
            self._open.popitem(last=False)

    def forget(self, session_id: str) -> None:
        self._open.pop(session_id, None)

    async def default_session(self, caller: Caller, cached: bool = False) -> SessionView:
        """The caller key's default session (created on its first call); `cached`: as
        this process last saw it open, if it did (see `cached_open`)."""
        key = f"default-session:{caller.key_id}"
        if cached and (view := self.cached_open(
                caller, str(idempotency.derived_id(caller.tenant, key, "session")))) is not None:
            return view
        view = await self.start(caller, SessionCreate(metadata={"default_for_key": caller.key_id}),
                                idempotency_key=key, request_hash=None)
        self.remember_open(view)
        return view

    async def start(self, caller: Caller, request: SessionCreate, *, idempotency_key: str | None = None,
                    request_hash: str | None = None) -> SessionView:
        tenant = caller.tenant
        # With a key, the ids of the events are derived from it and the request's hash:
        # a retry is an exact duplicate; another body under the same key collides with
        # the session stream (a version conflict, nothing written: a 422), whatever
        # streams the first request did or did not open (a budget).
        purpose = f":{request_hash}" if request_hash else ""
        if idempotency_key:
            session_id = str(idempotency.derived_id(tenant, idempotency_key, "session"))
            event_ids = [idempotency.derived_id(tenant, idempotency_key, f"session:started{purpose}")]
        else:
            session_id, event_ids = new_id(), None
        budget = (BudgetLimits(limit_usd=request.budget.limit_usd,
                               limit_tokens=request.budget.limit_tokens)
                  if request.budget else None)
        if request.policy is not None and request.policy_rules is not None:
            raise Problem(400, "validation", "policy: give a policy name or policy_rules, not both",
                          errors=[{"field": "policy", "message": "not both"}])
        policy_version = None
        if request.policy is not None:
            policy_version = await self.policies.current_version(tenant, request.policy)
            if policy_version is None:
                raise Problem(400, "validation", f"policy: no policy named {request.policy!r}",
                              errors=[{"field": "policy", "message": "unknown policy"}])
        inline = (msgspec.to_builtins(rules_or_problem(request.policy_rules, "policy_rules"))
                  if request.policy_rules is not None else None)
        # the agent's current version is pinned (a run uses it even after a redefinition);
        # a name that is no defined agent stays a label (agent_version None)
        pin = (await self.agents.pin(tenant, request.agent)
               if request.agent is not None and self.agents is not None else None)
        event = SessionStarted(session_id=session_id, tenant=tenant, budget=budget,
                               policy=request.policy, policy_version=policy_version,
                               policy_rules=inline, agent=request.agent,
                               metadata=dict(request.metadata),
                               agent_version=pin[0] if pin else None,
                               agent_source=pin[1] if pin else None)
        stream = session_stream(session_id)
        trace_id, span_id = current_ids()  # in the event's metadata and the answer alike
        metadata = Metadata(tenant=tenant, actor=caller.actor, correlation_id=session_id,
                            idempotency_key=idempotency_key, request_hash=request_hash,
                            trace_id=trace_id, span_id=span_id)
        appends: list = [(stream, [event], 0, event_ids)]
        if budget is not None:  # opened in the same transaction: never a session without it
            budget_stream = budget_stream_for_session(session_id)
            opened = decide_open(
                None, budget_stream, SESSION, session_id,
                limit_micro_usd=usd_to_micro(budget.limit_usd) if budget.limit_usd is not None else None,
                limit_tokens=budget.limit_tokens, period=None)
            appends.append((budget_stream, opened, 0,
                            [idempotency.derived_id(tenant, idempotency_key, f"session:budget{purpose}")]
                            if idempotency_key else None))
        try:
            results = await self.store.append_atomic(appends, metadata)
        except WrongExpectedVersion:  # same key, other body: the ids differ from the stored ones
            raise idempotency.reused() from None
        if results[-1].duplicate:
            return await self.require(caller, session_id)  # the first answer, from the read model
        # Answer from the event itself (what the projection will store), its time from the
        # append; a read that comes before the projection has it catches the projection
        # up (see `get`).
        created_at = results[0].recorded_at
        if created_at is None:  # an older schema's append does not say: read it back
            created_at = (await self.store.read_stream(
                stream, to_position=results[0].last_position))[0].recorded_at
        return SessionView(
            session_id=session_id, tenant=tenant, status="open",
            budget=BudgetView(limit_usd=budget.limit_usd, limit_tokens=budget.limit_tokens)
            if budget is not None else None,
            policy=event.policy, policy_version=event.policy_version,
            policy_rules=event.policy_rules, agent=event.agent, metadata=dict(event.metadata),
            created_at=created_at, closed_at=None, version=1,
            trace_id=trace_id, agent_version=event.agent_version,
            agent_source=event.agent_source)

    async def get(self, caller: Caller, session_id: str) -> SessionView | None:
        """The session from the read model; read-your-writes: if the read model does not
        have it yet but its stream exists, catch the projection up first."""
        view = await self.read_model.get(caller.tenant, session_id)
        if view is None:
            if await self.runner.wait_for_stream(session_stream(session_id), ("sessions",)):
                view = await self.read_model.get(caller.tenant, session_id)
        return view

    async def require(self, caller: Caller, session_id: str) -> SessionView:
        view = await self.get(caller, session_id)
        if view is None:  # another tenant's session is "not found" too: no existence leak
            raise Problem(404, "not-found", f"session {session_id!r} not found")
        return view

    async def list(self, caller: Caller, *, status: str | None, agent: str | None, limit: int,
                   cursor: str | None) -> SessionList:
        # read-your-writes: sessions created a moment ago are in the read model
        await self.runner.wait_for_head(("sessions",))
        rows = await self.read_model.page(caller.tenant, status=status, agent=agent,
                                          limit=limit + 1,
                                          before=_uncursor(cursor) if cursor else None)
        page = rows[:limit]
        more = len(rows) > limit
        return SessionList(sessions=tuple(page),
                           next_cursor=_cursor(page[-1].created_at, page[-1].session_id)
                           if more and page else None)

    async def close(self, caller: Caller, session_id: str, reason: str) -> SessionView:
        view = await self.require(caller, session_id)
        if view.status == "closed":
            return view  # closing twice is harmless
        stream = session_stream(session_id)
        for _ in range(5):
            try:
                result = await self.store.append(
                    stream, [SessionClosed(session_id=session_id, reason=reason)],
                    expected_version=await self.store.stream_version(stream),
                    metadata=Metadata(tenant=caller.tenant, actor=caller.actor, correlation_id=session_id))
                break
            except WrongExpectedVersion:
                continue
        else:
            raise Problem(409, "conflict", f"session {session_id!r} is changing too fast; retry")
        self.forget(session_id)
        await self.runner.wait_for(result.last_position, names=("sessions",))
        return await self.require(caller, session_id)

    async def events_by_trace(self, caller: Caller, trace_id: str, *, limit: int) -> AuditLog:
        tenant = None if caller.role == "platform" else caller.tenant
        events = await self.store.events_of_trace(trace_id, tenant=tenant, limit=limit)
        return AuditLog(events=tuple(_audit_event(e) for e in events), next_after=None)

    async def audit_log(self, caller: Caller, session_id: str, *, after: int,
                        limit: int) -> AuditLog:
        await self.require(caller, session_id)
        events = await self.store.events_of_correlation(session_id, tenant=caller.tenant,
                                                        after=after, limit=limit + 1)
        items = tuple(_audit_event(e) for e in events[:limit])
        return AuditLog(events=items, next_after=items[-1].position if len(events) > limit else None)
