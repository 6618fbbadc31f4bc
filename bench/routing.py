"""Routing benchmark: does adaptive routing find the cheapest model that is good enough?

`python -m bench.routing [--n 1000] [--seed 7]`

1,000 prompts (bench/routing_prompts.py: six task types from templates, seeded), three
models whose quality per task type and price are declared here and hidden from the
router, a noisy feedback signal (the model's true quality + N(0, 0.1), clipped to 0..1),
and the router learning online, call by call, exactly as the orchestrator does: the real
embedding model (multilingual-e5-small, `shared.infra.embeddings`), the same clusters
(`assign_cluster`), posteriors, Thompson sampling and folds
(`shared.domain.adaptive_routing`), the skill's prior (preferred `large`). The learning
curve drives these domain functions directly (no HTTP: 1,000 calls through the platform
would measure the platform, not the router); tests/test_skills.py covers the platform
path.

Printed per weighting (performance, cost): mean quality and total cost after the first
300 calls for the router, always-cheapest, always-best and the oracle (per task the model
with the best true score under that weighting), and the ratios to always-best. Then the
drift experiment: at call 500 `medium`'s quality on code and math drops to 0.3; printed is
how many calls of those tasks it takes until the router stops choosing it (8 of the next
10 picks for those tasks avoid it), and the overall calls elapsed.
"""

from __future__ import annotations

import argparse
import random
import time

from bench.routing_prompts import TASKS, prompts
from shared.domain import adaptive_routing as ar
from shared.infra.embeddings import Embedder

# hidden from the router: quality per task type, price per million tokens (in, out)
QUALITY = {
    "small": {"code": .55, "translate": .90, "math": .45, "summarize": .86, "creative": .82, "facts": .60},
    "medium": {"code": .86, "translate": .91, "math": .84, "summarize": .88, "creative": .85, "facts": .86},
    "large": {"code": .92, "translate": .92, "math": .92, "summarize": .89, "creative": .87, "facts": .91},
}
PRICE = {"small": (0.15, 0.6), "medium": (1.0, 3.0), "large": (5.0, 15.0)}
OUTPUT_TOKENS = {"code": 400, "translate": 40, "math": 200, "summarize": 120, "creative": 80, "facts": 150}
PREFERRED, FALLBACK = "large", ("medium", "small")
WEIGHTINGS = ((1.0, 0.0), (0.9, 0.1), (0.85, 0.15), (0.7, 0.3), (0.5, 0.5), (0.3, 0.7))
WARMUP = 300


