"""Adaptive model routing (pure): clusters, learned statistics, the scoring rule,
Thompson sampling, the skill matcher and the counterfactual re-decision of replays.

The pipeline per call (Avengers-Pro's idea, learned online from Nexus's own events):

1. the request's embedding is assigned to a **cluster** (`assign_cluster`: leader
   clustering; the nearest centroid with cosine >= threshold, else a new cluster; the
   centroids never move, so a replay re-assigns exactly);
2. for `auto`, the **skill** whose description and examples are nearest, with its
   confidence (`match_skill`);
3. each candidate model of the skill gets a **quality** posterior Beta(a, b) per
   (cluster, model) from feedback scores (`fold_feedback`: discounted, each score
   worth as much as the scores' observed spread says (`precision`), and a change
   detector (CUSUM on the standardised residuals) that makes an arm forget what came
   before a drop, so a model that degrades is noticed within a few of its calls) on
   top of a prior from the skill (`prior_for`: preferred > fallback > other), the
   model's stats over all clusters filling in what a young cluster lacks; and an
   expected **cost** per call from `LLMCallCompleted` (`fold_cost`; before any, the
   list price at the call's expected tokens);
4. the **score** is `performance_weight * quality - cost_weight * cost / max_cost`
   (quality is in 0..1 already; cost is normalised by the dearest candidate, so both
   terms are in 0..1); the pick maximises the score of a quality *sampled* from each
   posterior (Thompson sampling), so a new or rarely used model still gets tried;
   `exploration` says the pick differs from the best by posterior means.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

# each new observation of an arm weighs 1, the past is discounted by this much per
# observation (an effective memory of ~1/(1-DISCOUNT) = 33 scores)
DISCOUNT = 0.97
PRIOR_PREFERRED = (3.0, 1.0)  # Beta prior: mean 0.75, worth 4 observations
PRIOR_FALLBACK = (2.0, 1.0)   # mean 0.67
PRIOR_OTHER = (1.0, 1.0)      # uniform
EXPECTED_OUTPUT_TOKENS = 256  # a call's answer length before its cost is learned
CLUSTER_THRESHOLD = 0.82      # cosine (multilingual-e5-small) to join a cluster (bench: 93% pure)
POOL_WEIGHT = 2.0             # a cluster's evidence the model's stats over all clusters fill in up to
MAX_CLUSTERS = 256            # per tenant; beyond, the nearest cluster takes the request
MATCH_TEMPERATURE = 0.01      # softmax temperature over the skills' similarities
MATCH_THRESHOLD = 0.55        # below this confidence, `auto` uses the default skill
# The scores' spread: a score is not a coin toss (a Bernoulli's variance m(1-m) would
# make every posterior far wider than the evidence); the observed variance of an arm's
# scores, shrunk towards VARIANCE_PRIOR (worth VARIANCE_PRIOR_N scores) and floored,
# sets how much one score is worth (`precision`, at most MAX_PRECISION coin tosses).
VARIANCE_PRIOR = 0.04         # sd 0.2
VARIANCE_PRIOR_N = 4.0
VARIANCE_FLOOR = 0.0025       # sd 0.05
MAX_PRECISION = 25.0
# Change detection (a one-sided CUSUM on the standardised residuals of the feedback,
# "is this model now worse than it was?"): each score adds (mean - score) / sd -
# DRIFT_K; above DRIFT_H the arm forgets everything before the run of bad scores
# that raised the alarm (it restarts from them). A drop of 5 sd is caught at its first
# or second score. Measured false alarms under stationary feedback (20,000 scores
# each): about 9 per 10,000 scores for N(0.86, 0.1), 33 for N(0.6, 0.25), 95 for
# thumbs up/down at 80% up; a false alarm only makes the arm relearn from its last
# few scores (the pool fills in meanwhile).
DRIFT_K = 0.5
DRIFT_H = 4.0
DRIFT_MIN_WEIGHT = 3.0        # no alarm before the arm knows this many scores


class ArmStats(msgspec.Struct, kw_only=True):
    """What is learned of one (cluster, model): discounted feedback, its spread, the
    change detector's state, and the mean cost per call."""

    alpha: float = 0.0  # discounted sum of scores
    beta: float = 0.0   # discounted sum of (1 - score)
    feedback_n: int = 0
    cost_n: int = 0
    cost_mean: float = 0.0  # micro-USD per call
    sq: float = 0.0       # discounted sum of squared scores
    cusum: float = 0.0    # the change detector's statistic
    run_n: int = 0        # the scores since the statistic last left 0 (the suspected change)
    run_sum: float = 0.0
    run_sq: float = 0.0
    resets: int = 0       # changes detected

    @property
    def weight(self) -> float:
        return self.alpha + self.beta

    @property
    def mean(self) -> float:
        return self.alpha / self.weight if self.weight > 0 else 0.0

    @property
    def variance(self) -> float:
        """The scores' variance, shrunk towards VARIANCE_PRIOR, floored."""
        n = self.weight
        raw = max(0.0, self.sq / n - self.mean ** 2) if n > 0 else 0.0
        return max(VARIANCE_FLOOR, (n * raw + VARIANCE_PRIOR_N * VARIANCE_PRIOR) / (n + VARIANCE_PRIOR_N))


