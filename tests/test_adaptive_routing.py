"""Adaptive routing's pure parts: the scoring rule on hand-computed cases, Thompson
exploration, excluded (policy-denied) models never picked, the learned statistics'
fold, clusters, the skill matcher and the counterfactual re-decision."""

from __future__ import annotations

import random

import pytest

from shared.domain import adaptive_routing as ar


def cand(model: str, a: float, b: float, cost: float, excluded: str | None = None) -> ar.Candidate:
    return ar.Candidate(model=model, quality=ar.Posterior(a, b), cost=cost, excluded=excluded)


def test_the_scoring_rule_on_hand_computed_cases() -> None:
    # 0.7 x 0.9 - 0.3 x 40/40 = 0.33 ; 0.7 x 0.8 - 0.3 x 10/40 = 0.485
    assert ar.score(0.9, 40, 40, 0.7, 0.3) == pytest.approx(0.33)
    assert ar.score(0.8, 10, 40, 0.7, 0.3) == pytest.approx(0.485)
    assert ar.score(0.5, 0, 0, 1.0, 1.0) == pytest.approx(0.5)  # no cost known: quality alone
    d = ar.decide([cand("big", 9, 1, 40), cand("small", 8, 2, 10)], 0.7, 0.3, ar.MeanSampler())
    assert d.pick == "small" and not d.exploration and d.fallback == ("big",)
    [big, small] = d.candidates
    assert big.score == pytest.approx(0.33) and small.score == pytest.approx(0.485)
    # quality alone: the better model
    assert ar.decide([cand("big", 9, 1, 40), cand("small", 8, 2, 10)], 1.0, 0.0,
                     ar.MeanSampler()).pick == "big"
    assert "0.485" in d.reason


def test_thompson_sampling_explores_an_uncertain_model_and_exploits_a_known_one() -> None:
    rng = random.Random(1)
    known = cand("known", 80, 20, 10)  # mean 0.8 over 100 scores
    new = cand("new", 1, 1, 10)  # nothing known: uniform
    picks = [ar.decide([known, new], 1.0, 0.0, rng) for _ in range(400)]
    tried = sum(d.pick == "new" for d in picks)
    assert 20 < tried < 200  # tried, not preferred
    assert all(d.exploration == (d.pick == "new") for d in picks)
    # once "new" is known to be worse it is hardly tried any more
    worse = cand("new", 30, 70, 10)
    assert sum(ar.decide([known, worse], 1.0, 0.0, rng).pick == "new" for _ in range(400)) == 0


def test_an_excluded_model_is_never_picked_however_good() -> None:
    rng = random.Random(2)
    denied = cand("denied", 1000, 1, 1, excluded="models.deny")
    other = cand("other", 1, 1000, 100)
    for _ in range(300):
        d = ar.decide([denied, other], 0.5, 0.5, rng)
        assert d.pick == "other" and "denied" not in d.fallback
    assert ar.decide([denied], 1, 0, rng).pick is None


def test_the_fold_discounts_the_past_so_a_drop_is_noticed() -> None:
    s = ar.ArmStats()
    for _ in range(100):
        s = ar.fold_feedback(s, 0.9)
    assert ar.posterior(s, (1, 1)).mean == pytest.approx(0.9, abs=0.03)  # ~33 scores + prior
    for _ in range(40):
        s = ar.fold_feedback(s, 0.2)
    assert ar.posterior(s, (1, 1)).mean < 0.5  # 40 bad scores outweigh 100 good old ones
    c = ar.fold_cost(ar.fold_cost(ar.ArmStats(), 10), 30)
    assert c.cost_n == 2 and c.cost_mean == 20


def test_clusters_are_joined_above_the_threshold_and_made_below() -> None:
    centroids = [("c1", (1.0, 0.0)), ("c2", (0.0, 1.0))]
    assert ar.assign_cluster((0.99, 0.1), centroids, 0.9)[0] == "c1"
    assert ar.assign_cluster((0.7, 0.7), centroids, 0.9)[0] is None
    assert ar.assign_cluster((0.7, 0.7), centroids, 0.9, max_clusters=2)[0] in {"c1", "c2"}


def test_skill_matching_with_confidence_and_the_default_below_it() -> None:
    skills = [("coding", [(1.0, 0.0, 0.0)]), ("translation", [(0.0, 1.0, 0.0)])]
    assert ar.match_skill((0.95, 0.1, 0.0), skills, default="general")[:3:2] == ("coding", "auto")
    name, confidence, how = ar.match_skill((0.7, 0.7, 0.1), skills, default="general")
    assert (name, how) == ("general", "default") and confidence < ar.MATCH_THRESHOLD
    # the cluster's past traffic breaks a tie
    assert ar.match_skill((0.7, 0.7, 0.1), skills, {"translation": 9}, default="general",
                          threshold=0.0)[0] == "translation"


def test_redecide_is_the_documented_counterfactual() -> None:
    cands = [cand("big", 9, 1, 40), cand("small", 8, 2, 10)]
    quality_first = ar.redecide(cands, 1.0, 0.0)
    assert quality_first.pick == "big" and quality_first.cost == 40
    assert quality_first.quality == pytest.approx(0.9)
    cheap = ar.redecide(cands, 0.7, 0.3)
    assert cheap.pick == "small" and cheap.quality_std == pytest.approx(ar.Posterior(8, 2).std)
    assert ar.redecide(cands, 1.0, 0.0, {"small"}).pick == "small"  # another model set


