"""Adaptive model routing (pure): clusters, learned statistics, the scoring rule,
Thompson sampling, the skill matcher and the counterfactual re-decision of replays.

The pipeline per call (Avengers-Pro's idea, learned online from Nexus's own events):

1. the request's embedding is assigned to a **cluster** (`assign_cluster`: leader
   clustering; the nearest centroid with cosine >= threshold, else a new cluster; the
   centroids never move, so a replay re-assigns exactly);
2. for `auto`, the **skill** whose description and examples are nearest, with its
   confidence (`match_skill`);
3. each candidate model of the skill gets a **quality** posterior Beta(a, b) per
   (cluster, model) from feedback scores (`fold_feedback`, with a discount so a model
   that degrades is noticed) on top of a prior from the skill (`prior_for`: preferred
   > fallback > other), and an expected **cost** per call from `LLMCallCompleted`
   (`fold_cost`; before any, the list price at the call's expected tokens);
4. the **score** is `performance_weight * quality - cost_weight * cost / max_cost`
   (quality is in 0..1 already; cost is normalised by the dearest candidate, so both
   terms are in 0..1); the pick maximises the score of a quality *sampled* from each
   posterior (Thompson sampling), so a new or rarely used model still gets tried;
   `exploration` says the pick differs from the best by posterior means.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

# each new observation of an arm weighs 1, the past is discounted by this much per
# observation (an effective memory of ~1/(1-DISCOUNT) = 33 scores): a model whose
# quality drops is noticed within a few dozen of its calls
DISCOUNT = 0.97
PRIOR_PREFERRED = (3.0, 1.0)  # Beta prior: mean 0.75, worth 4 observations
PRIOR_FALLBACK = (2.0, 1.0)   # mean 0.67
PRIOR_OTHER = (1.0, 1.0)      # uniform
EXPECTED_OUTPUT_TOKENS = 256  # a call's answer length before its cost is learned
CLUSTER_THRESHOLD = 0.82      # cosine (multilingual-e5-small) to join a cluster (bench: 93% pure)
POOL_WEIGHT = 4.0             # the model's stats over all the tenant's clusters, worth this many scores
MAX_CLUSTERS = 256            # per tenant; beyond, the nearest cluster takes the request
MATCH_TEMPERATURE = 0.01      # softmax temperature over the skills' similarities
MATCH_THRESHOLD = 0.55        # below this confidence, `auto` uses the default skill


class ArmStats(msgspec.Struct, kw_only=True):
    """What is learned of one (cluster, model): discounted feedback and mean cost."""

    alpha: float = 0.0  # discounted sum of scores
    beta: float = 0.0   # discounted sum of (1 - score)
    feedback_n: int = 0
    cost_n: int = 0
    cost_mean: float = 0.0  # micro-USD per call

    @property
    def weight(self) -> float:
        return self.alpha + self.beta


def fold_feedback(stats: ArmStats, score: float) -> ArmStats:
    score = min(1.0, max(0.0, score))
    return ArmStats(alpha=stats.alpha * DISCOUNT + score, beta=stats.beta * DISCOUNT + 1 - score,
                    feedback_n=stats.feedback_n + 1, cost_n=stats.cost_n, cost_mean=stats.cost_mean)


def fold_cost(stats: ArmStats, micro_usd: float) -> ArmStats:
    n = stats.cost_n + 1
    return ArmStats(alpha=stats.alpha, beta=stats.beta, feedback_n=stats.feedback_n,
                    cost_n=n, cost_mean=stats.cost_mean + (micro_usd - stats.cost_mean) / n)


def prior_for(model: str, preferred: str, fallback: Sequence[str]) -> tuple[float, float]:
    if model == preferred:
        return PRIOR_PREFERRED
    if model in fallback:
        return PRIOR_FALLBACK
    return PRIOR_OTHER


class Posterior(msgspec.Struct, frozen=True):
    a: float
    b: float

    @property
    def mean(self) -> float:
        return self.a / (self.a + self.b)

    @property
    def std(self) -> float:
        n = self.a + self.b
        return math.sqrt(self.a * self.b / (n * n * (n + 1)))


def posterior(stats: ArmStats | None, prior: tuple[float, float],
              pooled: ArmStats | None = None) -> Posterior:
    """Prior + the model's stats over all clusters (shrunk to `POOL_WEIGHT` scores: a new
    cluster starts from what the model does elsewhere) + this cluster's own."""
    s = stats or ArmStats()
    a, b = prior[0] + s.alpha, prior[1] + s.beta
    if pooled is not None and pooled.weight > 0:
        f = min(1.0, POOL_WEIGHT / pooled.weight)
        a, b = a + pooled.alpha * f, b + pooled.beta * f
    return Posterior(a, b)


def score(quality: float, cost: float, max_cost: float, performance_weight: float,
          cost_weight: float) -> float:
    """The scoring rule: both terms normalised to 0..1 (cost by the dearest candidate)."""
    norm = cost / max_cost if max_cost > 0 else 0.0
    return performance_weight * quality - cost_weight * norm


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """A model the router may pick: its posterior, expected cost, or why it is excluded."""

    model: str
    quality: Posterior
    quality_n: float = 0.0
    cost: float = 0.0
    cost_n: int = 0
    excluded: str | None = None  # the policy rule that denies it, or "not_served"


