"""``stilltag audit`` for real: a small real learner registered as champion, generated pictures in the
image store, the website's tags in ``image_tags`` with some made wrong on purpose, and the command
line run in its own process. The CSV and the HTML page are parsed.

Which tags are made wrong is decided from what the learner is sure about on the true pictures
(above 0.9 or below 0.05), so the test does not depend on how well a tiny CI learner trains; it
fails, saying so, if the learner is sure of nothing.
"""

from __future__ import annotations

import csv
import os
import warnings

import numpy as np
import pytest
import sqlalchemy as sa

from bench.stack import stilltag
from demo.synthetic import make_pictures
from shared import registry
from shared.db import image_tags, transaction
from shared.migrate import upgrade
from shared.runtime import Runtime
from tests.unit.test_audit import parse_html
from training.dataset import in_holdout
from worker.model import TaggingModel
from worker.preprocess import decode_image

pytestmark = pytest.mark.integration

N_IMAGES = 96
HOLDOUT_PCT = 30
MAX_WRONG = 4  # of each kind
UNREADABLE = b"this is not a picture"


@pytest.fixture(scope="module")
def sure_learner(tmp_path_factory):
    """A tiny real learner trained a little longer than the shared one, so it is sure of some tags."""
    from tests.learners import train_tiny_learner

    return train_tiny_learner(tmp_path_factory.mktemp("audit-learner"), n_images=96, epochs=4, lr=5e-3)


def _probabilities(learner, pictures) -> tuple[list[str], np.ndarray]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # load_learner's pickle warning: our own file
        model = TaggingModel.load(learner, version="probe", device="cpu")
    pixels = np.stack([decode_image(p.jpeg(), model.prep, max_pixels=10**8) for p in pictures])
    probs = model.predict(pixels)
    model.release()
    return model.vocab, probs


