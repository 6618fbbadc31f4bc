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
