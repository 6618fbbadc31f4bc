"""What the tenant's pages show (Sessions, Runs, Explain, Agents/skills/policies/tools),
gathered from the same use cases the API handlers call (`SessionService`,
`BudgetManager`, `CallLifecycle.messages`, `RunService`, `CallExplainer`,
`AgentService`, `SkillService`, `PolicyService`, `ToolService`); no SQL here.

Every function takes the `Caller` the page acts as (`scoped`: the viewer, or for the
platform admin the tenant it picked), so another tenant's ids are `NotFound` exactly as
in the API."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

import msgspec
from litestar.datastructures import State

from shared.contracts.events import Event, llmcall_stream, run_stream, toolcall_stream
from shared.domain import run_timeline as T
from shared.domain.budget import (
    BudgetState,
    budget_stream_for_session,
    budget_stream_for_tenant,
    month_period,
)
from services.orchestrator.keys import Caller
from services.orchestrator.read_models.runs import RunsReadModel

ENDED_CALL = {"LLMCallCompleted"}
ENDED_TOOL = {"ToolCallFinished", "ToolCallFailed"}
_ENDED: OrderedDict[str, list[Event]] = OrderedDict()  # streams of ended calls never change
_ENDED_MAX = 4000


def usd(micro: int) -> str:
    """Dollars to the micro-dollar: a call's cost is often under a hundredth of a cent."""
    return f"${micro / 1_000_000:,.6f}"


def scoped(caller: Caller, tenant: str | None) -> Caller:
    """The caller a page acts as: the platform admin may look at any tenant (as the
    API's `X-Nexus-Tenant`), everyone else only at its own."""
    if caller.role == "platform" and tenant:
        return Caller(tenant=tenant, key_id=caller.key_id, role=caller.role)
    return caller


# -- budgets ------------------------------------------------------------------------------


def gauge(state: BudgetState | None, label: str) -> dict[str, Any] | None:
    """A budget as a gauge: committed and reserved against the limit; what orchestrators
    hold leased (budget leases: room held, not spent) is named beside it."""
    if state is None:
        return None
    limit, committed, reserved = state.limit_micro_usd, state.committed_micro_usd, state.reserved_micro_usd

    def pct(v: int) -> float:
        return round(min(100.0, 100.0 * v / limit), 1) if limit else 0.0
    return dict(label=label, budget_id=state.budget_id, limit=usd(limit) if limit is not None else "no limit",
                limit_micro=limit, committed=usd(committed), committed_micro=committed,
                reserved=usd(reserved), reserved_micro=reserved,
                leased=usd(state.leased_micro_usd), leased_micro=state.leased_micro_usd,
                committed_pct=pct(committed), reserved_pct=min(pct(reserved), 100 - pct(committed)),
                remaining=usd(state.remaining_micro_usd) if state.remaining_micro_usd is not None else "-",
                tokens=state.committed_tokens, open=len(state.reservations), version=state.version)


async def gauges(state: State, caller: Caller, session_id: str,
                 to_position: int | None = None) -> list[dict[str, Any]]:
    budgets = state.budgets
    session = await budgets.state(budget_stream_for_session(session_id), to_position=to_position)
    tenant = await budgets.state(budget_stream_for_tenant(caller.tenant, month_period(time.time())),
                                 to_position=to_position)
    return [g for g in (gauge(session, "Session budget"), gauge(tenant, "Tenant budget (month)")) if g]


async def budget_history(state: State, session_id: str) -> list[dict[str, Any]]:
    """The session budget's changes (the slider's stops): position, time, what happened."""
    records = await state.runtime.store.read_stream(budget_stream_for_session(session_id))
    return [dict(position=r.position, at=r.recorded_at.strftime("%Y-%m-%d %H:%M:%S"), type=r.type)
            for r in records]


async def budget_at(state: State, caller: Caller, session_id: str, stop: int) -> dict[str, Any]:
    """The gauges as they stood at the slider's stop `stop` (a change of the session's
    budget; the tenant's budget at the same moment)."""
    await state.sessions.require(caller, session_id)
    history = await budget_history(state, session_id)
    if not history:
        return dict(history=[], stop=None, gauges=[])
    stop = max(0, min(stop, len(history) - 1))
    at = history[stop]
    return dict(history=history, stop=stop, at=at,
                gauges=await gauges(state, caller, session_id, to_position=at["position"]))


