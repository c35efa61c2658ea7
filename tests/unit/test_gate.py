"""The gate: both models scored on the same holdout pictures, a bootstrap interval of the difference,
the tolerance, and champions that are missing or cannot be loaded.

``decide`` and ``bootstrap_interval`` are checked on numbers; ``judge`` and ``apply`` with real
exported learners (tests/learners.py) in a real registry on SQLite and PostgreSQL.
"""

from __future__ import annotations

import numpy as np
import pytest

from demo.synthetic import make_pictures
from shared import registry
from shared.constants import MODEL_CANDIDATE, MODEL_CHAMPION
from shared.db import make_engine, session_factory, transaction
from shared.learner_parts import Example, ImageFromStore
from shared.learner_pickle import load_learner
from shared.migrate import upgrade
from shared.registry import ModelVersion
from shared.stores import LocalStore
from tests.learners import train_tiny_learner
from training.evaluate import per_image_fbeta, predict, score, targets
from training.gate import apply, bootstrap_interval, champion_probabilities, compare, decide, judge

HOLDOUT_IDS = range(5001, 5061)


def champion(version: str = "v1") -> ModelVersion:
    return ModelVersion(version=version, sha256="0" * 64, arch="resnet18", vocab=["a"], status=MODEL_CHAMPION)


def comparison(new_f2: float, champion_f2: float):
    n = 40
    return compare(champion="v1", mode="global", new_scores=np.full(n, new_f2), champion_scores=np.full(n, champion_f2))


def test_first_model_becomes_champion():
    assert decide(f2=0.1, champion=None, tolerance=0.0).promote


@pytest.mark.parametrize(
    ("f2", "champion_f2", "tolerance", "promote"),
    [
        (0.70, 0.60, 0.0, True),  # better
        (0.60, 0.60, 0.0, True),  # equal is "at least"
        (0.59, 0.60, 0.0, False),  # worse
        (0.59, 0.60, 0.02, True),  # worse, within the tolerance
        (0.55, 0.60, 0.02, False),  # worse, beyond it
    ],
)
def test_champion_minus_tolerance_is_the_bar(f2, champion_f2, tolerance, promote):
    decision = decide(f2=f2, champion=champion(), tolerance=tolerance, comparison=comparison(f2, champion_f2))
    assert decision.promote is promote
    assert f"{f2:.4f} vs champion v1 {champion_f2:.4f}" in decision.reason
    assert "on the same 40 holdout images" in decision.reason and "95% bootstrap interval" in decision.reason
    assert decision.record()["n_images"] == 40 and decision.record()["champion_f2"] == pytest.approx(champion_f2)


def test_a_champion_that_could_not_be_scored_is_not_replaced_blindly():
    decision = decide(f2=0.9, champion=champion(), tolerance=0.0, unscored="its file is gone")
    assert not decision.promote and "its file is gone" in decision.reason
    assert "stilltag models promote" in decision.reason


def test_the_bootstrap_interval_is_seeded_paired_and_brackets_the_difference():
    rng = np.random.default_rng(3)
    old = rng.random(200)
    new = np.clip(old + 0.05 + rng.normal(0, 0.1, 200), 0, 1)
    low, high = bootstrap_interval(new, old)
    assert (low, high) == bootstrap_interval(new, old)  # seeded
    assert low < float(np.mean(new - old)) < high
    assert bootstrap_interval(old, old) == (0.0, 0.0)  # the same model: no difference at all
    # Fewer images, wider interval.
    low_few, high_few = bootstrap_interval(new[:20], old[:20])
    assert high_few - low_few > high - low


