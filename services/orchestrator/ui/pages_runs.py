"""The Runs pages: the tenant's runs, one run's step timeline (live), its live stream
(the same items as `GET /v1/runs/{id}/stream`), approve / reject for a run waiting on a
human (the use case of `POST /v1/runs/{id}/approvals`), and the Explain page of a call."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.response import Redirect, Stream, Template

from shared.contracts import errors
from services.orchestrator.problems import Problem
from services.orchestrator.ui import tenant_views as tv
from services.orchestrator.ui.live import LiveHub
from services.orchestrator.ui.pages import Form, PageError, Viewer, live, page, render, sse
from services.orchestrator.ui.pages_sessions import TenantQuery, back_to, problem_page, tq


class RunPages(Controller):
    path = "/ui"
    exception_handlers = {Problem: problem_page}

    @get("/runs")
    async def runs(self, request: Request, state: State, viewer: Viewer,
                   tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        return page("runs", viewer, request, rows=await tv.runs(state, caller),
                    tenant=caller.tenant, tq=tq(viewer, tenant))

    @get("/live/runs", media_type="text/event-stream")
    async def runs_live(self, request: Request, state: State, viewer: Viewer, hub: LiveHub,
                        tenant: TenantQuery = "") -> Stream:
        caller = tv.scoped(viewer.caller, tenant)

        async def fragment() -> str:
            return render(request, "_runs.html", rows=await tv.runs(state, caller),
                          tq=tq(viewer, tenant))
        return live(hub, "runs", fragment, 1.0)

    @get("/runs/{run_id:str}")
    async def run(self, request: Request, run_id: str, state: State, viewer: Viewer,
                  tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        return page("run", viewer, request, tq=tq(viewer, tenant), tenant=tenant,
                    can_answer=viewer.caller.is_admin, **await tv.run(state, caller, run_id))

    @get("/live/runs/{run_id:str}", media_type="text/event-stream")
    async def run_live(self, request: Request, run_id: str, state: State, viewer: Viewer,
                       hub: LiveHub, tenant: TenantQuery = "") -> Stream:
        """The timeline and the approvals, re-rendered as the run's events arrive."""
        caller = tv.scoped(viewer.caller, tenant)
        await tv.run(state, caller, run_id)  # a 404 before the stream starts

        async def fragment() -> str:
            return render(request, "_run.html", tq=tq(viewer, tenant), tenant=tenant,
                          csrf=viewer.csrf, can_answer=viewer.caller.is_admin,
                          **await tv.run(state, caller, run_id))
        return live(hub, "run", fragment, 1.0)

    @get("/live/runs/{run_id:str}/stream", media_type="text/event-stream")
    async def run_stream(self, request: Request, run_id: str, state: State, viewer: Viewer,
                         tenant: TenantQuery = "") -> Stream:
        """The run as it happens: `RunService.follow`, each item a row."""
        caller = tv.scoped(viewer.caller, tenant)
        await state.runs.get(caller, run_id)

        async def feed() -> AsyncIterator[bytes]:
            async for item in state.runs.follow(caller, run_id):
                yield sse("item", render(request, "_stream_item.html", i=tv.stream_item(item)))
            yield sse("item", render(request, "_stream_item.html", i=dict(
                kind="end", type="end", text="the run ended", version=None)))
            yield b"event: close\ndata: end\n\n"
        return Stream(feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @post("/runs/{run_id:str}/approvals")
    async def answer(self, run_id: str, state: State, viewer: Viewer, data: Form,
                     tenant: TenantQuery = "") -> Redirect:
        """Approve or reject a tool call the run waits on (a tenant admin or the platform)."""
        if not viewer.caller.is_admin:
            raise PageError(403, "Answering an approval needs an admin key.")
        caller = tv.scoped(viewer.caller, tenant)
        decision = data.get("decision", "")
        if decision not in ("approve", "reject"):
            raise PageError(400, "decision: approve or reject")
        path = f"/ui/runs/{run_id}"
        try:
            await state.runs.answer(caller, run_id, data.get("tool_call_id", ""),
                                    decision == "approve", data.get("reason", "")[:2000])
        except errors.Conflict as exc:
            return back_to(path, viewer, tenant, error=str(exc))
        return back_to(path, viewer, tenant, notice=f"{'approved' if decision == 'approve' else 'rejected'}: the run goes on")

    @get("/calls/{call_id:str}")
    async def explain(self, request: Request, call_id: str, state: State, viewer: Viewer,
                      tenant: TenantQuery = "") -> Template:
        """A call's whole decision chain (`GET /v1/calls/{id}/explain`)."""
        caller = tv.scoped(viewer.caller, tenant)
        return page("explain", viewer, request, x=await tv.explain(state, caller, call_id),
                    tq=tq(viewer, tenant))
