"""Routing benchmark: does adaptive routing find the cheapest model that is good enough?

`python -m bench.routing [--n 1000] [--seed 7] [--seeds 3] [--vectors FILE] [--real-model N]`

1,000 prompts (bench/routing_prompts.py: six task types from templates, seeded), three
models whose quality per task type and price are declared here and hidden from the
router, a noisy feedback signal (the model's true quality + N(0, 0.1), clipped to 0..1),
and the router learning online, call by call, exactly as the orchestrator does: the real
embedding model (multilingual-e5-small, `shared.infra.embeddings`), the same clusters
(`assign_cluster`), posteriors, Thompson sampling, folds and change detector
(`shared.domain.adaptive_routing`), the skill's prior (preferred `large`). The learning
curve drives these domain functions directly (no HTTP: 1,000 calls through the platform
would measure the platform, not the router); tests/test_skills.py covers the platform
path. The router never sees `QUALITY`: only the noisy score of the model it picked.

Printed per weighting (performance, cost): mean quality and total cost of calls
301..1000 for the router (mean over `--seeds` runs, each with its own exploration and
feedback noise), always-cheapest, always-best and the oracle (per task the model with
the best true score under that weighting), and the ratios to always-best.

**Drift** (weighting 0.7 / 0.3): at call 500 `medium`'s quality on code and math drops
to 0.3. The *affected calls* are the code and math calls after the drift. The choice
has **shifted** at the first affected call from which on, in every window of 10
consecutive affected calls up to the end of the run, `medium` is picked at most twice
(sustained, not a lucky window); "shift within N calls" counts all calls (every task
type) from the drift to that one. Also printed: how many affected calls still went to
`medium`, and how many changes the detector raised.

`--real-model N` (`--only-real`: just that): the node's real llama-server (the bundled
SmolLM2-135M, built by `nexus runtime prepare`, 2 threads) answers N prompts as `small`
over the OpenAI wire protocol (real HTTP, `--real-max-tokens`, default 48); each answer is scored by the declared checker below (`grade`), its cost
is its measured tokens at `small`'s price; printed: the measured quality per task, cost
and latency, then the router learning online on those N prompts with `small` being the
real model (its feedback: the checker's score of the real answer).
"""

from __future__ import annotations

import argparse
import pickle
import random
import re
import statistics
import time
from pathlib import Path

from bench.routing_prompts import TASKS, prompts
from shared.domain import adaptive_routing as ar

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
NOISE = 0.1
DRIFT_TASKS, DRIFT_QUALITY, DRIFT_MODEL = ("code", "math"), 0.3, "medium"
GOAL_QUALITY, GOAL_COST, GOAL_WEIGHTING, GOAL_SHIFT = 0.95, 0.50, (0.9, 0.1), 100


