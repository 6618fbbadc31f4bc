"""Skills and the adaptive router: the use cases behind `/v1/skills` and behind a call
asked of `model: "auto"` or `model: "skill:<name>"`.

`SkillService` holds the system skills (files in `skills/`) and the tenants' own
(`SkillDefined` events, the `skills` read model; a tenant's skill wins by name).

`SkillRouter.route` is the pipeline of docs/ARCHITECTURE.md "Skills and adaptive
routing": task analyzer (embedding -> cluster), skill matcher (`auto`), LLM router
(candidates the policy allows and the provider serves, scored on statistics learned
from the events, Thompson sampling). It answers the model to run, a `ModelInfo` whose
route is the pick's route followed by the fallback models' routes, and the
`ModelRouted` event the call lifecycle appends with its policy decision.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import msgspec

from services.orchestrator.keys import Caller
from services.orchestrator.read_models.routing import RoutingReadModel
from shared.contracts.errors import Conflict, InvalidEntity, InvalidRequest, NotFound
from shared.contracts.events import (
    AgentCandidate,
    AgentSelection,
    CallPlanned,
    Metadata,
    ModelRouted,
    RoutingCandidate,
    RoutingClusterCreated,
    SkillDefined,
    llmcall_stream,
    routing_stream,
    skill_stream,
)
from shared.contracts.messages import ChatMessage, ModelInfo, TargetInfo
from shared.domain import adaptive_routing as ar
from shared.domain.routing import route_of
from shared.domain.skills import (
    DEFAULT_SKILL,
    SkillError,
    SkillSpec,
    load_skill_files,
    parse_skill,
    validate_skill,
)
from shared.infra.embeddings import Embedder, EmbedderUnavailable
from shared.infra.eventstore import EventStore, ProjectionRunner, WrongExpectedVersion

log = logging.getLogger("nexus.orchestrator.skills")

SKILLS_DIR = Path(__file__).resolve().parents[2] / "skills"
AUTO = "auto"
SKILL_PREFIX = "skill:"


class SkillOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    source: str  # "system" or "tenant"
    spec: SkillSpec


def routed_model(model: str) -> bool:
    """Whether a requested model name asks the router: `auto` or `skill:<name>`."""
    return model == AUTO or model.startswith(SKILL_PREFIX)


class SkillService:
    def __init__(self, store: EventStore, runner: ProjectionRunner,
                 system: tuple[SkillSpec, ...] | None = None) -> None:
        self.store = store
        self.runner = runner
        self.read = RoutingReadModel(store)
        self.system = {s.name: s for s in (system if system is not None
                                           else load_skill_files(SKILLS_DIR))}

    async def list(self, caller: Caller) -> list[SkillOut]:
        await self.runner.wait_for_head(("skills",))
        out = {name: SkillOut(name=name, version=0, source="system", spec=spec)
               for name, spec in self.system.items()}
        for data, version in await self.read.skills(caller.tenant):
            spec = msgspec.convert(data, SkillSpec)
            out[spec.name] = SkillOut(name=spec.name, version=version, source="tenant", spec=spec)
        return sorted(out.values(), key=lambda s: s.name)

    async def resolve(self, tenant: str, name: str) -> SkillOut | None:
        found = await self.read.skill(tenant, name)
        if found is None and await self.store.stream_version(skill_stream(tenant, name)):
            await self.runner.wait_for_head(("skills",))
            found = await self.read.skill(tenant, name)
        if found is not None:
            data, version = found
            return SkillOut(name=name, version=version, source="tenant",
                            spec=msgspec.convert(data, SkillSpec))
        spec = self.system.get(name)
        return SkillOut(name=name, version=0, source="system", spec=spec) if spec else None

    async def get(self, caller: Caller, name: str) -> SkillOut:
        skill = await self.resolve(caller.tenant, name)
        if skill is None:
            raise NotFound("skill", name)
        return skill

    async def define(self, caller: Caller, data: dict, known_models: set[str], *,
                     expected_version: int | None = None) -> SkillOut:
        try:
            spec = validate_skill(parse_skill(data), known_models)
        except SkillError as exc:
            raise InvalidEntity(f"the skill definition is invalid: {exc}", exc.errors,
                                "skill.definition") from None
        stream = skill_stream(caller.tenant, spec.name)
        current = await self.store.stream_version(stream)
        if expected_version is not None and expected_version != current:
            raise Conflict(f"skill {spec.name!r} is at version {current}, not {expected_version}")
        try:
            result = await self.store.append(
                stream, [SkillDefined(tenant=caller.tenant, name=spec.name,
                                      spec=msgspec.to_builtins(spec))],
                expected_version=current, metadata=Metadata(tenant=caller.tenant, actor=caller.actor))
        except WrongExpectedVersion:
            raise Conflict(f"skill {spec.name!r} was redefined meanwhile; read it and retry") from None
        await self.runner.wait_for(result.last_position, names=("skills",))
        return SkillOut(name=spec.name, version=result.next_expected_version, source="tenant", spec=spec)


@dataclass
class Routed:
    model: str  # the pick
    info: ModelInfo  # its route, then the fallback models' routes
    event: ModelRouted

    def with_events(self, call_id: str, events: tuple[tuple[str, list], ...]
                    ) -> tuple[tuple[str, list], ...]:
        """The admission's events with `ModelRouted` first on the call's stream."""
        routed = msgspec.structs.replace(self.event, call_id=call_id)
        stream = llmcall_stream(call_id)
        mine = [e for s, e in events if s == stream]
        return ((stream, [routed, *(mine[0] if mine else [])]),
                *((s, e) for s, e in events if s != stream))


def merged_info(pick: str, fallback: tuple[str, ...], models: dict[str, ModelInfo]) -> ModelInfo:
    """The pick's route followed by the fallback models' routes (each target once);
    worst-case prices over the whole chain, the smallest context."""
    chain = [models[pick], *(models[m] for m in fallback)]
    seen: dict[str, TargetInfo] = {}
    for info in chain:
        for target in route_of(info):
            seen.setdefault(target.name, TargetInfo(name=target.name, provider=target.provider,
                                                    model=target.model, hosted=target.hosted,
                                                    on_node=target.on_node))
    return ModelInfo(name=pick, targets=tuple(seen), target_info=tuple(seen.values()),
                     input_usd_per_mtok=max(i.input_usd_per_mtok for i in chain),
                     output_usd_per_mtok=max(i.output_usd_per_mtok for i in chain),
                     context=min(i.context for i in chain),
                     node_models=tuple(dict.fromkeys(m for i in chain for m in i.node_models)))


class SkillRouter:
    """Decides the model of a routed call (see the module docstring)."""

    def __init__(self, store: EventStore, skills: SkillService, embedder: Embedder | None = None,
                 *, cluster_threshold: float = ar.CLUSTER_THRESHOLD,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.skills = skills
        self.read = skills.read
        self.embedder = embedder or Embedder()
        self.cluster_threshold = cluster_threshold
        self.rng = rng or random.Random()
        self._clusters: dict[str, tuple[int, list[tuple[str, tuple[float, ...]]]]] = {}
        self._skill_vectors: dict[tuple[str, str, int], list[tuple[float, ...]]] = {}

    # -- task analyzer ----------------------------------------------------------------

    async def _load_clusters(self, tenant: str) -> tuple[int, list[tuple[str, tuple[float, ...]]]]:
        events = await self.store.read_stream(routing_stream(tenant))
        clusters = [(e.event.cluster, tuple(e.event.centroid)) for e in events
                    if isinstance(e.event, RoutingClusterCreated)]
        state = (events[-1].stream_version if events else 0, clusters)
        self._clusters[tenant] = state
        return state

    async def cluster_of(self, tenant: str, vector: tuple[float, ...]) -> str:
        state = self._clusters.get(tenant) or await self._load_clusters(tenant)
        for _ in range(5):
            version, clusters = state
            found, _ = ar.assign_cluster(vector, clusters, self.cluster_threshold)
            if found is not None:
                return found
            cluster = f"c{len(clusters) + 1}"
            try:
                await self.store.append(routing_stream(tenant), [RoutingClusterCreated(
                    tenant=tenant, cluster=cluster, centroid=vector)], expected_version=version,
                    metadata=Metadata(tenant=tenant))
            except WrongExpectedVersion:  # another orchestrator made one meanwhile
                state = await self._load_clusters(tenant)
                continue
            self._clusters[tenant] = (version + 1, [*clusters, (cluster, vector)])
            return cluster
        return ar.assign_cluster(vector, state[1], -2.0)[0] or "c0"

    async def _vectors(self, tenant: str, skill: SkillOut) -> list[tuple[float, ...]]:
        key = (tenant if skill.source == "tenant" else "", skill.name, skill.version)
        if key not in self._skill_vectors:
            texts = [skill.spec.description, *skill.spec.examples]
            self._skill_vectors[key] = [await self.embedder.aembed(t) for t in texts]
        return self._skill_vectors[key]

    # -- the pipeline -----------------------------------------------------------------

    async def route(self, caller: Caller, session, requested: str,
                    messages: tuple[ChatMessage, ...], models: dict[str, ModelInfo],
                    policies) -> Routed:
        """The routed model of a call of `session` (a `SessionView`); its `ModelRouted`
        gets the call id in `Routed.with_events`."""
        policy, _ = await policies.compiled(caller.tenant, session.policy,
                                            session.policy_version, session.policy_rules)
        prompt_tokens = sum(len(m.text) for m in messages) // 4 + 4 * len(messages)
        session_id, call_id = session.session_id, ""
        text = next((m.text for m in reversed(messages) if m.role == "user"), messages[-1].text)
        unembedded = ""
        try:
            vector: tuple[float, ...] | None = await self.embedder.aembed(text)
        except EmbedderUnavailable as exc:  # no AVX2/FMA: the skill's preferred model
            vector, unembedded = None, str(exc)
        cluster = await self.cluster_of(caller.tenant, vector) if vector is not None else ""
        if vector is None:
            name, confidence, matched_by = (DEFAULT_SKILL, 0.0, "default") if requested == AUTO \
                else (requested[len(SKILL_PREFIX):], 1.0, "explicit")
        elif requested == AUTO:
            skills = [s for s in await self.skills.list(caller)]
            _, _, traffic = await self.read.arms(caller.tenant, cluster, [])
            pairs = [(s.name, await self._vectors(caller.tenant, s)) for s in skills]
            name, confidence, matched_by = ar.match_skill(vector, pairs, traffic, default=DEFAULT_SKILL)
        else:
            name, confidence, matched_by = requested[len(SKILL_PREFIX):], 1.0, "explicit"
        skill = await self.skills.resolve(caller.tenant, name)
        if skill is None:
            raise InvalidRequest(f"model: no skill named {name!r}",
                                 [{"field": "model", "message": f"unknown skill {name!r}"}])
        spec, routing = skill.spec, skill.spec.llm_routing
        own, pooled, _ = await self.read.arms(caller.tenant, cluster, list(spec.models))
        candidates = []
        for model in spec.models:
            info = models.get(model)
            excluded = None if info is not None else "not_served"
            if info is not None and policy is not None:
                verdicts = [policy.evaluate_target(model, t.facts()) for t in route_of(info)]
                if not any(v.allowed for v in verdicts):
                    excluded = verdicts[0].rule
            stats = own.get(model)
            prior = ar.prior_for(model, routing.preferred, routing.fallback)
            cost = (stats.cost_mean if stats and stats.cost_n else
                    pooled[model].cost_mean if model in pooled and pooled[model].cost_n else
                    ar.expected_cost(info.input_usd_per_mtok, info.output_usd_per_mtok, prompt_tokens)
                    if info else 0.0)
            candidates.append(ar.Candidate(
                model=model, quality=ar.posterior(stats, prior, pooled.get(model)),
                quality_n=stats.weight if stats else 0.0, cost=cost,
                cost_n=stats.cost_n if stats else 0, excluded=excluded))
        decision = ar.decide(candidates, routing.performance_weight, routing.cost_weight, self.rng) \
            if vector is not None else ar.preferred_decision(
                candidates, (routing.preferred, *routing.fallback), routing.performance_weight,
                routing.cost_weight, f"no embedding: {unembedded}")
        if decision.pick is None:
            raise InvalidRequest(
                f"model: no model of skill {name!r} is both served and allowed by the policy",
                [{"field": "model", "message": "; ".join(
                    f"{c.model}: {c.excluded}" for c in candidates)}])
        # the skill's fallback order (those allowed and served) after the pick
        fallback = tuple(m for m in (routing.preferred, *routing.fallback)
                         if m != decision.pick and m in decision.fallback)
        event = ModelRouted(
            call_id=call_id, session_id=session_id, requested=requested, skill=name,
            skill_version=skill.version, matched_by=matched_by, confidence=round(confidence, 4),
            cluster=cluster,
            embedder=self.embedder.name if vector is not None else "unavailable",
            cost_weight=routing.cost_weight, performance_weight=routing.performance_weight,
            candidates=tuple(RoutingCandidate(
                model=s.model, quality=round(s.quality, 4), quality_sample=round(s.quality_sample, 4),
                quality_n=round(s.quality_n, 2), cost_micro_usd=round(s.cost, 2), cost_n=s.cost_n,
                score=round(s.score, 4), excluded=s.excluded) for s in decision.candidates),
            pick=decision.pick, fallback=fallback, reason=decision.reason,
            exploration=decision.exploration)
        return Routed(decision.pick, merged_info(decision.pick, fallback, models), event)


class AgentSelector:
    """Pipeline step 4: a run that names no agent (or `auto`) gets the agent whose
    skills fit its task best (`adaptive_routing.select_agent`): the task embedded as
    the router embeds a request, each visible agent's `skills` (the tenant's own
    skills or the system's; a name that is no skill is left out) by their description
    and examples. No agent listing a skill, or no embedding model on this CPU: a 422
    naming `agent` (name one)."""

    def __init__(self, router: SkillRouter, agents) -> None:
        self.router = router
        self.agents = agents  # AgentService: list(caller)

    async def select(self, caller: Caller, task: str, requested: str = "") -> AgentSelection:
        try:
            vector = await self.router.embedder.aembed(task)
        except EmbedderUnavailable as exc:
            raise InvalidEntity(f"agent: no agent named and none can be chosen here ({exc})",
                                [{"field": "agent", "message": "name the agent to run"}],
                                "run.agent") from None
        pairs = []
        for out in await self.agents.list(caller):
            skills = []
            for name in out.skills:
                skill = await self.router.skills.resolve(caller.tenant, name)
                if skill is not None:
                    skills.append((name, await self.router._vectors(caller.tenant, skill)))
            pairs.append((out.name, skills))
        best, confidence, fits = ar.select_agent(vector, pairs)
        if best is None:
            raise InvalidEntity("agent: no agent named, and no agent lists skills to choose by",
                                [{"field": "agent", "message": "name the agent to run, or give "
                                  "agents `skills` in their front matter"}], "run.agent")
        return AgentSelection(
            requested=requested, agent=best.agent, skill=best.skill,
            confidence=round(confidence, 4), embedder=self.router.embedder.name,
            candidates=tuple(AgentCandidate(agent=f.agent, skill=f.skill, similarity=f.similarity)
                             for f in fits[:20]))


def planned_event(call_id: str, plan, fleet) -> CallPlanned:
    """A call's plan as an event, with each planned node's load from the selector's view."""
    strategy, loads = plan_loads(plan, fleet)
    return CallPlanned(call_id=call_id, targets=tuple(t.name for t in plan.targets),
                       nodes=dict(plan.nodes), strategy=strategy, loads=loads)


def plan_loads(plan, fleet) -> tuple[str, tuple[dict, ...]]:
    """The node strategy and each planned node's load from the selector's view."""
    selector = getattr(fleet, "selector", None)
    view = getattr(selector, "view", None)
    loads = []
    for node_id in dict.fromkeys(n for t in plan.targets for n in t.nodes):
        node = getattr(view, "nodes", {}).get(node_id) if view is not None else None
        loads.append({"node": node_id, **({k: getattr(node, k, None) for k in (
            "active_requests", "queue_depth", "cpu_pct", "memory_pct", "gpu_util_pct")}
            if node is not None else {})})
    return str(getattr(selector, "strategy", "") or ""), tuple(loads)