def test_a_score_is_worth_what_its_spread_says() -> None:
    # tight scores (sd ~0.02): the posterior is far narrower than a coin-toss Beta's
    tight, loose = ar.ArmStats(), ar.ArmStats()
    for i in range(20):
        tight = ar.fold_feedback(tight, 0.8 + (0.02 if i % 2 else -0.02))
        loose = ar.fold_feedback(loose, 1.0 if i % 5 else 0.0)  # mean 0.8, thumbs up/down
    pt, pl = ar.posterior(tight, (1, 1)), ar.posterior(loose, (1, 1))
    assert pt.mean == pytest.approx(0.8, abs=0.01) and pl.mean == pytest.approx(0.8, abs=0.03)
    assert pt.std < pl.std / 3
    assert ar.precision(tight) > 10 and ar.precision(loose) < 1.5


def test_the_change_detector_catches_a_drop_and_forgets_what_came_before() -> None:
    rng = random.Random(3)
    s = ar.ArmStats()
    for _ in range(200):
        s = ar.fold_feedback(s, rng.gauss(0.86, 0.1))
    assert s.resets <= 1  # stationary: (almost) no alarm
    before = s.resets
    for n in range(1, 4):
        s = ar.fold_feedback(s, 0.3)
        if s.resets > before:
            break
    assert s.resets == before + 1 and n <= 2  # a 5-sd drop: caught at its 1st or 2nd score
    assert ar.posterior(s, (1, 1)).mean < 0.5  # what came before the drop is forgotten
    # without the detector (the discount alone) the old mean would still dominate
    slow = ar.ArmStats(alpha=0.86 * 33, beta=0.14 * 33)
    for _ in range(n):
        slow = ar.ArmStats(alpha=slow.alpha * ar.DISCOUNT + 0.3, beta=slow.beta * ar.DISCOUNT + 0.7)
    assert slow.alpha / slow.weight > 0.8


def test_the_pool_fills_in_only_what_a_cluster_lacks() -> None:
    pooled = ar.ArmStats(alpha=90, beta=10, sq=81)  # 0.9 elsewhere
    assert ar.posterior(None, (1, 1), pooled).mean > 0.8  # a new cluster: the model elsewhere
    own = ar.ArmStats(alpha=0.6, beta=1.4, sq=0.18)  # 2 scores of 0.3 here
    assert ar.posterior(own, (1, 1), pooled).mean < 0.6
    known = ar.ArmStats(alpha=3, beta=7, sq=0.9)
    assert ar.posterior(known, (1, 1), pooled).mean == ar.posterior(known, (1, 1)).mean


def test_without_an_embedding_the_skills_preferred_model_is_picked() -> None:
    cands = [cand("big", 1, 1, 40, excluded="models.deny"), cand("mid", 1, 9, 20), cand("small", 9, 1, 10)]
    d = ar.preferred_decision(cands, ("big", "mid", "small"), 0.7, 0.3, "no AVX2")
    assert d.pick == "mid" and d.fallback == ("small",) and not d.exploration  # order, not scores
    assert "no AVX2" in d.reason
    assert ar.preferred_decision(cands[:1], ("big",), 0.7, 0.3, "x").pick is None


def test_the_embedder_is_refused_on_a_cpu_without_avx2_or_fma() -> None:
    from shared.infra.embeddings import Embedder, EmbedderUnavailable, cpu_support

    assert cpu_support("flags\t: fpu sse2 avx2 fma\n", "x86_64") is None
    assert "avx2" in cpu_support("flags\t: fpu sse2 avx fma\n", "x86_64")
    assert "fma" in cpu_support("flags\t: fpu avx2\n", "x86_64")
    assert "aarch64" in cpu_support("", "aarch64")
    with pytest.raises(EmbedderUnavailable, match="lacks avx2"):
        Embedder(unsupported=cpu_support("flags\t: sse2\n", "x86_64")).embed("hello")


def test_the_agent_selector_picks_the_agent_whose_skill_fits_best() -> None:
    agents = [("coder", [("coding", [(1.0, 0.0)])]), ("writer", [("poems", [(0.0, 1.0)])]),
              ("idle", [])]
    best, confidence, fits = ar.select_agent((0.1, 0.99), agents)
    assert best is not None and (best.agent, best.skill) == ("writer", "poems")
    assert confidence > 0.99 and [f.agent for f in fits] == ["writer", "coder"]
    assert ar.select_agent((1.0, 0.0), [("idle", [])]) == (None, 0.0, [])


def test_the_grader_reply_is_parsed_to_a_score() -> None:
    assert [ar.parse_grade(t) for t in ("7", "Score: 8/10", "10", "I give it 6.", "9.5 since")] == \
        [0.7, 0.8, 1.0, 0.6, 0.95]
    assert [ar.parse_grade(t) for t in ("tok0 tok1", "11", "3.14.15", "")] == [None] * 4