def cost(model: str, prompt: str, task: str) -> float:
    pin, pout = PRICE[model]
    return (len(prompt) // 4 + 8) * pin + OUTPUT_TOKENS[task] * pout  # micro-USD


def candidates(stats: dict[tuple[str, str], ar.ArmStats], cluster: str, text: str,
               models=tuple(QUALITY)) -> list[ar.Candidate]:
    """As `SkillRouter.route` builds them: this cluster's stats, the model's over all
    clusters (pooled), the skill's prior; cost learned, else the list price."""
    out = []
    for m in models:
        own = stats.get((cluster, m))
        pooled = ar.ArmStats()
        for (_, model), s in stats.items():
            if model == m:
                n = pooled.cost_n + s.cost_n
                pooled = ar.ArmStats(
                    alpha=pooled.alpha + s.alpha, beta=pooled.beta + s.beta, sq=pooled.sq + s.sq,
                    cost_n=n, cost_mean=(pooled.cost_mean * pooled.cost_n + s.cost_mean * s.cost_n) / n
                    if n else 0.0)
        c = (own.cost_mean if own and own.cost_n else pooled.cost_mean if pooled.cost_n
             else ar.expected_cost(*PRICE[m], len(text) // 4 + 8))
        out.append(ar.Candidate(model=m, quality=ar.posterior(own, ar.prior_for(m, PREFERRED, FALLBACK),
                                                              pooled), cost=c))
    return out


def run(data, vectors, pw: float, cw: float, seed: int, drift_at: int | None = None,
        outcome=None):
    """The router learning online; `outcome(i, task, text, model) -> (score, cost)`
    replaces the declared model (the real-model run)."""
    rng = random.Random(seed)
    noise = random.Random(seed + 1)
    quality = {m: dict(q) for m, q in QUALITY.items()}
    centroids: list[tuple[str, tuple[float, ...]]] = []
    stats: dict[tuple[str, str], ar.ArmStats] = {}
    picks = []
    for i, ((task, text), vector) in enumerate(zip(data, vectors)):
        if drift_at is not None and i == drift_at:
            quality[DRIFT_MODEL].update({t: DRIFT_QUALITY for t in DRIFT_TASKS})
        cluster, _ = ar.assign_cluster(vector, centroids)
        if cluster is None:
            cluster = f"c{len(centroids) + 1}"
            centroids.append((cluster, vector))
        pick = ar.decide(candidates(stats, cluster, text), pw, cw, rng).pick
        assert pick is not None
        measured = outcome(i, task, text, pick) if outcome is not None else None
        if measured is not None:
            true_q, spent = measured
            feedback = true_q
        else:
            true_q, spent = quality[pick][task], cost(pick, text, task)
            feedback = true_q + noise.gauss(0, NOISE)
        s = stats.get((cluster, pick), ar.ArmStats())
        s = ar.fold_feedback(ar.fold_cost(s, spent), min(1.0, max(0.0, feedback)))
        stats[(cluster, pick)] = s
        picks.append((task, pick, true_q, spent))
    resets = sum(s.resets for s in stats.values())
    return picks, len(centroids), resets


def baseline(data, choose) -> list[tuple[str, str, float, float]]:
    out = []
    for task, text in data:
        m = choose(task, text)
        out.append((task, m, QUALITY[m][task], cost(m, text, task)))
    return out


def summary(picks) -> tuple[float, float]:
    after = picks[WARMUP:]
    return sum(p[2] for p in after) / len(after), sum(p[3] for p in after)


def shift_after(picks, at: int) -> tuple[int | None, int]:
    """(calls from the drift until the choice shifted (the module docstring's
    definition), or None; affected calls still routed to the degraded model)."""
    affected = [(i, p) for i, p in enumerate(picks) if i >= at and p[0] in DRIFT_TASKS]
    bad = [p[1] == DRIFT_MODEL for _, p in affected]
    still = sum(bad)
    if len(affected) < 10:
        return None, still
    windows_ok = [sum(bad[k:k + 10]) <= 2 for k in range(len(bad) - 9)]
    for k in range(len(windows_ok)):
        if all(windows_ok[k:]):
            return affected[k][0] - at, still
    return None, still


def embed_all(data, cache: Path | None):
    from shared.infra.embeddings import Embedder

    embedder = Embedder()
    if cache is not None and cache.exists():
        cached_data, vectors, name, per = pickle.loads(cache.read_bytes())
        if cached_data == data:
            return vectors, name, per, True
    embedder.embed("warm up")
    t0 = time.perf_counter()
    vectors = [embedder.embed(text) for _, text in data]
    per = (time.perf_counter() - t0) / len(data) * 1000
    if cache is not None:
        cache.write_bytes(pickle.dumps((data, vectors, embedder.name, per)))
    return vectors, embedder.name, per, False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=5, help="router runs per weighting (own "
                        "exploration and feedback noise each; the same prompts)")
    parser.add_argument("--vectors", type=Path, default=None,
                        help="cache the prompts' embeddings in this file (reused when the prompts match)")
    parser.add_argument("--real-model", type=int, default=0, metavar="N",
                        help="also run N prompts with the real local model as `small`")
    parser.add_argument("--real-max-tokens", type=int, default=48)
    parser.add_argument("--only-real", action="store_true", help="skip the declared-model runs")
    args = parser.parse_args()
    data = prompts(args.n, args.seed)
    vectors, name, per, cached = embed_all(data, args.vectors)
    print(f"{len(data)} prompts, {len(TASKS)} task types, embedder {name}: "
          f"{per:.1f} ms per embedding (one thread{', cached' if cached else ''})")
    if args.only_real:
        real_model(data[:args.real_model], vectors[:args.real_model], args.real_max_tokens, args.seed)
        return
    seeds = [args.seed + 100 * k for k in range(args.seeds)]
    cheapest = min(PRICE, key=lambda m: PRICE[m][1])
    best = max(QUALITY, key=lambda m: sum(QUALITY[m].values()))
    always_cheap = summary(baseline(data, lambda t, x: cheapest))
    always_best = summary(baseline(data, lambda t, x: best))
    print(f"always-cheapest ({cheapest}): quality {always_cheap[0]:.3f}, cost {always_cheap[1]:.0f}"
          f" micro-USD; always-best ({best}): quality {always_best[0]:.3f}, cost {always_best[1]:.0f}"
          f" (calls {WARMUP + 1}..{len(data)}; router: mean of {len(seeds)} runs)")
    goal = None
    for pw, cw in WEIGHTINGS:
        def oracle(task, text, pw=pw, cw=cw):
            top = max(cost(m, text, task) for m in QUALITY)
            return max(QUALITY, key=lambda m: ar.score(QUALITY[m][task], cost(m, text, task), top, pw, cw))
        orc = summary(baseline(data, oracle))
        runs = [run(data, vectors, pw, cw, s) for s in seeds]
        qs, cs = zip(*(summary(r[0]) for r in runs))
        q, c = statistics.mean(qs), statistics.mean(cs)
        print(f"performance {pw:.2f} / cost {cw:.2f}: router quality {q:.3f} "
              f"({q / always_best[0]:.1%} of always-best, worst run {min(qs) / always_best[0]:.1%}) "
              f"at cost {c:.0f} ({c / always_best[1]:.1%} of always-best, worst run "
              f"{max(cs) / always_best[1]:.1%}); oracle {orc[0]:.3f} at {orc[1]:.0f} "
              f"({orc[1] / always_best[1]:.1%}); cheapest {always_cheap[0]:.3f}; {runs[0][1]} clusters")
        if (pw, cw) == GOAL_WEIGHTING:
            goal = (min(qs) / always_best[0], max(cs) / always_best[1])
    at = min(500, len(data) // 2)
    print(f"drift: at call {at} {DRIFT_MODEL}'s quality on {'/'.join(DRIFT_TASKS)} drops to "
          f"{DRIFT_QUALITY}; \"shifted within N calls\": N calls (all task types) from the drop to the "
          f"first {'/'.join(DRIFT_TASKS)} call after which every window of 10 such calls, to the end, "
          f"picks {DRIFT_MODEL} at most twice")
    shifts = []
    for s in seeds:
        picks, _, resets = run(data, vectors, 0.7, 0.3, s, drift_at=at)
        before = [p for i, p in enumerate(picks) if WARMUP <= i < at and p[0] in DRIFT_TASKS]
        share = sum(p[1] == DRIFT_MODEL for p in before) / max(1, len(before))
        shifted, still = shift_after(picks, at)
        shifts.append(shifted)
        print(f"drift at call {at} (run seed {s}): {DRIFT_MODEL}'s share of code/math before "
              f"{share:.0%}; " + (f"choice shifted within {shifted} calls" if shifted is not None
                                  else "choice did not shift")
              + f"; {still} code/math calls after the drift still went to {DRIFT_MODEL}; "
              f"{resets} changes detected")
    if goal is not None:
        met = goal[0] >= GOAL_QUALITY and goal[1] <= GOAL_COST
        print(f"goal: >= {GOAL_QUALITY:.0%} of always-best's quality at <= {GOAL_COST:.0%} of its cost "
              f"(weights {GOAL_WEIGHTING[0]}/{GOAL_WEIGHTING[1]}, calls {WARMUP + 1}..{len(data)}, "
              f"worst of {len(seeds)} runs): {goal[0]:.1%} at {goal[1]:.1%}: "
              f"{'MET' if met else 'MISSED'}")
    worst = None if any(s is None for s in shifts) else max(shifts)
    print(f"goal: the choice shifts within {GOAL_SHIFT} calls of the drop (worst of {len(seeds)} "
          f"runs): {worst if worst is not None else 'no shift'}: "
          f"{'MET' if worst is not None and worst <= GOAL_SHIFT else 'MISSED'}")
    if args.real_model:
        real_model(data[:args.real_model], vectors[:args.real_model], args.real_max_tokens, args.seed)


# -- the real local model behind `small` -------------------------------------------------


def grade(task: str, prompt: str, answer: str) -> float:
    """The declared checker of a real answer, 0..1 (crude on purpose, and the same for
    every model): math: the right number appears; code: a function and a test; translate:
    an answer that is not the English sentence again; summarize: three points; creative:
    at least two lines; facts: names the topic. Half marks for a non-empty answer that
    misses the check."""
    text = answer.strip()
    if not text:
        return 0.0
    low = text.lower()
    ok = False
    if task == "math":
        nums = [int(x) for x in re.findall(r"\d+", prompt)]
        if prompt.startswith("Compute") and len(nums) >= 3:
            ok = str(nums[0] * nums[1] + nums[2]) in text.replace(",", "")
        elif prompt.startswith("Solve") and len(nums) >= 3:
            x = (nums[2] - nums[1]) / nums[0]
            ok = any(abs(float(v) - x) < 0.01 for v in re.findall(r"-?\d+(?:\.\d+)?", text))
        elif len(nums) >= 2:
            ok = any(abs(float(v) - nums[0] / nums[1]) < 0.01
                     for v in re.findall(r"-?\d+(?:\.\d+)?", text))
    elif task == "code":
        ok = bool(re.search(r"\b(def|fn|func|function|public|int|void|class)\b", text)) and "test" in low
    elif task == "translate":
        source = re.search(r'"(.*)"', prompt)
        words = set(source.group(1).lower().split()) if source else set()
        ok = len(words & set(low.split())) <= len(words) // 3
    elif task == "summarize":
        ok = len(re.findall(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+", text)) >= 3
    elif task == "creative":
        ok = len([line for line in text.splitlines() if line.strip()]) >= 2
    elif task == "facts":
        topic = next((t for t in re.findall(r"(?:about|behind|did) (.+?)(?: begin|\?|\.|,|$)", prompt)), "")
        ok = bool(topic) and topic.lower().replace("the ", "").split()[0] in low
    return 1.0 if ok else 0.5


def real_model(data, vectors, max_tokens: int, seed: int) -> None:
    import socket
    import subprocess
    import tempfile

    import httpx

    from shared.infra.llama import local_model, model_path, server_args, server_path

    model = local_model()
    binary = server_path()
    if not binary.exists() or not model_path().exists():
        print(f"real model: {binary} or {model_path()} is missing: run `nexus runtime prepare`")
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the server's output, closed with it)
    proc = subprocess.Popen([str(binary), *server_args(model, model_path()), "--host", "127.0.0.1",
                             "--port", str(port), "-c", "2048", "-t", "2"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=600) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("real model: llama-server did not start")
                    return
                time.sleep(0.5)
            measured: dict[int, tuple[float, float, float, int]] = {}

            def ask(i: int, task: str, text: str) -> tuple[float, float, float, int]:
                if i not in measured:
                    t0 = time.perf_counter()
                    reply = client.post(f"{url}/v1/chat/completions", json={
                        "model": model.name, "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": text}]}).json()
                    print(f"  real model {i + 1}/{len(data)} ({task}): "
                          f"{(time.perf_counter() - t0):.1f} s", flush=True)
                    latency = (time.perf_counter() - t0) * 1000
                    usage = reply["usage"]
                    pin, pout = PRICE["small"]
                    spent = usage["prompt_tokens"] * pin + usage["completion_tokens"] * pout
                    answer = reply["choices"][0]["message"]["content"] or ""
                    measured[i] = (grade(task, text, answer), spent, latency,
                                   usage["completion_tokens"])
                return measured[i]

            for i, (task, text) in enumerate(data):
                ask(i, task, text)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    per_task = {t: [measured[i][0] for i, (task, _) in enumerate(data) if task == t] for t in TASKS}
    print(f"real model {model.name} as `small` ({len(data)} prompts, max_tokens {max_tokens}, "
          f"llama-server on this CPU): quality by the checker " + ", ".join(
              f"{t} {statistics.mean(v):.2f}" for t, v in per_task.items() if v)
          + f"; mean {statistics.mean(m[0] for m in measured.values()):.3f}; cost "
          f"{statistics.mean(m[1] for m in measured.values()):.1f} micro-USD per call at small's price "
          f"({statistics.mean(m[3] for m in measured.values()):.0f} output tokens); latency p50 "
          f"{statistics.median(m[2] for m in measured.values()):.0f} ms, max "
          f"{max(m[2] for m in measured.values()):.0f} ms")
    # the router on these prompts, `small` being the real model; the declared models as they are
    picks, _, _ = run(data, vectors, 0.7, 0.3, seed,
                      outcome=lambda i, task, text, m: measured[i][:2] if m == "small" else None)
    share = {m: sum(p[1] == m for p in picks) / len(picks) for m in QUALITY}
    print(f"router (0.7/0.3) over these {len(picks)} calls with the real `small`: picks "
          + ", ".join(f"{m} {v:.0%}" for m, v in share.items())
          + f"; mean quality {statistics.mean(p[2] for p in picks):.3f}, "
            f"cost {sum(p[3] for p in picks):.0f} micro-USD")


if __name__ == "__main__":
    main()
