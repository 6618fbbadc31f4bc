"""Agents, skills, policies and tools: their current versions; an agent's markdown
edited and applied (the use case of `POST /v1/agents`; a rule broken is shown inline
with its field and line)."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.response import Redirect, Template

from shared.contracts import errors
from services.orchestrator.problems import Problem
from services.orchestrator.schemas import AGENT_MARKDOWN_MAX
from services.orchestrator.ui import tenant_views as tv
from services.orchestrator.ui.pages import Form, PageError, Viewer, page
from services.orchestrator.ui.pages_sessions import TenantQuery, back_to, problem_page, tq

MAX_MARKDOWN = AGENT_MARKDOWN_MAX  # as the API's POST /v1/agents


class CatalogPages(Controller):
    path = "/ui"
    exception_handlers = {Problem: problem_page}

    @get("/agents")
    async def agents(self, request: Request, state: State, viewer: Viewer,
                     tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        return page("agents", viewer, request, agents=await tv.agents(state, caller),
                    tenant=caller.tenant, tq=tq(viewer, tenant), can_edit=viewer.caller.is_admin,
                    markdown="", problems=[])

    @get("/agents/{name:str}")
    async def agent(self, request: Request, name: str, state: State, viewer: Viewer,
                    tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        a = await tv.agent(state, caller, name)
        return page("agent", viewer, request, a=a, markdown=a.markdown, problems=[],
                    tq=tq(viewer, tenant), tenant=tenant, can_edit=viewer.caller.is_admin)

    @post("/agents")
    async def apply(self, request: Request, state: State, viewer: Viewer, data: Form,
                    tenant: TenantQuery = "") -> Template | Redirect:
        """Apply an agent's markdown: a new version (or none when it is unchanged); an
        invalid one comes back with each problem's field and line, the text kept."""
        if not viewer.caller.is_admin:
            raise PageError(403, "Defining an agent needs an admin key.")
        caller = tv.scoped(viewer.caller, tenant)
        markdown = data.get("markdown", "").replace("\r\n", "\n")
        if len(markdown.encode()) > MAX_MARKDOWN:
            raise PageError(413, f"markdown: at most {MAX_MARKDOWN} bytes")
        try:
            out = await state.agents.define(caller, markdown)
        except errors.InvalidEntity as exc:
            invalid = page("agent", viewer, request, a=None, markdown=markdown, problems=exc.errors,
                           tq=tq(viewer, tenant), tenant=tenant, can_edit=True)
            invalid.status_code = 422
            return invalid
        return back_to(f"/ui/agents/{out.name}", viewer, tenant,
                       notice=f"agent {out.name} is at version {out.version}")

    @get("/skills")
    async def skills(self, request: Request, state: State, viewer: Viewer,
                     tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        return page("skills", viewer, request, skills=await tv.skills(state, caller),
                    tenant=caller.tenant)

    @get("/policies")
    async def policies(self, request: Request, state: State, viewer: Viewer,
                       tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        return page("policies", viewer, request, policies=await tv.policies(state, caller),
                    tenant=caller.tenant)

    @get("/tools")
    async def tools(self, request: Request, state: State, viewer: Viewer,
                    tenant: TenantQuery = "") -> Template:
        caller = tv.scoped(viewer.caller, tenant)
        return page("tools", viewer, request, tools=await tv.tools(state, caller),
                    tenant=caller.tenant)
