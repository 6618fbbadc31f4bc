"""`/v1/agents`: define an agent (its markdown as the body), list, read one (a version):
thin handlers over `AgentService`, scoped to the caller's tenant (another tenant's
agent is a 404; the system agents are everyone's)."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from services.orchestrator import idempotency as idem
from services.orchestrator.agents import AgentService
from services.orchestrator.auth import require_admin
from services.orchestrator.keys import Caller
from services.orchestrator.problems import Problem, problem_for
from services.orchestrator.schemas import AgentIn, AgentList, AgentOut
from shared.contracts.errors import NexusError

AgentName = Annotated[str, Parameter(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
Version = Annotated[int | None, Parameter(ge=1, le=2**31 - 1, required=False,
                                          description="a version (default: the current one)")]


def markdown_of(request: Request, body: bytes) -> bytes | str:
    """The markdown: the body itself, or the `markdown` member of a JSON body."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return body
    try:
        return msgspec.json.decode(body, type=AgentIn).markdown
    except msgspec.ValidationError as exc:  # an unknown or missing member names itself
        named = re.search(r"field `([^`]+)`", str(exc))
        field = named.group(1) if named else "markdown"
        raise Problem(400, "validation", f"{field}: {exc}",
                      errors=[{"field": field, "message": str(exc)}]) from None
    except msgspec.DecodeError:
        raise Problem(400, "validation", "body: malformed JSON",
                      errors=[{"field": "body", "message": "malformed JSON"}]) from None


async def _edge(work):  # type: ignore[no-untyped-def]
    try:
        return await work
    except NexusError as exc:
        raise problem_for(exc) from None


class AgentsController(Controller):
    path = "/v1/agents"

    @get("/")
    async def list_agents(self, caller: Caller, agent_service: AgentService) -> AgentList:
        """The agents the tenant can run: its own and the system ones it does not shadow."""
        return AgentList(agents=await agent_service.list(caller))

    @post("/", status_code=201, responses=idem.RESPONSES)
    async def define_agent(self, request: Request, caller: Caller, agent_service: AgentService,
                           idempotency: idem.IdempotencyStore,
                           idempotency_key: idem.KeyHeader = None) -> Response[AgentOut]:
        """Define an agent, or a new version of it (admin): the markdown file as the body
        (`Content-Type: text/markdown`), or JSON `{"markdown": ...}`. A problem names each
        field and its line (422)."""
        require_admin(caller)
        markdown = markdown_of(request, await request.body())

        async def run() -> idem.Recorded:
            return idem.Recorded.json(await agent_service.define(caller, markdown), status=201)

        return await idem.run_once(request, caller.tenant, idempotency,  # type: ignore[return-value]
                                   lambda: _edge(run()))

    @get("/{name:str}")
    async def get_agent(self, name: AgentName, caller: Caller, agent_service: AgentService,
                        version: Version = None) -> AgentOut:
        """The agent at its current version, or at `?version=`."""
        return await agent_service.get(caller, name, version)