@pytest.mark.timeout(900)
def test_the_audit_finds_the_wrong_website_tags(make_settings, sure_learner, tmp_path):
    settings = make_settings(holdout_pct=HOLDOUT_PCT, train_min_tag_images=1, max_batch=16, metrics_port=0)
    upgrade(settings.database_url)
    pictures = make_pictures(range(1, N_IMAGES + 1), size=(64, 64), seed=7)  # not the learner's pictures
    holdout = [p for p in pictures if in_holdout(p.image_id, seed=settings.holdout_seed, pct=HOLDOUT_PCT)]
    vocab, probs = _probabilities(sure_learner, pictures)
    col = {t: i for i, t in enumerate(vocab)}
    row = {p.image_id: i for i, p in enumerate(pictures)}

    # Wrong on purpose, on holdout images only: a true tag the learner is sure of is removed (the
    # audit must call it missing), an absent tag it is sure is absent is added (doubtful).
    website = {p.image_id: set(p.tags) for p in pictures}
    removed, added = [], []
    unreadable = holdout[-1].image_id
    for p in holdout[:-1]:
        sure_yes = [t for t in p.tags if probs[row[p.image_id], col[t]] > 0.9]
        sure_no = [t for t in vocab if t not in p.tags and probs[row[p.image_id], col[t]] < 0.05]
        if sure_yes and len(removed) < MAX_WRONG and len(p.tags) > 1:
            removed.append((p.image_id, sure_yes[0]))
            website[p.image_id].discard(sure_yes[0])
        elif sure_no and len(added) < MAX_WRONG:
            added.append((p.image_id, sure_no[0]))
            website[p.image_id].add(sure_no[0])
    assert removed and added, (f"the tiny learner is sure of too little to test with ({len(removed)} true tags above "
                               f"0.9, {len(added)} absent tags below 0.05 on the holdout): train it longer")
    # And a wrong tag outside the holdout: the default audit must not look there, --all must.
    outside = next(p for p in pictures if p.image_id not in {h.image_id for h in holdout}
                   and any(probs[row[p.image_id], col[t]] < 0.05 for t in vocab if t not in p.tags))
    outside_tag = next(t for t in vocab if t not in outside.tags and probs[row[outside.image_id], col[t]] < 0.05)
    website[outside.image_id].add(outside_tag)

    rt = Runtime(settings)
    try:
        for p in pictures:
            rt.images.put(p.image_id, UNREADABLE if p.image_id == unreadable else p.jpeg())
        with transaction(rt.sessions) as session:
            session.execute(sa.insert(image_tags), [{"image_id": i, "tag": t} for i, tags in website.items()
                                                    for t in tags])
            record = registry.register(session=session, store=rt.model_store, artifact=sure_learner,
                                       arch="resnet18", vocab=vocab)
            registry.promote(session=session, version=record.version)
    finally:
        rt.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | {
        "STILLTAG_DATA_DIR": str(settings.data_dir), "STILLTAG_HOLDOUT_PCT": str(HOLDOUT_PCT),
        "STILLTAG_TRAIN_MIN_TAG_IMAGES": "1", "STILLTAG_MAX_BATCH": "16"}
    out = tmp_path / "audit"
    done = stilltag(env, "audit", "--out", str(out), "--limit", "0", timeout_s=600)
    assert done.returncode == 0, done.stderr
    assert f"{len(holdout) - 1} holdout images scored with v1" in done.stdout, done.stdout
    assert "1 images unreadable" in done.stdout

    with (out / "audit.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    doubtful = [(int(r["image_id"]), r["tag"]) for r in rows if r["list"] == "doubtful"]
    missing = [(int(r["image_id"]), r["tag"]) for r in rows if r["list"] == "missing"]
    assert set(added) <= set(doubtful), (added, doubtful)
    assert set(removed) <= set(missing), (removed, missing)
    holdout_ids = {p.image_id for p in holdout}
    assert {i for i, _ in doubtful + missing} <= holdout_ids - {unreadable}
    for name in ("doubtful", "missing"):  # ranked by confidence, rank 1 first
        ps = [float(r["probability"]) for r in rows if r["list"] == name]
        assert ps == sorted(ps, reverse=name == "missing")
        assert [int(r["rank"]) for r in rows if r["list"] == name] == list(range(1, len(ps) + 1))
    for r in rows:  # the probabilities are the learner's own, within the worker's decode tolerance
        assert abs(float(r["probability"]) - probs[row[int(r["image_id"])], col[r["tag"]]]) < 0.02
        assert set(r["website_tags"].split()) == website[int(r["image_id"])]

    page = parse_html(out / "index.html")
    assert [(int(c[2]), c[3]) for c in page.tables["doubtful-table"][1:]] == doubtful
    assert [(int(c[2]), c[3]) for c in page.tables["missing-table"][1:]] == missing
    for src in page.images:
        assert (out / src).is_file() and (out / src).read_bytes()[:2] == b"\xff\xd8"  # a JPEG thumbnail
    assert {f"thumbs/{i}.jpg" for i, _ in doubtful + missing} == set(page.images)
    assert f"{unreadable}: not an image" in (out / "index.html").read_text()

    # --all scores every image: the wrong tag outside the holdout is found too.
    everything = stilltag(env, "audit", "--all", "--out", str(tmp_path / "all"), timeout_s=600)
    assert everything.returncode == 0, everything.stderr
    with (tmp_path / "all" / "audit.csv").open(newline="") as fh:
        found = {(int(r["image_id"]), r["tag"]) for r in csv.DictReader(fh) if r["list"] == "doubtful"}
    assert (outside.image_id, outside_tag) in found and (outside.image_id, outside_tag) not in doubtful


def test_audit_with_no_model_is_one_line(make_settings):
    settings = make_settings()
    upgrade(settings.database_url)
    rt = Runtime(settings)
    try:
        pictures = make_pictures(range(1, 31), size=(32, 32))
        with transaction(rt.sessions) as session:
            session.execute(sa.insert(image_tags), [{"image_id": p.image_id, "tag": t} for p in pictures
                                                    for t in p.tags])
    finally:
        rt.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLTAG_")} | {
        "STILLTAG_DATA_DIR": str(settings.data_dir), "STILLTAG_TRAIN_MIN_TAG_IMAGES": "1",
        "STILLTAG_HOLDOUT_PCT": "30"}
    done = stilltag(env, "audit", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: there is no champion model to audit with; pass --version, or register one with "
        "`stilltag models register PATH --promote`"]
    done = stilltag(env, "audit", "--version", "v9", check=False)
    assert done.returncode == 1 and "no model version 'v9'" in done.stderr and "Traceback" not in done.stderr