# -- sessions -----------------------------------------------------------------------------


async def sessions(state: State, caller: Caller) -> list[dict[str, Any]]:
    listed = await state.sessions.list(caller, status=None, agent=None, limit=50, cursor=None)
    out = []
    for s in listed.sessions:
        budget = await state.budgets.state(budget_stream_for_session(s.session_id))
        out.append(dict(s=s, gauge=gauge(budget, "Session budget")))
    return out


async def session(state: State, caller: Caller, session_id: str) -> dict[str, Any]:
    view = await state.sessions.require(caller, session_id)  # another tenant's: a 404
    messages = await state.calls.conversation(caller, session_id)
    runs = await state.runs.of_session(caller, session_id)
    return dict(s=view, messages=messages, runs=runs,
                gauges=await gauges(state, caller, session_id),
                history=await budget_history(state, session_id))


# -- runs ---------------------------------------------------------------------------------


async def runs(state: State, caller: Caller) -> list[dict[str, Any]]:
    rows = await RunsReadModel(state.runtime.store).of_tenant(caller.tenant, 100)
    return [dict(r, cost=usd(r["cost_micro_usd"])) for r in rows]


async def _linked(state: State, stream: str, ended: set[str]) -> list[Event]:
    if stream in _ENDED:
        return _ENDED[stream]
    events = [r.event for r in await state.runtime.store.read_stream(stream)]
    if any(type(e).__name__ in ended for e in events):
        _ENDED[stream] = events
        while len(_ENDED) > _ENDED_MAX:
            _ENDED.popitem(last=False)
    return events


async def run(state: State, caller: Caller, run_id: str) -> dict[str, Any]:
    out = await state.runs.get(caller, run_id)  # another tenant's run: NotFound
    records = await state.runtime.store.read_stream(run_stream(run_id))
    events = [r.event for r in records]
    call_ids, tool_ids = T.linked_ids(events)
    calls = {c: await _linked(state, llmcall_stream(c), ENDED_CALL) for c in call_ids}
    tools = {t: await _linked(state, toolcall_stream(t), ENDED_TOOL) for t in tool_ids}
    line = T.timeline(events, calls, tools)
    return dict(run=out, timeline=line, usd=usd, version=records[-1].stream_version if records else 0,
                pending=[dict(p=p, arguments=json.dumps(p.arguments)[:500])
                         for p in out.pending_approvals])


def stream_item(item: Any) -> dict[str, Any]:
    """One item of the run's live stream (RunService.follow), as a row."""
    if item.kind == "delta":
        return dict(kind="delta", type="delta", text=str(item.data.get("text", "")), version=None)
    data = json.dumps(item.data, default=str)
    return dict(kind="event", type=item.type, version=item.version,
                text=data if len(data) <= 300 else data[:300] + "...")


# -- explain ------------------------------------------------------------------------------


async def explain(state: State, caller: Caller, call_id: str) -> dict[str, Any]:
    return await state.explainer.explain(caller, call_id)


# -- agents, skills, policies, tools -----------------------------------------------------


async def agents(state: State, caller: Caller) -> list[Any]:
    return await state.agents.list(caller)


async def agent(state: State, caller: Caller, name: str) -> Any:
    return await state.agents.get(caller, name)


async def skills(state: State, caller: Caller) -> list[dict[str, Any]]:
    return [dict(name=s.name, version=s.version, source=s.source,
                 spec=json.dumps(msgspec.to_builtins(s.spec), indent=1)[:2000])
            for s in await state.skills.list(caller)]


async def policies(state: State, caller: Caller) -> list[dict[str, Any]]:
    return [dict(name=p.name, version=p.version, rules=json.dumps(p.rules, indent=1))
            for p in await state.policies.of_tenant(caller.tenant)]


async def tools(state: State, caller: Caller) -> list[Any]:
    return await state.tools.list(caller)

