"""Counterfactual replay of routed traffic (`POST /v1/replays`, `nexus replay`).

Each call routed in the period (`routed_calls`, with its `ModelRouted`) is decided
again, by posterior means (no sampling: deterministic), under the given weights and/or
model set, on the statistics learned *now* (`routing_stats`: the best estimate of each
(cluster, model)); the recorded candidates say which models were served and allowed
then (an excluded model stays excluded). Reported side by side: the calls whose model
changes, recorded cost vs projected cost, projected quality of both choices with its
uncertainty (the Beta posterior's standard deviation, combined over the calls).
`execute: N` sends the user message of N changed calls again to the new model (in
the caller's default session, charged like any call) and reports measured cost and
latency; with `grader` (a model name) also the measured **quality**: the grader model
is asked to score each re-run answer to its request 0..10 (`adaptive_routing.
GRADER_PROMPT`; its first number / 10), the score is recorded as the re-run call's
feedback (`CallFeedback`, source `grader`: learned like any feedback) and reported next
to the recorded call's own feedback, if it had any. A grader reply without a number
gives `quality: null` and says so.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from services.orchestrator.keys import Caller
from services.orchestrator.read_models.routing import RoutingReadModel
from shared.contracts.events import (
    MessageAppended,
    ModelRouted,
    conversation_stream,
    llmcall_stream,
)
from shared.contracts.messages import ChatMessage
from shared.domain import adaptive_routing as ar
from shared.infra.eventstore import EventStore, ProjectionRunner

MAX_CALLS = 5000


class ReplayService:
    def __init__(self, store: EventStore, runner: ProjectionRunner, skills, calls) -> None:
        self.store = store
        self.runner = runner
        self.read = RoutingReadModel(store)
        self.skills = skills
        self.calls = calls

    async def replay(self, caller: Caller, since: datetime, until: datetime, *,
                     cost_weight: float | None = None, performance_weight: float | None = None,
                     models: list[str] | None = None, execute: int = 0,
                     grader: str | None = None, limit: int = MAX_CALLS) -> dict[str, Any]:
        # read-your-writes: the calls answered and the feedback given a moment ago count
        await self.runner.wait_for_head(("routing_stats",))
        routed = await self.read.routed_between(caller.tenant, since, until, limit)
        arms = await self.read.all_arms(caller.tenant)
        pooled: dict[str, ar.ArmStats] = {}
        for (_, model), s in arms.items():
            p = pooled.setdefault(model, ar.ArmStats())
            pooled[model] = ar.ArmStats(alpha=p.alpha + s.alpha, beta=p.beta + s.beta,
                                        sq=p.sq + s.sq)
        allowed = set(models) if models else None
        rows, changed = [], []
        totals = {"recorded_cost": 0.0, "projected_cost": 0.0, "recorded_quality": 0.0,
                  "projected_quality": 0.0, "recorded_var": 0.0, "projected_var": 0.0}
        for call in routed:
            event = next((r.event for r in await self.store.read_stream(llmcall_stream(call.call_id))
                          if isinstance(r.event, ModelRouted)), None)
            if event is None:
                continue
            skill = await self.skills.resolve(caller.tenant, event.skill)
            preferred = skill.spec.llm_routing.preferred if skill else event.candidates[0].model
            fallback = skill.spec.llm_routing.fallback if skill else ()
            candidates = []
            for c in event.candidates:
                stats = arms.get((event.cluster, c.model))
                candidates.append(ar.Candidate(
                    model=c.model, quality=ar.posterior(stats, ar.prior_for(c.model, preferred, fallback),
                                                        pooled.get(c.model)),
                    cost=stats.cost_mean if stats and stats.cost_n else c.cost_micro_usd,
                    excluded=c.excluded))
            pw = performance_weight if performance_weight is not None else event.performance_weight
            cw = cost_weight if cost_weight is not None else event.cost_weight
            new = ar.redecide(candidates, pw, cw, allowed)
            old = ar.redecide(candidates, 1.0, 0.0, {event.pick})  # the recorded pick, as learned
            recorded_cost = float(call.cost_micro_usd if call.cost_micro_usd is not None else old.cost)
            totals["recorded_cost"] += recorded_cost
            totals["projected_cost"] += new.cost if new.pick else 0.0
            totals["recorded_quality"] += old.quality
            totals["projected_quality"] += new.quality
            totals["recorded_var"] += old.quality_std ** 2
            totals["projected_var"] += new.quality_std ** 2
            row = {"call_id": call.call_id, "session_id": call.session_id, "cluster": event.cluster,
                   "skill": event.skill, "recorded": event.pick, "counterfactual": new.pick,
                   "recorded_cost_micro_usd": recorded_cost,
                   "projected_cost_micro_usd": round(new.cost, 2),
                   "recorded_quality": round(old.quality, 4),
                   "projected_quality": round(new.quality, 4), "recorded_feedback": call.feedback}
            rows.append(row)
            if new.pick != event.pick:
                changed.append(row)
        n = len(rows)
        summary = {
            "calls": n, "changed": len(changed),
            "recorded_cost_micro_usd": round(totals["recorded_cost"], 2),
            "projected_cost_micro_usd": round(totals["projected_cost"], 2),
            "recorded_quality": round(totals["recorded_quality"] / n, 4) if n else None,
            "recorded_quality_std": round(math.sqrt(totals["recorded_var"]) / n, 4) if n else None,
            "projected_quality": round(totals["projected_quality"] / n, 4) if n else None,
            "projected_quality_std": round(math.sqrt(totals["projected_var"]) / n, 4) if n else None,
        }
        executed = [await self._execute(caller, row, grader) for row in changed[:max(0, execute)]]
        graded = [e["quality"] for e in executed if e.get("quality") is not None]
        summary["executed_quality"] = round(sum(graded) / len(graded), 4) if graded else None
        return {"since": since.isoformat(), "until": until.isoformat(),
                "routing": {"cost_weight": cost_weight, "performance_weight": performance_weight,
                            "models": models, "grader": grader},
                "summary": summary, "changed_calls": changed[:200], "executed": executed}

    async def _execute(self, caller: Caller, row: dict[str, Any],
                       grader: str | None = None) -> dict[str, Any]:
        from services.orchestrator.calls import CallInput  # the call path, as any client

        events = await self.store.read_stream(conversation_stream(row["session_id"]))
        text = next((r.event.content for r in events if isinstance(r.event, MessageAppended)
                     and r.event.call_id == row["call_id"] and r.event.role == "user"), None)
        if text is None or row["counterfactual"] is None:
            return {"call_id": row["call_id"], "error": "the recorded request was not found"}
        try:
            opened = await self.calls.open(caller, CallInput(
                session_id=None, model=row["counterfactual"], stream=False,
                messages=(ChatMessage(role="user", content=text),)))
            done, answer, _ = await opened.collect()
        except Exception as exc:  # a refusal or failure is a finding of the replay
            return {"call_id": row["call_id"], "model": row["counterfactual"], "error": str(exc)}
        out = {"call_id": row["call_id"], "model": row["counterfactual"],
               "replay_call_id": opened.call_id, "cost_micro_usd": done.cost_micro_usd,
               "latency_ms": done.latency_ms, "recorded_cost_micro_usd": row["recorded_cost_micro_usd"],
               "recorded_feedback": row["recorded_feedback"], "quality": None}
        if grader:
            out.update(await self._grade(caller, grader, opened.call_id, text, answer))
        return out

    async def _grade(self, caller: Caller, grader: str, call_id: str, request: str,
                     answer: str) -> dict[str, Any]:
        """The grader's score of a re-run answer, recorded as that call's feedback."""
        from services.orchestrator.calls import CallInput
        from services.orchestrator.explain import CallExplainer

        try:
            opened = await self.calls.open(caller, CallInput(
                session_id=None, model=grader, max_tokens=8, temperature=0.0, stream=False,
                messages=tuple(ChatMessage(role=r, content=t)
                               for r, t in ar.grader_messages(request, answer))))
            _, reply, _ = await opened.collect()
        except Exception as exc:
            return {"grader_call_id": None, "quality_error": f"the grader failed: {exc}"}
        score = ar.parse_grade(reply)
        if score is None:
            return {"grader_call_id": opened.call_id,
                    "quality_error": f"the grader's reply has no score 0..10: {reply[:200]!r}"}
        await CallExplainer(self.store).feedback(caller, call_id, score, source="grader")
        return {"grader_call_id": opened.call_id, "quality": score}
