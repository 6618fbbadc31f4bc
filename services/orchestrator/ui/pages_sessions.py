"""The Sessions pages: the tenant's sessions with budget gauges, one session's
conversation, runs and budget (live), and the budget's time slider (`?stop=`)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from litestar import Controller, Request, Response, get
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import Redirect, Stream, Template

from services.orchestrator.problems import Problem
from services.orchestrator.ui import tenant_views as tv
from services.orchestrator.ui.live import LiveHub
from services.orchestrator.ui.pages import PageError, Viewer, live, page, page_error, render

# the platform admin picks a tenant (`?tenant=`); for anyone else it is ignored
TenantQuery = Annotated[str, Parameter(max_length=64, pattern=r"^[A-Za-z0-9_.@-]*$")]


def problem_page(request: Request, exc: Problem) -> Response:
    """A use case's problem (a 404 for another tenant's id) as the dashboard's error page."""
    return page_error(request, PageError(exc.status_code, str(exc.detail)))


def tq(viewer: Viewer, tenant: str) -> str:
    """The query string that keeps the admin's chosen tenant on the links."""
    return f"?tenant={tenant}" if viewer.platform and tenant else ""


def back_to(path: str, viewer: Viewer, tenant: str, *, notice: str = "", error: str = "") -> Redirect:
    """A 303 to `path` with a notice or error (and the admin's tenant kept)."""
    query = urlencode({k: v for k, v in (("tenant", tenant if viewer.platform else ""),
                                         ("notice", notice), ("error", error)) if v})
    return Redirect(f"{path}?{query}" if query else path, status_code=303)


class SessionPages(Controller):
    path = "/ui"
    exception_handlers = {Problem: problem_page}

    @get("/sessions")
    async def sessions(self, request: Request, state: State, viewer: Viewer,
                       tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        return page("sessions", viewer, request, rows=await tv.sessions(state, caller),
                    tenant=caller.tenant, tq=tq(viewer, tenant))

    @get("/live/sessions", media_type="text/event-stream")
    async def sessions_live(self, request: Request, state: State, viewer: Viewer, hub: LiveHub,
                            tenant: TenantQuery = "") -> Stream:
        caller = tv.scoped(viewer.caller, tenant)

        async def fragment() -> str:
            return render(request, "_sessions.html", rows=await tv.sessions(state, caller),
                          tq=tq(viewer, tenant))
        return live(hub, "sessions", fragment, 1.0)

    @get("/sessions/{session_id:str}")
    async def session(self, request: Request, session_id: str, state: State, viewer: Viewer,
                      tenant: TenantQuery = "") -> Template:
        """One session: its budget (live, and as it stood at any change), conversation
        and runs; another tenant's is a 404, as in the API."""
        caller = tv.scoped(viewer.caller, tenant)
        return page("session", viewer, request, tq=tq(viewer, tenant),
                    **await tv.session(state, caller, session_id))

    @get("/live/sessions/{session_id:str}", media_type="text/event-stream")
    async def session_live(self, request: Request, session_id: str, state: State, viewer: Viewer,
                           hub: LiveHub, tenant: TenantQuery = "") -> Stream:
        caller = tv.scoped(viewer.caller, tenant)
        await tv.session(state, caller, session_id)  # a 404 before the stream starts

        async def fragment() -> str:
            return render(request, "_session.html", tq=tq(viewer, tenant),
                          **await tv.session(state, caller, session_id))
        return live(hub, "session", fragment, 1.0)

    @get("/sessions/{session_id:str}/budget")
    async def budget_at(self, request: Request, session_id: str, state: State, viewer: Viewer,
                        stop: Annotated[int, Parameter(ge=0, le=2**31)] = 0,
                        tenant: TenantQuery = "") -> Template:
        """The slider's panel: the budgets as they stood at the session budget's change
        number `stop` (what `GET /v1/sessions/{id}/budget?at=<its position>` answers)."""
        caller = tv.scoped(viewer.caller, tenant)
        return Template("_budget_at.html", context=dict(
            session_id=session_id, **await tv.budget_at(state, caller, session_id, stop)))
