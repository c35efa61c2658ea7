"""The training report's HTML, parsed: every picture it references exists (and is stored with the
version), the tables have a row per tag / per least-sure image, and both holdout F2s are shown."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from demo.synthetic import VOCAB, make_pictures
from shared.learner_parts import Example, ImageFromStore
from training.evaluate import score, targets
from training.report import PR_CURVE_TAGS, UNCERTAIN_IMAGES, least_sure, write_report
from training.thresholds import choose

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"


class Page(HTMLParser):
    """The images and the tables (by id: rows of cell texts) of an HTML page."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._table = attrs.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture
def report(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    holdout = []
    for pic in make_pictures(range(1, 41), seed=4, size=(96, 72)):
        (images / f"{pic.image_id}.jpg").write_bytes(pic.jpeg())
        holdout.append(Example(pic.image_id, tuple(pic.tags)))
    vocab = sorted(VOCAB)
    truth = targets(holdout, vocab)
    rng = np.random.default_rng(0)
    probs = np.clip(truth * 0.45 + rng.random(truth.shape) * 0.5, 0, 1)  # informative, not perfect
    valid_probs = np.clip(truth * 0.45 + rng.random(truth.shape) * 0.5, 0, 1)
    thresholds = choose(valid_probs, truth, vocab, default=0.2, floor=0.05, ceiling=0.8, min_positives=3)
    evaluation = score(probs, truth, vocab, threshold=0.2)
    per_tag = score(probs, truth, vocab, threshold=0.2, per_tag_thresholds=thresholds.as_dict())
    epochs = [{"phase": "frozen", "epoch": 1, "train_loss": 0.7, "valid_loss": 0.6, "f2": 0.5, "seconds": 1.0}]
    out = tmp_path / "report"
    files = write_report(out, summary={"arch": "resnet18"}, evaluation=evaluation, epochs=epochs,
                         batch_losses=[{"phase": "frozen", "losses": [0.9, 0.8, 0.7]}],
                         lr_find={"lrs": [1e-5, 1e-3, 1e-1], "losses": [0.9, 0.5, 2.0]}, lr=1e-3,
                         per_tag_evaluation=per_tag, thresholds=thresholds, holdout_probs=probs, holdout=holdout,
                         read=ImageFromStore(f"file://{images}/{{image_id}}.jpg"), mode="per_tag")
    page = Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    return {"out": out, "files": files, "page": page, "vocab": vocab, "evaluation": evaluation, "per_tag": per_tag,
            "thresholds": thresholds, "probs": probs, "holdout": holdout}


def test_every_referenced_picture_exists_and_is_stored(report):
    out, page, files = report["out"], report["page"], report["files"]
    assert "pr_curves.png" in page.images and "per_tag.png" in page.images
    thumbnails = [src for src in page.images if src.startswith("uncertain/")]
    assert len(thumbnails) == UNCERTAIN_IMAGES
    for src in page.images:
        path = out / src
        assert path.is_file(), src
        assert path.read_bytes()[:8 if src.endswith(".png") else 2] == (PNG_MAGIC if src.endswith(".png") else JPEG_MAGIC)
        assert files[f"report/{src}"] == path  # stored with the version, under the same name


def test_tables_have_a_row_per_tag_and_per_least_sure_image(report):
    tables, vocab, thresholds = report["page"].tables, report["vocab"], report["thresholds"]
    per_tag = tables["per-tag"]
    assert per_tag[0][:5] == ["tag", "precision", "recall", "F2", "support"] and "own threshold" in per_tag[0]
    assert sorted(row[0] for row in per_tag[1:]) == vocab
    own = thresholds.as_dict()
    for row in per_tag[1:]:
        assert row[5].startswith(f"{own[row[0]]:.3f}")

    uncertain = tables["uncertain"]
    assert len(uncertain) == 1 + UNCERTAIN_IMAGES
    by_id = {ex.image_id: ex for ex in report["holdout"]}
    for row in uncertain[1:]:
        assert row[2] == " ".join(by_id[int(row[0])].tags)  # the true tags

    both = {row[0]: row[1:] for row in tables["f2-both"]}
    assert both["F2"] == [f"{report['evaluation'].f2:.4f}", f"{report['per_tag'].f2:.4f}"]


def test_the_least_sure_images_are_the_nearest_to_a_threshold(report):
    probs, vocab, holdout = report["probs"], report["vocab"], report["holdout"]
    cut = np.full(len(vocab), 0.2)
    rows = least_sure(probs, vocab, holdout, cut=cut, n=5)
    distance = np.abs(probs - 0.2).min(axis=1)
    expected = [holdout[i].image_id for i in np.argsort(distance, kind="stable")[:5]]
    assert [r["image_id"] for r in rows] == expected
    first = rows[0]
    assert abs(first["unsure_prob"] - 0.2) == pytest.approx(distance.min())
    i = next(k for k, ex in enumerate(holdout) if ex.image_id == first["image_id"])
    assert {t for t, _ in first["suggested"]} == {vocab[j] for j in range(len(vocab)) if probs[i, j] >= 0.2}


def test_pr_curves_cover_at_most_the_most_frequent_tags(report):
    assert len(report["vocab"]) <= PR_CURVE_TAGS  # the demo's vocabulary: every tag has a panel
    assert Path(report["out"] / "pr_curves.png").stat().st_size > 10_000
