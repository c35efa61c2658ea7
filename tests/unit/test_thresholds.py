"""Per-tag thresholds: the F2-best cut per tag on the validation split, bounded, with a fallback."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import fbeta_score

from training.evaluate import per_image_fbeta, score
from training.thresholds import best_threshold, choose

RULE = {"default": 0.2, "floor": 0.05, "ceiling": 0.8, "min_positives": 5}


def test_the_chosen_threshold_maximises_the_tags_f2():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.3
    probs = np.clip(np.where(truth, 0.55, 0.35) + rng.normal(0, 0.15, 400), 0, 1)
    threshold, f2 = best_threshold(probs, truth, floor=0.05, ceiling=0.8)
    grid = np.linspace(0.05, 0.8, 751)
    brute = max(fbeta_score(truth, probs >= t, beta=2, zero_division=0) for t in grid)
    assert f2 == pytest.approx(fbeta_score(truth, probs >= threshold, beta=2))
    assert f2 >= brute - 1e-12
    assert threshold != pytest.approx(0.2)  # the global threshold is not this tag's best


def test_thresholds_stay_within_floor_and_ceiling():
    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    sure = np.where(truth, 0.99, 0.95)  # best cut 0.99, above the ceiling
    assert best_threshold(sure, truth, floor=0.05, ceiling=0.8)[0] == 0.8
    unsure = np.array([0.03, 0.03, 0.03, 0.3, 0.3, 0.02, 0.02, 0.02, 0.02, 0.9])  # best cut 0.03, below the floor
    threshold, f2 = best_threshold(unsure, truth, floor=0.05, ceiling=0.8)
    assert 0.05 <= threshold <= 0.3 and f2 == pytest.approx(fbeta_score(truth, unsure >= 0.05, beta=2))


def test_tags_with_too_few_positives_keep_the_global_threshold():
    rng = np.random.default_rng(1)
    truth = np.zeros((100, 3), dtype=bool)
    truth[:40, 0] = True  # plenty
    truth[:4, 1] = True  # fewer than min_positives
    probs = np.clip(truth * 0.6 + rng.random((100, 3)) * 0.4, 0, 1)
    chosen = choose(probs, truth, ["many", "few", "none"], **RULE)
    by_tag = {t.tag: t for t in chosen.per_tag}
    assert not by_tag["many"].fallback and by_tag["many"].positives == 40
    assert by_tag["few"].fallback and by_tag["few"].threshold == 0.2
    assert by_tag["none"].fallback and by_tag["none"].threshold == 0.2 and by_tag["none"].positives == 0
    record = chosen.record()
    assert record["thresholds"] == {"many": by_tag["many"].threshold, "few": 0.2, "none": 0.2}
    assert record["thresholds_rule"]["fallback_tags"] == ["few", "none"]


def test_per_tag_thresholds_are_applied_per_tag_in_the_scores():
    vocab = ["a", "b"]
    truth = np.array([[1, 0], [0, 1], [1, 1]])
    probs = np.array([[0.5, 0.3], [0.1, 0.6], [0.45, 0.35]])
    glob = score(probs, truth, vocab, threshold=0.4)
    per = score(probs, truth, vocab, threshold=0.4, per_tag_thresholds={"b": 0.3})
    assert glob.mode == "global" and per.mode == "per_tag"
    assert per.f2 > glob.f2  # b at 0.3 recovers the (0.35, true) and (0.3, false) cut differently
    expected = fbeta_score(truth, probs >= np.array([0.4, 0.3]), beta=2, average="samples", zero_division=0)
    assert per.f2 == pytest.approx(expected)


def test_per_image_f2_averages_to_sklearns_samples_f2():
    rng = np.random.default_rng(2)
    truth = rng.random((50, 6)) < 0.3
    truth[np.arange(50), rng.integers(0, 6, 50)] = True  # every image has a tag, as in a dataset
    probs = rng.random((50, 6))
    cut = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    expected = fbeta_score(truth, probs >= cut, beta=2, average="samples", zero_division=0)
    assert per_image_fbeta(probs, truth, cut).mean() == pytest.approx(expected)
