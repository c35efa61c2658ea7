"""Holdout scores: samples-averaged F2 and per-tag precision / recall / F2, checked against sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import fbeta_score, precision_recall_fscore_support

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


def test_matches_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    truth = (rng.random((200, 7)) < 0.3).astype(int)
    truth[truth.sum(axis=1) == 0, 0] = 1  # every holdout image has a tag (the dataset drops the rest)
    probs = rng.random((200, 7))
    vocab = [f"t{i}" for i in range(7)]
    ev = score(probs, truth, vocab, threshold=0.2)
    pred = (probs >= 0.2).astype(int)
    assert ev.f2 == pytest.approx(fbeta_score(truth, pred, beta=2, average="samples", zero_division=0))
    assert ev.accuracy == pytest.approx((pred == truth).mean())
    p, r, f, support = precision_recall_fscore_support(truth, pred, beta=2, average=None, zero_division=0)
    assert [s.precision for s in ev.per_tag] == pytest.approx(p)
    assert [s.recall for s in ev.per_tag] == pytest.approx(r)
    assert [s.f2 for s in ev.per_tag] == pytest.approx(f)
    assert [s.support for s in ev.per_tag] == support.tolist()


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