def cost(model: str, prompt: str, task: str) -> float:
    pin, pout = PRICE[model]
    return (len(prompt) // 4 + 8) * pin + OUTPUT_TOKENS[task] * pout  # micro-USD


def run(data, vectors, pw: float, cw: float, seed: int, drift_at: int | None = None):
    rng = random.Random(seed)
    noise = random.Random(seed + 1)
    quality = {m: dict(q) for m, q in QUALITY.items()}
    centroids: list[tuple[str, tuple[float, ...]]] = []
    stats: dict[tuple[str, str], ar.ArmStats] = {}
    picks = []
    for i, ((task, text), vector) in enumerate(zip(data, vectors)):
        if drift_at is not None and i == drift_at:
            quality["medium"].update(code=0.3, math=0.3)
        cluster, _ = ar.assign_cluster(vector, centroids)
        if cluster is None:
            cluster = f"c{len(centroids) + 1}"
            centroids.append((cluster, vector))
        candidates = []
        for m in QUALITY:
            own = stats.get((cluster, m))
            pooled = ar.ArmStats()
            for (_, model), s in stats.items():
                if model == m:
                    pooled = ar.ArmStats(alpha=pooled.alpha + s.alpha, beta=pooled.beta + s.beta,
                                         cost_n=pooled.cost_n + s.cost_n,
                                         cost_mean=s.cost_mean if s.cost_n else pooled.cost_mean)
            c = (own.cost_mean if own and own.cost_n else pooled.cost_mean if pooled.cost_n
                 else ar.expected_cost(*PRICE[m], len(text) // 4 + 8))
            candidates.append(ar.Candidate(
                model=m, quality=ar.posterior(own, ar.prior_for(m, PREFERRED, FALLBACK), pooled), cost=c))
        pick = ar.decide(candidates, pw, cw, rng).pick
        assert pick is not None
        true_q = quality[pick][task]
        spent = cost(pick, text, task)
        s = stats.get((cluster, pick), ar.ArmStats())
        s = ar.fold_cost(s, spent)
        s = ar.fold_feedback(s, min(1.0, max(0.0, true_q + noise.gauss(0, 0.1))))
        stats[(cluster, pick)] = s
        picks.append((task, pick, true_q, spent))
    return picks, len(centroids)


def baseline(data, choose) -> list[tuple[str, str, float, float]]:
    out = []
    for task, text in data:
        m = choose(task, text)
        out.append((task, m, QUALITY[m][task], cost(m, text, task)))
    return out


def summary(picks) -> tuple[float, float]:
    after = picks[WARMUP:]
    return sum(p[2] for p in after) / len(after), sum(p[3] for p in after)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    data = prompts(args.n, args.seed)
    embedder = Embedder()
    embedder.embed("warm up")
    t0 = time.perf_counter()
    vectors = [embedder.embed(text) for _, text in data]
    per = (time.perf_counter() - t0) / len(data) * 1000
    print(f"{len(data)} prompts, {len(TASKS)} task types, embedder {embedder.name}: "
          f"{per:.1f} ms per embedding (one thread)")
    cheapest = min(PRICE, key=lambda m: PRICE[m][1])
    best = max(QUALITY, key=lambda m: sum(QUALITY[m].values()))
    always_cheap = summary(baseline(data, lambda t, x: cheapest))
    always_best = summary(baseline(data, lambda t, x: best))
    print(f"always-cheapest ({cheapest}): quality {always_cheap[0]:.3f}, cost {always_cheap[1]:.0f}"
          f" micro-USD; always-best ({best}): quality {always_best[0]:.3f}, cost {always_best[1]:.0f}"
          f" (calls {WARMUP + 1}..{len(data)})")
    for pw, cw in WEIGHTINGS:
        def oracle(task, text, pw=pw, cw=cw):
            top = max(cost(m, text, task) for m in QUALITY)
            return max(QUALITY, key=lambda m: ar.score(QUALITY[m][task], cost(m, text, task), top, pw, cw))
        orc = summary(baseline(data, oracle))
        picks, clusters = run(data, vectors, pw, cw, args.seed)
        q, c = summary(picks)
        print(f"performance {pw:.2f} / cost {cw:.2f}: router quality {q:.3f} "
              f"({q / always_best[0]:.1%} of always-best) at cost {c:.0f} ({c / always_best[1]:.1%} of "
              f"always-best); oracle {orc[0]:.3f} at {orc[1]:.0f}; cheapest {always_cheap[0]:.3f}; "
              f"{clusters} clusters")
    # drift: medium degrades on code and math at call 500 (weighting 0.7 / 0.3)
    at = min(500, len(data) // 2)
    picks, _ = run(data, vectors, 0.7, 0.3, args.seed, drift_at=at)
    affected = [(i, p) for i, p in enumerate(picks) if i >= at and p[0] in ("code", "math")]
    before = [p for i, p in enumerate(picks) if WARMUP <= i < at and p[0] in ("code", "math")]
    share = sum(p[1] == "medium" for p in before) / max(1, len(before))
    shifted = None
    for k in range(len(affected) - 10):
        window = affected[k:k + 10]
        if sum(p[1] != "medium" for _, p in window) >= 8:
            shifted = (k, affected[k][0] - at)
            break
    print(f"drift at call {at}: medium's share of code/math before {share:.0%}; "
          + (f"choice shifted after {shifted[0]} code/math calls ({shifted[1]} calls overall)"
             if shifted else "choice did not shift"))


if __name__ == "__main__":
    main()