def fold_feedback(stats: ArmStats, score: float) -> ArmStats:
    """One score: discounted into the arm, and into the change detector; on an alarm
    the arm restarts from the run of scores that raised it."""
    score = min(1.0, max(0.0, score))
    cusum = 0.0
    if stats.weight >= DRIFT_MIN_WEIGHT:
        z = (stats.mean - score) / math.sqrt(stats.variance)
        cusum = max(0.0, stats.cusum + z - DRIFT_K)
    if cusum > 0:
        run_n, run_sum, run_sq = stats.run_n + 1, stats.run_sum + score, stats.run_sq + score * score
    else:
        run_n, run_sum, run_sq = 0, 0.0, 0.0
    n, cost_n, cost_mean = stats.feedback_n + 1, stats.cost_n, stats.cost_mean
    if cusum > DRIFT_H:  # the model changed: what came before the run no longer holds
        return ArmStats(alpha=run_sum, beta=run_n - run_sum, sq=run_sq, resets=stats.resets + 1,
                        feedback_n=n, cost_n=cost_n, cost_mean=cost_mean)
    return ArmStats(alpha=stats.alpha * DISCOUNT + score, beta=stats.beta * DISCOUNT + 1 - score,
                    sq=stats.sq * DISCOUNT + score * score, cusum=cusum, run_n=run_n,
                    run_sum=run_sum, run_sq=run_sq, resets=stats.resets, feedback_n=n,
                    cost_n=cost_n, cost_mean=cost_mean)


def fold_cost(stats: ArmStats, micro_usd: float) -> ArmStats:
    n = stats.cost_n + 1
    return msgspec.structs.replace(stats, cost_n=n,
                                   cost_mean=stats.cost_mean + (micro_usd - stats.cost_mean) / n)


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
    """Prior + this cluster's stats + the model's stats over all clusters filling in
    what the cluster lacks of `POOL_WEIGHT` scores (a new cluster starts from what the
    model does elsewhere; one that knows enough, or just detected a change, from its
    own), each score weighted by the evidence's `precision`."""
    s = stats or ArmStats()
    alpha, beta, sq = s.alpha, s.beta, s.sq
    if pooled is not None and pooled.weight > 0 and s.weight < POOL_WEIGHT:
        f = min(1.0, (POOL_WEIGHT - s.weight) / pooled.weight)
        alpha, beta, sq = alpha + pooled.alpha * f, beta + pooled.beta * f, sq + pooled.sq * f
    if alpha + beta <= 0:
        return Posterior(prior[0], prior[1])
    k = precision(ArmStats(alpha=alpha, beta=beta, sq=sq))
    return Posterior(prior[0] + k * alpha, prior[1] + k * beta)


