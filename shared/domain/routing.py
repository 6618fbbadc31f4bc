"""One routing decision: which targets a call tries, in which order, on which nodes.

`plan_call(route, decision, fleet)` turns a route (the model's ordered fallback chain,
`RouteTarget`s), the session policy's verdict on the call (`Decision`, whose `targets`
hold each target's verdict and redaction; `None` when the session has no policy) and
the fleet (which nodes serve a runtime model, best first) into a `Plan`: the targets
the policy allows, in the route's order, each with what to redact before text leaves
for it and, when a node daemon serves it, the nodes to try. Targets the policy denied
are `dropped` (never tried). The orchestrator sends the plan in the
`CompletionRequest`; the provider executes it (attempts, retries, fallback along the
plan) and decides nothing of its own. Skill routing will plug in here (reordering or
filtering the route before the fleet is asked).

Pure but for the fleet: `Fleet.nodes_for` is asked once per node-served model of an
allowed target, never for a dropped one, so a selector that records dispatches
records only real ones (the orchestrator plans after the call is admitted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from shared.contracts.messages import ModelInfo, PlannedTarget, TargetInfo
from shared.domain.policy import Decision, TargetDecision, TargetFacts
from shared.domain.selection import NodeSelector, NoEligibleNode


class RouteTarget(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a route's fallback chain."""

    name: str  # "provider/model"
    provider: str
    model: str
    hosted: bool = True  # text sent to it leaves for a hosted provider (redaction applies)
    on_node: bool = False  # a node daemon serves it: the plan names the nodes

    def facts(self) -> TargetFacts:
        """The target as the policy sees it."""
        return TargetFacts(name=self.name, provider=self.provider, model=self.model,
                           hosted=self.hosted)


class Fleet(Protocol):
    def nodes_for(self, model: str) -> tuple[str, ...]:
        """The nodes to try for a runtime model, best first (empty: none serves it)."""


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    targets: tuple[PlannedTarget, ...]  # to try, in order
    dropped: tuple[TargetDecision, ...] = ()  # denied by the policy, never tried

    @property
    def nodes(self) -> dict[str, tuple[str, ...]]:
        """Runtime model -> the nodes planned for it (what the node adapter reads)."""
        return {t.model: t.nodes for t in self.targets if t.nodes}


def route_of(info: ModelInfo) -> tuple[RouteTarget, ...]:
    """A model's route as the provider described it."""
    if info.target_info:
        return tuple(RouteTarget(name=t.name, provider=t.provider, model=t.model,
                                 hosted=t.hosted,
                                 on_node=t.on_node or (not t.hosted and t.model in info.node_models))
                     for t in info.target_info)
    # a provider that sent no details: names only, each taken as hosted (redaction applies)
    return tuple(RouteTarget(name=name, provider=name.split("/", 1)[0],
                             model=name.split("/", 1)[-1]) for name in info.targets)


def plan_call(route: Sequence[RouteTarget], decision: Decision | None, fleet: Fleet) -> Plan:
    """The plan of an admitted call (see the module docstring).

    With a decision, a target is kept when its verdict allows it (with that verdict's
    redaction); a target without a verdict is dropped (the policy never saw it). Without
    a decision (no policy) every target is kept, nothing redacted.
    """
    verdicts = {v.target: v for v in decision.targets} if decision is not None else None
    planned: list[PlannedTarget] = []
    dropped: list[TargetDecision] = []
    asked: dict[str, tuple[str, ...]] = {}
    for target in route:
        verdict = verdicts.get(target.name) if verdicts is not None else None
        if verdicts is not None and (verdict is None or not verdict.allowed):
            if verdict is not None:
                dropped.append(verdict)
            continue
        nodes: tuple[str, ...] = ()
        if target.on_node:
            if target.model not in asked:
                asked[target.model] = tuple(fleet.nodes_for(target.model))
            nodes = asked[target.model]
        planned.append(PlannedTarget(
            name=target.name, provider=target.provider, model=target.model,
            hosted=target.hosted, redact=tuple(verdict.redact) if verdict is not None else (),
            nodes=nodes))
    return Plan(targets=tuple(planned), dropped=tuple(dropped))


def installed_model_info(model: str, provider: str, context: int) -> ModelInfo:
    """A model nodes serve (installed from the store or pulled by Ollama) that no route
    names: callable by its own name, as the one local target `<provider>/<model>` (no
    price: it runs on the fleet's own hardware; policies and token budgets still apply)."""
    name = f"{provider}/{model}"
    return ModelInfo(name=model, targets=(name,), target_info=(TargetInfo(
        name=name, provider=provider, model=model, hosted=False, on_node=True),),
        input_usd_per_mtok=0.0, output_usd_per_mtok=0.0, context=context,
        node_models=(model,))


class SelectorFleet:
    """The orchestrator's fleet: the selector's pick for a model, then a spare (another
    node) the provider tries when the first is busy. Each pick records a dispatch."""

    def __init__(self, selector: NodeSelector, per_model: int = 2) -> None:
        self.selector = selector
        self.per_model = per_model

    def served_models(self) -> frozenset[str]:
        """Every model an online, non-draining node serves now."""
        return frozenset(m for n in self.selector.view.nodes.values() if n.eligible
                         for m in n.models)

    def nodes_for(self, model: str) -> tuple[str, ...]:
        picks: list[str] = []
        for _ in range(self.per_model):
            try:
                node = self.selector.select(model=model).node_id
            except NoEligibleNode:
                break
            if node not in picks:
                picks.append(node)
        return tuple(picks)
