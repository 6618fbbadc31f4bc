"""One call's decision chain from its events (`GET /v1/calls/{id}/explain`), and
feedback on a call (`POST /v1/calls/{id}/feedback`).

Everything comes from the events: the call's own stream `llmcall-{id}` (`ModelRouted`,
`PolicyEvaluated`, `BudgetExceeded`, `CallPlanned`, `LLMCallStarted`, `LLMCallFailed`,
`LLMCallCompleted`, `CallFeedback`) and its session's budget events for this call
(`BudgetReserved` / `BudgetCommitted` / `BudgetReleased`, with each budget's state just
before the reservation folded from its stream). A call of another tenant, or none, is
`NotFound`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.orchestrator.keys import Caller
from shared.contracts.errors import Conflict, NotFound
from shared.contracts.events import (
    AnyEvent,
    BudgetCommitted,
    BudgetExceeded,
    BudgetReleased,
    BudgetReserved,
    CallFeedback,
    CallPlanned,
    LLMCallCompleted,
    LLMCallFailed,
    LLMCallStarted,
    Metadata,
    ModelRouted,
    PolicyEvaluated,
    RunStarted,
    llmcall_stream,
    run_stream,
)
from shared.domain.budget import fold_budget_events
from shared.infra.eventstore import EventStore, WrongExpectedVersion


def _b(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


class CallExplainer:
    def __init__(self, store: EventStore) -> None:
        self.store = store

    async def _stream(self, caller: Caller, call_id: str):
        events = await self.store.read_stream(llmcall_stream(call_id))
        if not events or any(e.metadata.tenant not in (None, caller.tenant) for e in events) \
                or all(e.metadata.tenant is None for e in events):
            raise NotFound("call", call_id)
        return events

    async def explain(self, caller: Caller, call_id: str) -> dict[str, Any]:
        events = await self._stream(caller, call_id)
        out: dict[str, Any] = {"call_id": call_id, "session_id": None, "routing": None,
                               "policy": [], "budget": [], "plan": None, "attempts": [],
                               "outcome": None, "feedback": []}
        for rec in events:
            e = rec.event
            match e:
                case ModelRouted():
                    out["routing"] = _b(e)
                    out["session_id"] = e.session_id
                case PolicyEvaluated():
                    out["session_id"] = e.session_id
                    out["policy"].append({"action": e.action, "allowed": e.allowed, "rule": e.rule,
                                          "reason": e.reason, "policy": e.policy,
                                          "targets": list(e.targets),
                                          "dropped": _b(e.dropped)})
                case BudgetExceeded():
                    out["budget"].append({"budget_id": e.budget_id, "denied": True,
                                          "requested": _b(e.requested), "available": _b(e.available),
                                          "reason": e.reason})
                case CallPlanned():  # a call that got no answer, or one recorded before
                    out["plan"] = {"targets": list(e.targets), "nodes": _b(e.nodes),
                                   "strategy": e.strategy, "loads": _b(e.loads)}
                case LLMCallStarted():
                    out["session_id"] = e.session_id
                    out["requested_model"] = e.model
                    if out["plan"] is None:  # the plan of an answered call (no CallPlanned)
                        out["plan"] = {"targets": list(e.targets), "nodes": _b(e.nodes),
                                       "strategy": e.strategy, "loads": _b(e.loads)}
                case LLMCallFailed():
                    out["attempts"].append({"target": e.target, "attempt": e.attempt,
                                            "error": e.error, "detail": e.detail,
                                            "status": e.status, "fallback": e.fallback,
                                            "final": e.final})
                case LLMCallCompleted():
                    out["outcome"] = {"status": "completed", "model": e.model, "target": e.target,
                                      "provider": e.provider, "node": e.node,
                                      "latency_ms": e.latency_ms, "ttft_ms": e.ttft_ms,
                                      "input_tokens": e.input_tokens,
                                      "output_tokens": e.output_tokens,
                                      "cost_micro_usd": e.cost_micro_usd, "attempts": e.attempts,
                                      "fell_back": bool(out["attempts"])}
                case CallFeedback():
                    out["feedback"].append({"score": e.score, "source": e.source})
        if out["outcome"] is None and any(a["final"] for a in out["attempts"]):
            out["outcome"] = {"status": "failed"}
        session_id = out["session_id"] or events[0].metadata.correlation_id
        if session_id:
            budget, run_id = await self._budget(caller, call_id, session_id, events[0].position)
            out["budget"] += budget
            if run_id:  # a run's call: the run, and how its agent was chosen
                out["run"] = await self._run(caller, run_id, events[0].position)
        return out

    async def _run(self, caller: Caller, run_id: str, before: int) -> dict[str, Any]:
        events = await self.store.read_stream(run_stream(run_id), to_position=before)
        started = events[0].event if events else None
        if not isinstance(started, RunStarted) or started.tenant != caller.tenant:
            return {"run_id": run_id}
        return {"run_id": run_id, "agent": started.agent, "agent_version": started.agent_version,
                "agent_selection": _b(started.selection)}

    async def _budget(self, caller: Caller, call_id: str, session_id: str,
                      first: int) -> tuple[list[dict[str, Any]], str | None]:
        """The call's budget entries, and the run whose step made the call (if any)."""
        found: dict[str, dict[str, Any]] = {}
        run_id = None
        related = await self.store.events_of_correlation(session_id, tenant=caller.tenant,
                                                         after=max(0, first - 200), limit=2000)
        for rec in related:
            if rec.type == "RunLLMCallLinked" and rec.data.get("call_id") == call_id:
                run_id = rec.data.get("run_id")
            if rec.type not in ("BudgetReserved", "BudgetCommitted", "BudgetReleased"):
                continue
            e = msgspec.convert(rec.data, AnyEvent)
            if not isinstance(e, (BudgetReserved, BudgetCommitted, BudgetReleased)) or e.call_id != call_id:
                continue
            entry = found.setdefault(e.budget_id, {"budget_id": e.budget_id})
            if isinstance(e, BudgetReserved):
                before = fold_budget_events([(r.event, r.stream_version) for r in
                                             await self.store.read_stream(
                                                 rec.stream_id, to_position=rec.position - 1)])
                entry["before"] = None if before is None else {
                    "limit_micro_usd": before.limit_micro_usd, "limit_tokens": before.limit_tokens,
                    "committed_micro_usd": before.committed_micro_usd,
                    "reserved_micro_usd": before.reserved_micro_usd,
                    "remaining_micro_usd": before.remaining_micro_usd}
                entry["reserved_micro_usd"] = e.micro_usd
                entry["reserved_tokens"] = e.tokens
            elif isinstance(e, BudgetCommitted):
                entry["committed_micro_usd"] = e.micro_usd
                entry["committed_tokens"] = e.tokens
                if e.lease is not None:  # admitted from a slice (budget leases): no reservation
                    entry["lease"] = e.lease
            else:
                entry["released"] = e.reason
        return list(found.values()), run_id

    async def feedback(self, caller: Caller, call_id: str, score: float, source: str = "api",
                       comment: str = "") -> dict[str, Any]:
        events = await self._stream(caller, call_id)
        if not any(isinstance(r.event, LLMCallCompleted) for r in events):
            raise Conflict(f"call {call_id!r} has no answer to score")
        if any(isinstance(r.event, CallFeedback) and r.event.source == source for r in events):
            raise Conflict(f"call {call_id!r} already has feedback from {source!r}")
        try:
            await self.store.append(llmcall_stream(call_id), [CallFeedback(
                call_id=call_id, score=score, source=source, comment=comment)],
                expected_version=events[-1].stream_version,
                metadata=Metadata(tenant=caller.tenant, actor=caller.actor,
                                  correlation_id=events[0].metadata.correlation_id,
                                  causation_id=call_id))
        except WrongExpectedVersion:
            raise Conflict(f"call {call_id!r} changed meanwhile; retry") from None
        routed = next((r.event for r in events if isinstance(r.event, ModelRouted)), None)
        return {"call_id": call_id, "score": score, "source": source,
                "learned": routed is not None,
                "cluster": routed.cluster if routed else None,
                "model": routed.pick if routed else None}


