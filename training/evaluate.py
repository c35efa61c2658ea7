"""Judging a model on the fixed holdout: F2 averaged over samples at the threshold, and per tag.

The scores are scikit-learn's on ``(images, tags)`` arrays so they can be checked without a model;
``predict`` is the one function that needs the learner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from training.dataset import Example

BETA = 2.0  # the seed project's F2: recall weighs four times as much as precision


@dataclass(frozen=True)
class TagScore:
    tag: str
    precision: float
    recall: float
    f2: float
    support: int  # holdout images that have the tag


@dataclass
class Evaluation:
    f2: float  # samples-averaged F-beta at the threshold: the gate's number
    accuracy: float  # fastai's accuracy_multi: share of (image, tag) decisions that are right
    precision: float  # samples-averaged
    recall: float  # samples-averaged
    threshold: float
    n_images: int
    per_tag: list[TagScore] = field(default_factory=list)

    def metrics(self) -> dict:
        """The record stored in ``model_versions.metrics`` (JSON)."""
        return {
            "f2": self.f2, "accuracy_multi": self.accuracy, "precision": self.precision, "recall": self.recall,
            "threshold": self.threshold, "holdout_size": self.n_images,
            "per_tag": {s.tag: {k: v for k, v in asdict(s).items() if k != "tag"} for s in self.per_tag},
        }


def targets(examples: list[Example], vocab: list[str]) -> np.ndarray:
    """0/1 matrix ``(images, tags)``; tags outside ``vocab`` are ignored."""
    index = {t: i for i, t in enumerate(vocab)}
    out = np.zeros((len(examples), len(vocab)), dtype=np.int8)
    for row, ex in enumerate(examples):
        for tag in ex.tags:
            if tag in index:
                out[row, index[tag]] = 1
    return out


def score(probs: np.ndarray, truth: np.ndarray, vocab: list[str], *, threshold: float, beta: float = BETA) -> Evaluation:
    """Scores of probabilities ``(images, tags)`` against 0/1 ``truth`` at ``threshold``.

    Precision, recall and F-beta are scikit-learn's (``average="samples"`` for the totals, per
    tag for the table). An undefined ratio (no tag predicted, a tag with no support) counts as 0
    (``zero_division=0``).
    """
    from sklearn.metrics import precision_recall_fscore_support

    probs = np.asarray(probs, dtype=float)
    truth = np.asarray(truth).astype(bool)
    if probs.shape != truth.shape or probs.ndim != 2 or probs.shape[1] != len(vocab):
        raise ValueError(f"probabilities {probs.shape}, truth {truth.shape} and {len(vocab)} tags do not match")
    n = probs.shape[0]
    if n == 0:
        return Evaluation(0.0, 0.0, 0.0, 0.0, threshold, 0, [])
    pred = probs >= threshold
    precision, recall, f2, _ = precision_recall_fscore_support(truth, pred, beta=beta, average="samples",
                                                               zero_division=0)
    tag_p, tag_r, tag_f, support = precision_recall_fscore_support(truth, pred, beta=beta, average=None,
                                                                   zero_division=0)
    per_tag = [
        TagScore(tag, float(tag_p[i]), float(tag_r[i]), float(tag_f[i]), int(support[i])) for i, tag in enumerate(vocab)
    ]
    return Evaluation(
        f2=float(f2),
        accuracy=float((pred == truth).mean()),  # fastai's accuracy_multi, not sklearn's subset accuracy
        precision=float(precision),
        recall=float(recall),
        threshold=threshold,
        n_images=n,
        per_tag=per_tag,
    )


def predict(learn, examples: list[Example]) -> np.ndarray:
    """Probabilities ``(images, tags)`` through the learner's validation pipeline."""
    dl = learn.dls.test_dl(examples, num_workers=0)
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=dl)
    return probs.float().numpy()


def evaluate(learn, examples: list[Example], *, threshold: float) -> Evaluation:
    """The learner's scores on ``examples`` (the holdout)."""
    vocab = list(learn.dls.vocab)
    return score(predict(learn, examples), targets(examples, vocab), vocab, threshold=threshold)