def precision(stats: ArmStats) -> float:
    """How many coin tosses one score is worth: m(1-m) / the scores' variance (a Beta
    posterior then has the spread of the evidence), 1..MAX_PRECISION."""
    m = stats.mean
    return min(MAX_PRECISION, max(1.0, m * (1 - m) / stats.variance))


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


def preferred_decision(candidates: Sequence[Candidate], order: Sequence[str],
                       performance_weight: float, cost_weight: float, why: str) -> Decision:
    """No learning possible (no embedding, so no cluster): the first model of the
    skill's `order` (preferred, then fallback) that is allowed and served, the others
    after it; candidates still scored by their posterior means, for explain."""
    scored = decide(candidates, performance_weight, cost_weight, MeanSampler())
    live = [m for m in dict.fromkeys(order)
            if any(s.model == m and s.excluded is None for s in scored.candidates)]
    if not live:
        return scored
    return Decision(candidates=scored.candidates, pick=live[0], fallback=tuple(live[1:]),
                    exploration=False, reason=f"{live[0]}: the skill's first allowed model "
                                              f"in its preferred/fallback order ({why})")


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


class AgentFit(msgspec.Struct, frozen=True, kw_only=True):
    agent: str
    skill: str  # its skill nearest the task
    similarity: float


def select_agent(vector: Sequence[float],
                 agents: Sequence[tuple[str, Sequence[tuple[str, Sequence[Sequence[float]]]]]],
                 temperature: float = MATCH_TEMPERATURE) -> tuple[AgentFit | None, float, list[AgentFit]]:
    """The agent selector: each agent's fit is its best skill's similarity to the task
    (the skill's best cosine to its description and examples); the pick is the best
    fit, its confidence the softmax share (as `match_skill`) among the agents that
    list a skill. (None, 0, []) when no agent lists one. Ties: the first agent given."""
    fits = []
    for agent, skills in agents:
        scored = [(max((cosine(vector, v) for v in vectors), default=0.0), skill)
                  for skill, vectors in skills]
        if scored:
            sim, skill = max(scored, key=lambda x: x[0])
            fits.append(AgentFit(agent=agent, skill=skill, similarity=round(sim, 4)))
    if not fits:
        return None, 0.0, []
    fits.sort(key=lambda f: -f.similarity)
    top = fits[0].similarity
    z = sum(math.exp((f.similarity - top) / temperature) for f in fits)
    return fits[0], 1.0 / z, fits


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


# The grader of a replay's re-run answers (`POST /v1/replays` with `grader`): a model
# asked to score the answer to the request 0..10; the first number of its reply / 10.
GRADER_PROMPT = ("You grade answers. Rate how well the ANSWER serves the REQUEST, from 0 "
                 "(useless or wrong) to 10 (fully correct and helpful). Reply with the number only.")
_GRADE = re.compile(r"(?<![\w.])(10(?:\.0+)?|\d(?:\.\d+)?)(?!\w|\.\d)")


def grader_messages(request: str, answer: str) -> tuple[tuple[str, str], ...]:
    """(role, text) pairs of the grading call; both texts cut to 8,000 characters."""
    return (("system", GRADER_PROMPT),
            ("user", f"REQUEST:\n{request[:8000]}\n\nANSWER:\n{answer[:8000]}\n\nScore (0-10):"))


def parse_grade(reply: str) -> float | None:
    """The grader's score as 0..1 (its first number 0..10 / 10), None when it gave none."""
    m = _GRADE.search(reply[:2000])
    return float(m.group(1)) / 10 if m else None


def expected_cost(input_usd_per_mtok: float, output_usd_per_mtok: float, prompt_tokens: int,
                  output_tokens: int = EXPECTED_OUTPUT_TOKENS) -> float:
    """Micro-USD of a call at list price, before any cost is learned."""
    return prompt_tokens * input_usd_per_mtok + output_tokens * output_usd_per_mtok