def explain_text(x: dict[str, Any]) -> str:
    """The chain as text, for `nexus explain`."""
    lines = [f"call {x['call_id']} (session {x['session_id']})"]
    run = x.get("run")
    if run:
        sel = run.get("agent_selection")
        lines.append(f"run {run['run_id']}: agent {run.get('agent')}" + (
            f", chosen by its skill {sel['skill']} (confidence {sel['confidence']:.2f}; "
            + ", ".join(f"{c['agent']} {c['similarity']:.3f}" for c in sel["candidates"]) + ")"
            if sel else ""))
    r = x.get("routing")
    if r:
        lines.append(f"skill: {r['skill']} ({r['matched_by']}, confidence {r['confidence']:.2f}) "
                     f"asked as {r['requested']!r}; cluster {r['cluster']}; weights "
                     f"performance {r['performance_weight']} cost {r['cost_weight']}")
        for c in r["candidates"]:
            lines.append(f"  candidate {c['model']}: " + (
                f"excluded ({c['excluded']})" if c.get("excluded") else
                f"quality {c['quality']:.3f} (sampled {c['quality_sample']:.3f}, n={c['quality_n']}), "
                f"cost {c['cost_micro_usd']:.0f} micro-USD (n={c['cost_n']}), score {c['score']:.3f}"))
        lines.append(f"  pick: {r['pick']}{' (exploring)' if r['exploration'] else ''}; "
                     f"fallback {', '.join(r['fallback']) or 'none'}; {r['reason']}")
    for p in x["policy"]:
        lines.append(f"policy ({p['action']}): {'allowed' if p['allowed'] else 'DENIED'} by "
                     f"{p['rule']}: {p['reason']}")
        for d in p["dropped"]:
            lines.append(f"  dropped {d['target']}: {d['rule']}")
    for b in x["budget"]:
        lines.append(f"budget {b['budget_id']}: " + ", ".join(
            f"{k} {v}" for k, v in b.items() if k != "budget_id"))
    if x["plan"]:
        p = x["plan"]
        lines.append(f"plan: {' -> '.join(p['targets'])}" + (
            f"; nodes {p['nodes']} by {p['strategy']}; loads {p['loads']}" if p["nodes"] else ""))
    for a in x["attempts"]:
        lines.append(f"attempt {a['attempt']} on {a['target']}: {a['error']} ({a['detail']})"
                     + (f" -> fallback {a['fallback']}" if a["fallback"] else ""))
    o = x["outcome"]
    if o and o.get("status") == "completed":
        lines.append(f"answered by {o['target']} in {o['latency_ms']:.0f} ms, "
                     f"{o['input_tokens']}+{o['output_tokens']} tokens, {o['cost_micro_usd']} micro-USD")
    elif o:
        lines.append("failed")
    for f in x["feedback"]:
        lines.append(f"feedback ({f['source']}): {f['score']}")
    return "\n".join(lines)
