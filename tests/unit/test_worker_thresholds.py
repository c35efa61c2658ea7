"""Tagging workers keep tags at the global threshold, or with STILLTAG_THRESHOLDS=per_tag at the
thresholds the registry stores with the version."""

from __future__ import annotations

import numpy as np
import pytest

from shared.registry import ModelVersion
from worker.results import select_tags
from worker.service import Tagger

VOCAB = ["cat", "dog", "sky"]


def version(metrics: dict) -> ModelVersion:
    return ModelVersion(version="v7", sha256="0" * 64, arch="resnet18", vocab=VOCAB, metrics=metrics)


def test_select_tags_with_a_threshold_per_tag():
    probs = np.array([0.5, 0.3, 0.1])
    assert [t for t, _ in select_tags(probs, VOCAB, threshold=0.2, top_k=10)] == ["cat", "dog"]
    per_tag = np.array([0.6, 0.25, 0.05])
    assert [t for t, _ in select_tags(probs, VOCAB, threshold=per_tag, top_k=10)] == ["dog", "sky"]
    # The cap counts passing tags: cat (0.5) is below its 0.6, so dog is the one kept.
    assert [t for t, _ in select_tags(probs, VOCAB, threshold=per_tag, top_k=1)] == ["dog"]


@pytest.fixture
def tagger(make_settings):
    def build(**settings):
        t = Tagger(make_settings(device="cpu", **settings))
        return t

    made = []
    yield lambda **s: made.append(build(**s)) or made[-1]
    for t in made:
        t.pool.shutdown()
        t.runtime.close()


def test_global_mode_ignores_stored_thresholds(tagger):
    t = tagger(threshold=0.3)
    assert t.cutoffs_for(version({"thresholds": {"cat": 0.9}}), VOCAB) == 0.3


def test_per_tag_mode_uses_the_versions_thresholds_and_the_global_one_for_the_rest(tagger):
    t = tagger(threshold=0.3, thresholds="per_tag")
    cut = t.cutoffs_for(version({"thresholds": {"cat": 0.9, "dog": 0.05}}), VOCAB)
    assert np.allclose(cut, [0.9, 0.05, 0.3])
    assert t.cutoffs_for(version({}), VOCAB) == 0.3  # registered by hand: no thresholds
