"""Holdout scores: samples-averaged F2 and per-tag precision / recall / F2, checked on worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from training.dataset import Example
from training.evaluate import score, targets

VOCAB = ["cat", "dog", "sky"]


def test_targets_ignore_tags_outside_the_vocabulary():
    out = targets([Example(1, ("cat", "sky")), Example(2, ("gone",))], VOCAB)
    assert out.tolist() == [[1, 0, 1], [0, 0, 0]]


def test_a_perfect_model_scores_one():
    truth = np.array([[1, 0, 1], [0, 1, 0]])
    ev = score(truth * 0.9, truth, VOCAB, threshold=0.2)
    assert ev.f2 == ev.accuracy == ev.precision == ev.recall == 1.0
    assert [(s.tag, s.support) for s in ev.per_tag] == [("cat", 1), ("dog", 1), ("sky", 1)]


def test_a_worked_example():
    # image 1: {cat, dog}, predicted {cat, sky}  -> P 1/2, R 1/2, F2 = 5*1 / (5*1 + 4*1 + 1) = 1/2
    # image 2: {dog},      predicted {dog, sky}  -> P 1/2, R 1,   F2 = 5 / (5 + 0 + 1)     = 5/6
    # image 3: {sky},      predicted nothing     -> P 0 (undefined), R 0, F2 0
    truth = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    probs = np.array([[0.9, 0.1, 0.3], [0.0, 0.7, 0.2], [0.1, 0.0, 0.19]])
    ev = score(probs, truth, VOCAB, threshold=0.2)
    assert ev.f2 == pytest.approx((1 / 2 + 5 / 6 + 0) / 3)
    assert ev.precision == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert ev.recall == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert ev.accuracy == pytest.approx(5 / 9)  # right (image, tag) decisions out of 9
    by_tag = {s.tag: (s.precision, s.recall, s.f2, s.support) for s in ev.per_tag}
    assert by_tag["cat"] == pytest.approx((1.0, 1.0, 1.0, 1))
    assert by_tag["dog"] == pytest.approx((1.0, 0.5, 5 / 9, 2))  # tp 1, fn 1: 5 / (5 + 4)
    assert by_tag["sky"] == pytest.approx((0.0, 0.0, 0.0, 1))  # predicted twice, never right


def test_beta_weighs_recall():
    truth = np.array([[1, 1, 0]])
    probs = np.array([[0.9, 0.0, 0.0]])  # precision 1, recall 1/2
    assert score(probs, truth, VOCAB, threshold=0.2).f2 == pytest.approx(5 * 0.5 / (4 * 1 + 0.5))
    assert score(probs, truth, VOCAB, threshold=0.2, beta=1.0).f2 == pytest.approx(2 / 3)


def test_the_threshold_is_inclusive_and_undefined_ratios_count_as_zero():
    truth = np.array([[1, 0, 0], [0, 1, 0]])
    probs = np.array([[0.2, 0.0, 0.0], [0.0, 0.1, 0.0]])  # image 2: nothing predicted; "sky": no support
    ev = score(probs, truth, VOCAB, threshold=0.2)
    assert ev.f2 == pytest.approx(0.5)
    sky = ev.per_tag[2]
    assert (sky.precision, sky.recall, sky.f2, sky.support) == (0.0, 0.0, 0.0, 0)


def test_metrics_record_is_json_ready():
    import json

    truth = np.array([[1, 0, 1]])
    m = score(truth * 0.5, truth, VOCAB, threshold=0.2).metrics()
    assert json.loads(json.dumps(m))["per_tag"]["cat"] == {"precision": 1.0, "recall": 1.0, "f2": 1.0, "support": 1}
    assert (m["f2"], m["threshold"], m["holdout_size"]) == (1.0, 0.2, 1)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="do not match"):
        score(np.zeros((2, 3)), np.zeros((2, 2)), VOCAB, threshold=0.2)
