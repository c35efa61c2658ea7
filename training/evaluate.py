"""Judging a model on the fixed holdout: F2 averaged over samples at the threshold, and per tag.

The scores are scikit-learn's on ``(images, tags)`` arrays so they can be checked without a model;
``predict`` is the one function that needs the learner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

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
    threshold: float  # the global threshold (with per-tag thresholds: the one tags without their own use)
    n_images: int
    per_tag: list[TagScore] = field(default_factory=list)
    mode: str = "global"  # or "per_tag": each tag at its own threshold

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


def cutoffs(vocab: list[str], *, threshold: float, per_tag: dict[str, float] | None = None) -> np.ndarray:
    """Each tag's threshold: its own from ``per_tag``, else ``threshold``."""
    per_tag = per_tag or {}
    return np.array([float(per_tag.get(t, threshold)) for t in vocab], dtype=float)


def per_image_fbeta(probs: np.ndarray, truth: np.ndarray, cut: np.ndarray | float, *, beta: float = BETA) -> np.ndarray:
    """Each image's F-beta at ``cut`` (one threshold, or one per tag); the mean is the samples average.

    An image with nothing right (no true positive) scores 0, as ``zero_division=0`` gives.
    """
    pred = np.asarray(probs, dtype=float) >= cut
    truth = np.asarray(truth).astype(bool)
    tp = (pred & truth).sum(axis=1)
    fp = (pred & ~truth).sum(axis=1)
    fn = (~pred & truth).sum(axis=1)
    b2 = beta * beta
    denominator = (1 + b2) * tp + b2 * fn + fp
    return np.divide((1 + b2) * tp, denominator, out=np.zeros(len(tp), dtype=float), where=denominator > 0)


def score(probs: np.ndarray, truth: np.ndarray, vocab: list[str], *, threshold: float, beta: float = BETA,
          per_tag_thresholds: dict[str, float] | None = None) -> Evaluation:
    """Scores of probabilities ``(images, tags)`` against 0/1 ``truth`` at ``threshold``.

    Precision, recall and F-beta are scikit-learn's (``average="samples"`` for the totals, per
    tag for the table). An undefined ratio (no tag predicted, a tag with no support) counts as 0
    (``zero_division=0``). With ``per_tag_thresholds`` each tag is cut at its own threshold
    (tags without one at ``threshold``).
    """
    from sklearn.metrics import precision_recall_fscore_support

    probs = np.asarray(probs, dtype=float)
    truth = np.asarray(truth).astype(bool)
    if probs.shape != truth.shape or probs.ndim != 2 or probs.shape[1] != len(vocab):
        raise ValueError(f"probabilities {probs.shape}, truth {truth.shape} and {len(vocab)} tags do not match")
    n = probs.shape[0]
    mode = "global" if per_tag_thresholds is None else "per_tag"
    if n == 0:
        return Evaluation(0.0, 0.0, 0.0, 0.0, threshold, 0, [], mode)
    pred = probs >= cutoffs(vocab, threshold=threshold, per_tag=per_tag_thresholds)
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
        mode=mode,
    )


PREDICT_CHUNK_IMAGES = 256  # pictures held in memory at a time when they are read here


def predict(learn, examples: list[Example], *, read: Callable[[Example], Any] | None = None,
            cbs: list | None = None) -> np.ndarray:
    """Probabilities ``(images, tags)`` through the learner's validation pipeline.

    Args:
        read: reads an example's picture (e.g. ``shared.learner_parts.ImageFromStore``). Given,
            the pictures are read here and the learner's own ``get_x`` is skipped
            (``test_dl(rm_type_tfms=1)``), so any exported learner can be scored on the same
            pictures, however it read its training images (a hand-registered champion too).
            Not given, the learner reads them with its ``get_x``.
        cbs: fastai callbacks for ``get_preds`` (``reduced_parity``'s autocast).
    """
    if not examples:
        return np.zeros((0, len(learn.dls.vocab)), dtype=np.float32)
    parts = []
    chunk = len(examples) if read is None else PREDICT_CHUNK_IMAGES
    for start in range(0, len(examples), chunk):
        items = examples[start:start + chunk]
        if read is None:
            dl = learn.dls.test_dl(items, num_workers=0)
        else:
            dl = learn.dls.test_dl([read(ex) for ex in items], rm_type_tfms=1, num_workers=0)
        with learn.no_bar():
            probs, _ = learn.get_preds(dl=dl, cbs=cbs)
        parts.append(probs.float().numpy())
    return np.concatenate(parts)


def reduced_parity(learn, examples: list[Example], fp32_probs: np.ndarray, *, precision: str,
                   cut: np.ndarray | float, images: int, device: str = "cpu",
                   read: Callable[[Example], Any] | None = None) -> dict:
    """``precision`` (``bf16`` or ``fp16``) autocast against fp32 on the first ``images`` of
    ``examples``, whose fp32 probabilities are ``fp32_probs`` (``predict``'s):
    ``shared.parity.figures``, with the pictures counted and the device they ran on. Stored with the
    model version; a tagging worker's ``auto`` serves in a reduced precision only a model whose
    record for it is within the limits."""
    import torch
    from fastai.callback.core import Callback

    from shared import parity

    class Autocast(Callback):
        """The model alone under autocast, as in the tagging worker: the batch transforms before it
        (``Normalize``) stay fp32 (under autocast they differed by up to 0.14 and tripled the figures),
        and the logits go to the activation as fp32. (fastai's ``MixedPrecision`` is CUDA-only.)"""

        order = 10

        def before_batch(self):
            self.amp = torch.autocast(device, dtype=dtype)
            self.amp.__enter__()

        def after_pred(self):  # a test batch has no loss, so its autocast ends here
            self.amp.__exit__(None, None, None)
            self.learn.pred = self.pred.float()

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = min(len(examples), images)
    reduced = predict(learn, examples[:n], read=read, cbs=[Autocast()])
    return {**parity.figures(fp32_probs[:n], reduced, cut), "images": n, "device": device}


def evaluate(learn, examples: list[Example], *, threshold: float) -> Evaluation:
    """The learner's scores on ``examples`` (the holdout)."""
    vocab = list(learn.dls.vocab)
    return score(predict(learn, examples), targets(examples, vocab), vocab, threshold=threshold)


def parity_records(learn, examples: list[Example], fp32_probs: np.ndarray, *, cut: np.ndarray | float,
                   images: int, device: str = "cpu", read: Callable[[Example], Any] | None = None) -> dict[str, dict]:
    """``reduced_parity`` for each reduced precision (``shared.parity.REDUCED``), by precision: the
    model version's ``precision_parity`` record."""
    from shared import parity

    return {p: reduced_parity(learn, examples, fp32_probs, precision=p, cut=cut, images=images, device=device, read=read)
            for p in parity.REDUCED}
