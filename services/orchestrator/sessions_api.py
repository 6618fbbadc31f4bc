"""`/v1/sessions`: thin handlers over `SessionService`, scoped to the caller's tenant."""

from __future__ import annotations

from typing import Annotated, Literal

from litestar import Controller, Request, get, post
from litestar.params import Parameter

from services.orchestrator import idempotency
from services.orchestrator.keys import Caller
from services.orchestrator.schemas import (
    CURSOR,
    NAME,
    AuditLog,
    SessionCloseIn,
    SessionCreate,
    SessionList,
    SessionView,
)
from services.orchestrator.sessions import SessionService

Limit = Annotated[int, Parameter(ge=1, le=500)]
SessionStatus = Literal["open", "closed"]
AgentName = Annotated[str | None, Parameter(min_length=1, max_length=200, pattern=NAME)]
Cursor = Annotated[str | None, Parameter(pattern=CURSOR, description="next_cursor of the page before")]


class SessionsController(Controller):
    path = "/v1/sessions"

    @post("/", status_code=201, responses={422: idempotency.RESPONSES[422]})
    async def create_session(self, request: Request, data: SessionCreate, caller: Caller,
                             sessions: SessionService,
                             idempotency_key: idempotency.KeyHeader = None) -> SessionView:
        key = idempotency.validate_key(request.headers.get(idempotency.HEADER))
        return await sessions.start(caller, data, idempotency_key=key,
                                    request_hash=idempotency.body_hash(await request.body()))

    @get("/")
    async def list_sessions(self, caller: Caller, sessions: SessionService,
                            status: SessionStatus | None = None,
                            agent: AgentName = None, limit: Limit = 50,
                            cursor: Cursor = None) -> SessionList:
        return await sessions.list(caller, status=status, agent=agent, limit=limit, cursor=cursor)

    @get("/{session_id:str}")
    async def get_session(self, session_id: str, caller: Caller,
                          sessions: SessionService) -> SessionView:
        return await sessions.require(caller, session_id)

    @post("/{session_id:str}/close", status_code=200)
    async def close_session(self, session_id: str, caller: Caller, sessions: SessionService,
                            data: SessionCloseIn | None = None) -> SessionView:
        return await sessions.close(caller, session_id, (data or SessionCloseIn()).reason)

    @get("/{session_id:str}/events")
    async def session_events(self, session_id: str, caller: Caller, sessions: SessionService,
                             after: Annotated[int, Parameter(ge=0, le=2**63 - 1)] = 0,
                             limit: Limit = 100) -> AuditLog:
        return await sessions.audit_log(caller, session_id, after=after, limit=limit)


class EventsController(Controller):
    path = "/v1/events"

    @get("/")
    async def events_by_trace(self, caller: Caller, sessions: SessionService,
                              trace_id: Annotated[str, Parameter(pattern=r"^[0-9a-f]{32}$")],
                              limit: Limit = 500) -> AuditLog:
        """Every event a trace produced (of the caller's tenant): from a trace to its facts."""
        return await sessions.events_by_trace(caller, trace_id, limit=limit)