# --- real learners -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learners(tmp_path_factory):
    """A weak and a stronger tiny learner, and a holdout of other pictures in an image folder."""
    root = tmp_path_factory.mktemp("gate")
    weak = train_tiny_learner(root / "weak", n_images=32, size=32, epochs=1, lr=1e-5)
    strong = train_tiny_learner(root / "strong", n_images=96, size=32, epochs=4, lr=3e-3)
    images = root / "holdout"
    images.mkdir()
    holdout = []
    for pic in make_pictures(HOLDOUT_IDS, seed=7, size=(64, 64)):
        (images / f"{pic.image_id}.jpg").write_bytes(pic.jpeg())
        holdout.append(Example(pic.image_id, tuple(pic.tags)))
    read = ImageFromStore(f"file://{images}/{{image_id}}.jpg")
    return {"weak": weak, "strong": strong, "holdout": holdout, "read": read}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def sessions(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'gate.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def register(sessions, store, artifact, **metrics) -> ModelVersion:
    with transaction(sessions) as session:
        return registry.register(session=session, store=store, artifact=artifact, arch="resnet18",
                                 vocab=[str(t) for t in load_learner(artifact).dls.vocab], metrics=metrics)


def new_model(path, learners):
    learn = load_learner(path)
    vocab = [str(t) for t in learn.dls.vocab]
    return predict(learn, learners["holdout"], read=learners["read"]), vocab


def judge_against(sessions, store, tmp_path, learners, probs, vocab, *, tolerance=0.0, mode="global",
                  new_thresholds=None):
    with sessions() as session:
        current = registry.champion(session=session)
    return judge(f2=0.5, new_probs=probs, vocab=vocab, holdout=learners["holdout"], champion=current, mode=mode,
                 threshold=0.2, new_thresholds=new_thresholds, tolerance=tolerance,
                 champion_probs=lambda record: champion_probabilities(
                     record, store=store, cache_dir=tmp_path / "cache", holdout=learners["holdout"],
                     read=learners["read"]))


@pytest.mark.timeout(600)
def test_both_learners_are_scored_on_the_same_holdout_pictures(sessions, learners, tmp_path):
    store = LocalStore(tmp_path / "models")
    holdout = learners["holdout"]
    first = register(sessions, store, learners["weak"], f2=0.99)  # a recorded F2 that the gate ignores
    with transaction(sessions) as session:
        apply(session=session, record=first, decision=decide(f2=0.1, champion=None, tolerance=0.0))

    probs, vocab = new_model(learners["strong"], learners)
    decision = judge_against(sessions, store, tmp_path, learners, probs, vocab)
    c = decision.comparison
    assert c is not None and c.champion == first.version and c.n_images == len(holdout) and c.mode == "global"
    # The scores are each learner's own F2 on these pictures, recomputed here independently.
    weak_probs, weak_vocab = new_model(learners["weak"], learners)
    assert c.champion_f2 == pytest.approx(score(weak_probs, targets(holdout, weak_vocab), weak_vocab, threshold=0.2).f2)
    assert c.new_f2 == pytest.approx(score(probs, targets(holdout, vocab), vocab, threshold=0.2).f2)
    assert c.champion_f2 != pytest.approx(0.99)
    assert c.diff_low <= c.diff <= c.diff_high
    assert decision.promote is (c.new_f2 >= c.champion_f2)
    assert f"{c.new_f2:.4f} vs champion {first.version} {c.champion_f2:.4f}" in decision.reason

    # The tolerance still applies: a bar the new model cannot miss, and one it cannot reach.
    assert judge_against(sessions, store, tmp_path, learners, probs, vocab, tolerance=1.0).promote
    hopeless = np.zeros_like(probs)  # tags nothing: F2 0 on every image
    refused = judge_against(sessions, store, tmp_path, learners, hopeless, vocab, tolerance=0.0)
    assert not refused.promote and refused.comparison.new_f2 == 0.0 and refused.comparison.diff_high < 0

    # The champion judged against itself: no difference, and equal passes.
    same = judge_against(sessions, store, tmp_path, learners, weak_probs, weak_vocab)
    assert same.promote and same.comparison.diff == 0.0 and (same.comparison.diff_low, same.comparison.diff_high) == (0, 0)

    # The decision is recorded on the registry.
    second = register(sessions, store, learners["strong"], gate=decision.record())
    with transaction(sessions) as session:
        record = apply(session=session, record=second, decision=decision)
    assert record.reason == decision.reason
    assert record.status == (MODEL_CHAMPION if decision.promote else MODEL_CANDIDATE)


@pytest.mark.timeout(600)
def test_per_tag_mode_uses_each_models_own_thresholds(sessions, learners, tmp_path):
    store = LocalStore(tmp_path / "models")
    holdout = learners["holdout"]
    weak_probs, weak_vocab = new_model(learners["weak"], learners)
    champion_cut = {t: 0.9 for t in weak_vocab}
    first = register(sessions, store, learners["weak"], thresholds=champion_cut)
    with transaction(sessions) as session:
        apply(session=session, record=first, decision=decide(f2=0.1, champion=None, tolerance=0.0))
    probs, vocab = new_model(learners["strong"], learners)
    own = {t: 0.3 for t in vocab}
    decision = judge_against(sessions, store, tmp_path, learners, probs, vocab, mode="per_tag", new_thresholds=own)
    c = decision.comparison
    assert c.mode == "per_tag" and "per-tag thresholds" in decision.reason
    expected_old = per_image_fbeta(weak_probs, targets(holdout, weak_vocab), np.full(len(weak_vocab), 0.9)).mean()
    expected_new = per_image_fbeta(probs, targets(holdout, vocab), np.full(len(vocab), 0.3)).mean()
    assert (c.champion_f2, c.new_f2) == (pytest.approx(expected_old), pytest.approx(expected_new))

    # A champion registered without thresholds is cut at the global threshold, and the reason says so.
    with transaction(sessions) as session:
        plain = registry.register(session=session, store=store, artifact=learners["weak"], arch="resnet18",
                                  vocab=weak_vocab, metrics={})
        registry.promote(session=session, version=plain.version)
    decision = judge_against(sessions, store, tmp_path, learners, probs, vocab, mode="per_tag", new_thresholds=own)
    assert "has no per-tag thresholds, so it is cut at 0.2" in decision.reason


def test_a_missing_champion_artifact_keeps_the_new_model_a_candidate(sessions, learners, tmp_path):
    store = LocalStore(tmp_path / "models")
    first = register(sessions, store, learners["weak"])
    with transaction(sessions) as session:
        apply(session=session, record=first, decision=decide(f2=0.1, champion=None, tolerance=0.0))
    (tmp_path / "models" / first.version / "export.pkl").unlink()
    probs, vocab = new_model(learners["strong"], learners)
    decision = judge_against(sessions, store, tmp_path, learners, probs, vocab)
    assert not decision.promote and decision.comparison is None
    assert f"champion {first.version} could not be scored on the holdout" in decision.reason
    assert "export.pkl" in decision.reason and "\n" not in decision.reason


def test_a_champion_that_will_not_load_keeps_the_new_model_a_candidate(sessions, learners, tmp_path):
    store = LocalStore(tmp_path / "models")
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(b"this is not a pickled learner")
    with transaction(sessions) as session:
        first = registry.register(session=session, store=store, artifact=broken, arch="resnet18", vocab=["a"])
        registry.promote(session=session, version=first.version)
    probs, vocab = new_model(learners["strong"], learners)
    decision = judge_against(sessions, store, tmp_path, learners, probs, vocab)
    assert not decision.promote and "could not be scored" in decision.reason and "Error" in decision.reason

    second = register(sessions, store, learners["strong"])
    with transaction(sessions) as session:
        record = apply(session=session, record=second, decision=decision)
    assert record.status == MODEL_CANDIDATE and record.reason == decision.reason
    with sessions() as session:
        assert registry.champion_version(session=session) == first.version


def test_a_champion_changed_meanwhile_is_not_overridden(sessions, learners, tmp_path):
    store = LocalStore(tmp_path / "models")
    first = register(sessions, store, learners["weak"])
    decision = decide(f2=0.5, champion=None, tolerance=0.0)  # judged when there was no champion
    with transaction(sessions) as session:
        registry.promote(session=session, version=first.version)  # promoted by hand meanwhile
    second = register(sessions, store, learners["strong"])
    with transaction(sessions) as session:
        record = apply(session=session, record=second, decision=decision)
    assert record.status == MODEL_CANDIDATE and f"champion changed to {first.version}" in record.reason
