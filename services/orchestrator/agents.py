"""Agents, the use cases: define (markdown -> `AgentDefined`), list, get, resolve with
version pinning, and the system agents shipped in `agents/`.

Entry points (the HTTP routes in `agents_api.py`, sessions and the agent runner call
these; they raise domain errors, `shared.contracts.errors`, never HTTP ones):

    agents = app.state.agents                                # an AgentService
    await agents.define(caller, markdown) -> AgentOut        # AgentInvalid (422), ProviderUnavailable
    await agents.list(caller) -> list[AgentOut]              # the tenant's own + the system ones
    await agents.get(caller, name, version=None) -> AgentOut # NotFound
    await agents.resolve(caller, name, version=None, source=None) -> AgentDefinition
    await agents.pin(tenant, name) -> (version, source) | None   # what a session pins at start
    await agents.pinned(caller, session) -> AgentDefinition  # the version a session pinned

**For the agent runner**: a run in a session uses `await agents.pinned(caller, session)`
(a `SessionView`): the definition at the version the session pinned when it started
(`SessionView.agent_version` / `agent_source`), even after the agent was redefined; a
session whose `agent` named no defined agent at start (a label) raises `NotFound`. A run
that names an agent itself uses `resolve(caller, name)` (the current version; `.version`
and `.source` say which). The definition (`shared.domain.agents.AgentDefinition`) gives
`system_prompt`, `tools`, `approval`, `max_steps`, `max_cost_usd`, `temperature` and
`effective_model(requested)` (the agent's model or route, else the one asked for, else
`default`).

Definitions are the stream `agent-<tenant>:<name>` (`AgentDefined`, versioned by stream
version). Validation at definition time: the markdown (`parse_agent_markdown`: the front
matter's fields and lines), then every tool against the tenant's registry
(`ToolService.resolve`: builtins, its own, its MCP servers'), then the model against
the routing table (the provider's models and routes; `auto` and `skill:<name>` as
written; the coding agents' aliases `sonnet`/`opus`/`haiku` resolved to the route or
model serving them, and when none does the agent runs as `inherit`, so such a file loads
unchanged on any deployment), each problem a 422 naming the field and its line. Defining the same markdown again appends
nothing and answers the current version.

**System agents** (`agents/*.md` at the repository root) are the tenant `@system`,
visible to every tenant; a tenant's own agent of the same name shadows it for that
tenant only. Every orchestrator loads them at start (`load_system`): a file's
`AgentDefined` is appended only when its content (sha256) differs from the stream's
last, at the stream's version, so restarts and several orchestrators starting at once
append each change exactly once. Their tools are checked against the builtins; their
model is not checked against routes (the provider may not be up yet): ship them with
`model: inherit`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from services.orchestrator.keys import Caller
from services.orchestrator.read_models.agents import AgentRow, AgentsReadModel
from services.orchestrator.schemas import AgentOut, SessionView
from services.orchestrator.tools import ToolService
from shared.contracts.errors import AgentInvalid, NotFound
from shared.contracts.events import SYSTEM_AGENTS, AgentDefined, Metadata, agent_stream
from shared.domain.agents import (
    AgentDefinition,
    decode_definition,
    model_kind,
    parse_agent_markdown,
    resolve_alias,
)
from shared.domain.tools import BUILTINS
from shared.infra.eventstore import EventStore, ProjectionRunner, WrongExpectedVersion

log = logging.getLogger("nexus.orchestrator.agents")

SYSTEM_AGENTS_DIR = Path(__file__).resolve().parents[2] / "agents"
_CACHE_MAX = 10_000


def _sha(markdown: str) -> str:
    return hashlib.sha256(markdown.encode("utf-8", "surrogatepass")).hexdigest()


def _stored(definition: AgentDefinition) -> dict[str, Any]:
    """The definition as `AgentDefined` keeps it: without version and source (the stream
    says those)."""
    raw = msgspec.to_builtins(definition)
    raw.pop("version", None)
    raw.pop("source", None)
    return raw


def agent_out(definition: AgentDefinition, markdown: str) -> AgentOut:
    return AgentOut(name=definition.name, version=definition.version, source=definition.source,
                    description=definition.description, model=definition.model,
                    route=definition.route, tools=list(definition.tools),
                    ignored_tools=list(definition.ignored_tools),
                    max_steps=definition.max_steps, max_cost_usd=definition.max_cost_usd,
                    approval=list(definition.approval), temperature=definition.temperature,
                    system_prompt=definition.system_prompt, markdown=markdown,
                    skills=list(definition.skills))


class AgentService:
    def __init__(self, store: EventStore, runner: ProjectionRunner, tools: ToolService,
                 models: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.store = store
        self.runner = runner
        self.tools = tools
        self.models = models  # the routing table's names (CallLifecycle.models)
        self.read_model = AgentsReadModel(store)
        # (tenant, name, version) -> (definition, markdown): versions never change
        self._versions: dict[tuple[str, str, int], tuple[AgentDefinition, str]] = {}

    # -- define ---------------------------------------------------------------------------

    async def define(self, caller: Caller, markdown: str | bytes) -> AgentOut:
        """A new version of the tenant's agent (nothing new when the markdown is the one
        already current). `AgentInvalid` lists every problem with its field and line."""
        definition, lines = parse_agent_markdown(markdown)
        text = markdown.decode("utf-8") if isinstance(markdown, bytes) else markdown
        definition = await self._checked(caller.tenant, definition, lines)
        return await self._append(caller.tenant, definition, text, caller.actor)

    async def _checked(self, tenant: str, definition: AgentDefinition,
                       lines: dict[str, int]) -> AgentDefinition:
        errors: list[dict[str, Any]] = []
        for tool in definition.tools:  # `approval` is a subset of them (checked by the parse)
            try:
                await self.tools.resolve(tenant, tool)
            except NotFound:
                errors.append({"field": "tools", "line": lines.get("tools", 2),
                               "message": f"unknown tool {tool!r}: not in the tenant's "
                                          "registry (GET /v1/tools)"})
        kind = model_kind(definition.model)
        route = definition.route
        if kind == "alias":  # sonnet/opus/haiku: the route serving it, else as `inherit`
            route = resolve_alias(definition.model or "", list(await self.models()))
        elif kind == "name":
            served = list(await self.models())
            if route not in served:
                errors.append({"field": "model", "line": lines.get("model", 2),
                               "message": f"no route serves the model {definition.model!r}; "
                                          f"served: {', '.join(sorted(served)) or 'none'}; "
                                          "or use 'inherit', 'auto' or 'skill:<name>'"})
        if errors:
            raise AgentInvalid(errors)
        return msgspec.structs.replace(definition, route=route)

    async def _append(self, tenant: str, definition: AgentDefinition, markdown: str,
                      actor: str) -> AgentOut:
        """Append at the stream's version unless the last version has this markdown; of
        two writers of the same content one appends, the other finds it there."""
        stream = agent_stream(tenant, definition.name)
        sha = _sha(markdown)
        for _ in range(10):
            events = await self.store.read_stream(stream)
            current = events[-1].stream_version if events else 0
            if events and isinstance(last := events[-1].event, AgentDefined) and last.sha256 == sha:
                position = events[-1].position
                break
            try:
                result = await self.store.append(
                    stream, [AgentDefined(tenant=tenant, name=definition.name, markdown=markdown,
                                          definition=_stored(definition), sha256=sha)],
                    expected_version=current, metadata=Metadata(tenant=tenant, actor=actor))
            except WrongExpectedVersion:
                continue
            current, position = result.next_expected_version, result.last_position
            break
        else:  # pragma: no cover - ten concurrent redefinitions in a row
            from shared.contracts.errors import Conflict
            raise Conflict(f"agent {definition.name!r} is being redefined concurrently; retry")
        await self.runner.wait_for(position, names=("agents",))
        source = "system" if tenant == SYSTEM_AGENTS else "tenant"
        return agent_out(msgspec.structs.replace(definition, version=current, source=source),
                         markdown)

    # -- read -----------------------------------------------------------------------------

    async def _visible(self, tenant: str, name: str) -> AgentRow | None:
        row = await self.read_model.visible(tenant, name)
        if row is None or row.tenant == SYSTEM_AGENTS:  # read-your-writes: defined a moment ago?
            if await self.runner.wait_for_stream(agent_stream(tenant, name), ("agents",)):
                row = await self.read_model.visible(tenant, name)
        return row

    async def _version(self, owner: str, name: str, version: int) -> tuple[AgentDefinition, str]:
        key = (owner, name, version)
        if key not in self._versions:
            events = await self.store.read_stream(agent_stream(owner, name), from_version=version)
            first = events[0] if events else None
            if first is None or first.stream_version != version or not isinstance(
                    first.event, AgentDefined) or first.event.tenant != owner:
                raise NotFound("agent", f"{name}@{version}")
            source = "system" if owner == SYSTEM_AGENTS else "tenant"
            definition = msgspec.structs.replace(decode_definition(first.event.definition),
                                                 version=version, source=source)
            if len(self._versions) >= _CACHE_MAX:
                self._versions.clear()
            self._versions[key] = (definition, first.event.markdown)
        return self._versions[key]

    async def _find(self, tenant: str, name: str, version: int | None,
                    source: str | None) -> tuple[AgentDefinition, str]:
        if source is not None:
            owner = SYSTEM_AGENTS if source == "system" else tenant
            if version is None:
                version = await self.store.stream_version(agent_stream(owner, name))
                if version == 0:
                    raise NotFound("agent", name)
            return await self._version(owner, name, version)
        row = await self._visible(tenant, name)
        if row is None:
            raise NotFound("agent", name)
        if version is None or version == row.version:
            definition = msgspec.structs.replace(decode_definition(row.definition),
                                                 version=row.version, source=row.source)
            return definition, row.markdown
        return await self._version(row.tenant, name, version)

    async def resolve(self, caller: Caller, name: str, version: int | None = None, *,
                      source: str | None = None) -> AgentDefinition:
        """The agent `name` as the caller's tenant sees it (its own, else the system one),
        at `version` (None: the current one); `source` ("tenant"/"system") picks whose
        when pinned. `definition.version` / `.source` say which. `NotFound` otherwise."""
        return (await self._find(caller.tenant, name, version, source))[0]

    async def get(self, caller: Caller, name: str, version: int | None = None) -> AgentOut:
        definition, markdown = await self._find(caller.tenant, name, version, None)
        return agent_out(definition, markdown)

    async def list(self, caller: Caller) -> list[AgentOut]:
        await self.runner.wait_for_head(("agents",))
        return [agent_out(msgspec.structs.replace(decode_definition(r.definition),
                                                  version=r.version, source=r.source), r.markdown)
                for r in await self.read_model.of_tenant(caller.tenant)]

    # -- sessions -------------------------------------------------------------------------

    async def pin(self, tenant: str, name: str) -> tuple[int, str] | None:
        """(version, source) of the agent a session starting now pins; None when `name`
        is no defined agent."""
        row = await self._visible(tenant, name)
        return (row.version, row.source) if row is not None else None

    async def pinned(self, caller: Caller, session: SessionView) -> AgentDefinition:
        """The definition a session pinned at start (NotFound: it names none)."""
        if session.agent is None or session.agent_version is None:
            raise NotFound("agent", session.agent or "(none)")
        return await self.resolve(caller, session.agent, session.agent_version,
                                  source=session.agent_source or "tenant")

    # -- system agents --------------------------------------------------------------------

    async def load_system(self, directory: Path = SYSTEM_AGENTS_DIR) -> list[AgentOut]:
        """Define every `*.md` of `directory` as a system agent (appending only what
        changed). A file that does not parse, or names a tool that is not a builtin, is
        logged and skipped; the others load."""
        loaded = []
        for path in sorted(directory.glob("*.md")) if directory.is_dir() else []:
            try:
                markdown = path.read_text("utf-8")
                definition, lines = parse_agent_markdown(markdown)
                unknown = [t for t in definition.tools if t not in BUILTINS]
                if unknown:
                    raise AgentInvalid([{"field": "tools", "line": lines.get("tools", 2),
                                         "message": f"not builtins: {', '.join(unknown)}"}])
                loaded.append(await self._append(SYSTEM_AGENTS, definition, markdown, "system"))
            except AgentInvalid as exc:
                log.error("system agent %s not loaded: %s", path.name, exc.detail)
        return loaded