class Scored(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    quality: float
    quality_sample: float
    quality_n: float
    cost: float
    cost_n: int
    score: float
    mean_score: float
    excluded: str | None = None


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    candidates: tuple[Scored, ...]
    pick: str | None
    fallback: tuple[str, ...]
    exploration: bool
    reason: str


class Sampler(Protocol):
    def betavariate(self, alpha: float, beta: float) -> float: ...


class MeanSampler:
    """No exploration: every 'sample' is the posterior mean (replays, the greedy check)."""

    def betavariate(self, alpha: float, beta: float) -> float:
        return alpha / (alpha + beta)


def decide(candidates: Sequence[Candidate], performance_weight: float, cost_weight: float,
           sampler: Sampler | None = None) -> Decision:
    """Score every allowed candidate and pick one (see the module docstring)."""
    sampler = sampler or random.Random()
    allowed = [c for c in candidates if c.excluded is None]
    max_cost = max((c.cost for c in allowed), default=0.0)
    scored: list[Scored] = []
    for c in candidates:
        if c.excluded is not None:
            scored.append(Scored(model=c.model, quality=c.quality.mean, quality_sample=0.0,
                                 quality_n=c.quality_n, cost=c.cost, cost_n=c.cost_n, score=0.0,
                                 mean_score=0.0, excluded=c.excluded))
            continue
        sample = sampler.betavariate(c.quality.a, c.quality.b)
        scored.append(Scored(
            model=c.model, quality=c.quality.mean, quality_sample=sample, quality_n=c.quality_n,
            cost=c.cost, cost_n=c.cost_n,
            score=score(sample, c.cost, max_cost, performance_weight, cost_weight),
            mean_score=score(c.quality.mean, c.cost, max_cost, performance_weight, cost_weight)))
    live = [s for s in scored if s.excluded is None]
    if not live:
        return Decision(candidates=tuple(scored), pick=None, fallback=(), exploration=False,
                        reason="no candidate model is allowed and served")
    best = max(live, key=lambda s: (s.score, -s.cost))
    greedy = max(live, key=lambda s: (s.mean_score, -s.cost))
    rest = sorted((s for s in live if s is not best), key=lambda s: -s.mean_score)
    exploration = best.model != greedy.model
    reason = (f"{best.model}: highest score {best.score:.3f} = {performance_weight:g} x quality "
              f"{best.quality_sample:.3f} - {cost_weight:g} x cost {best.cost:.0f}/{max_cost:.0f} "
              f"micro-USD" + (f"; exploring (best by posterior mean: {greedy.model})"
                              if exploration else ""))
    return Decision(candidates=tuple(scored), pick=best.model,
                    fallback=tuple(s.model for s in rest), exploration=exploration, reason=reason)


# -- clusters and skill matching ---------------------------------------------------------


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def assign_cluster(vector: Sequence[float], centroids: Iterable[tuple[str, Sequence[float]]],
                   threshold: float = CLUSTER_THRESHOLD,
                   max_clusters: int = MAX_CLUSTERS) -> tuple[str | None, float]:
    """The nearest cluster when it is near enough (cosine >= threshold), or when no new
    one may be made; else (None, best similarity): the request starts a new cluster."""
    best, best_sim, n = None, -1.0, 0
    for cluster, centroid in centroids:
        n += 1
        sim = cosine(vector, centroid)
        if sim > best_sim:
            best, best_sim = cluster, sim
    if best is not None and (best_sim >= threshold or n >= max_clusters):
        return best, best_sim
    return None, best_sim


def match_skill(vector: Sequence[float], skills: Sequence[tuple[str, Sequence[Sequence[float]]]],
                traffic: dict[str, int] | None = None, *, default: str,
                threshold: float = MATCH_THRESHOLD,
                temperature: float = MATCH_TEMPERATURE) -> tuple[str, float, str]:
    """`auto`: the skill nearest the request (its best cosine to the skill's description
    and examples), plus a small bonus for the skills this cluster's past traffic asked
    for by name (up to +0.02 for all of it). The confidence is the softmax share of the
    winner; below `threshold`, the tenant's default skill ("default")."""
    if not skills:
        return default, 0.0, "default"
    total = sum((traffic or {}).values())
    sims = []
    for name, vectors in skills:
        sim = max((cosine(vector, v) for v in vectors), default=0.0)
        if total:
            sim += 0.02 * (traffic or {}).get(name, 0) / total
        sims.append((name, sim))
    top = max(s for _, s in sims)
    weights = [(name, math.exp((s - top) / temperature)) for name, s in sims]
    z = sum(w for _, w in weights)
    name, w = max(weights, key=lambda x: x[1])
    confidence = w / z
    if confidence < threshold:
        return default, confidence, "default"
    return name, confidence, "auto"


# -- replay ------------------------------------------------------------------------------


class Counterfactual(msgspec.Struct, frozen=True, kw_only=True):
    pick: str | None
    quality: float
    quality_std: float
    cost: float


def redecide(candidates: Sequence[Candidate], performance_weight: float, cost_weight: float,
             models: set[str] | None = None) -> Counterfactual:
    """A recorded call decided again under other weights or another model set, by the
    posterior means (no sampling: a replay is deterministic)."""
    pool = [c if models is None or c.model in models else
            msgspec.structs.replace(c, excluded=c.excluded or "not_in_model_set")
            for c in candidates]
    decision = decide(pool, performance_weight, cost_weight, MeanSampler())
    chosen = next((c for c in pool if c.model == decision.pick), None)
    if chosen is None:
        return Counterfactual(pick=None, quality=0.0, quality_std=0.0, cost=0.0)
    return Counterfactual(pick=chosen.model, quality=chosen.quality.mean,
                          quality_std=chosen.quality.std, cost=chosen.cost)


def expected_cost(input_usd_per_mtok: float, output_usd_per_mtok: float, prompt_tokens: int,
                  output_tokens: int = EXPECTED_OUTPUT_TOKENS) -> float:
    """Micro-USD of a call at list price, before any cost is learned."""
    return prompt_tokens * input_usd_per_mtok + output_tokens * output_usd_per_mtok
