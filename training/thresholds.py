"""Per-tag thresholds: each tag cut where its F2 on the validation split is highest.

Chosen on the validation split only (the images that pick the epoch), never on the holdout that
judges the model, so the holdout F2 under per-tag thresholds stays an honest estimate. A tag
with fewer than ``STILLTAG_THRESHOLD_MIN_POSITIVES`` validation images keeps the global
threshold (``STILLTAG_THRESHOLD``): a handful of positives would pick a threshold by chance.
Thresholds lie in ``[STILLTAG_THRESHOLD_FLOOR, STILLTAG_THRESHOLD_CEILING]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.evaluate import BETA


@dataclass(frozen=True)
class TagThreshold:
    tag: str
    threshold: float
    f2: float  # the tag's F2 on the validation split at ``threshold``
    positives: int  # validation images that have the tag
    fallback: bool  # too few positives: the global threshold


@dataclass(frozen=True)
class Thresholds:
    per_tag: list[TagThreshold] = field(default_factory=list)
    default: float = 0.2
    floor: float = 0.05
    ceiling: float = 0.8
    min_positives: int = 10

    def as_dict(self) -> dict[str, float]:
        return {t.tag: t.threshold for t in self.per_tag}

    def record(self) -> dict:
        """What is stored with the model version (``metrics["thresholds"]`` and the rule)."""
        return {
            "thresholds": self.as_dict(),
            "thresholds_rule": {
                "split": "valid", "beta": BETA, "floor": self.floor, "ceiling": self.ceiling,
                "min_positives": self.min_positives, "default": self.default,
                "fallback_tags": [t.tag for t in self.per_tag if t.fallback],
            },
        }


def best_threshold(probs: np.ndarray, truth: np.ndarray, *, floor: float, ceiling: float,
                   beta: float = BETA) -> tuple[float, float]:
    """``(threshold, F-beta)`` maximising one tag's F-beta with the threshold in ``[floor, ceiling]``.

    The candidates are scikit-learn's ``precision_recall_curve`` thresholds (every distinct
    probability) inside the bounds, plus the bounds themselves. Among equal scores the highest
    threshold wins: the same recall with fewer tags to show.
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, candidates = precision_recall_curve(truth, probs)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    b2 = beta * beta
    denominator = b2 * precision + recall
    f = np.divide((1 + b2) * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    inside = (candidates >= floor) & (candidates <= ceiling)
    scored = list(zip(candidates[inside].tolist(), f[inside].tolist(), strict=True))
    for bound in (floor, ceiling):
        scored.append((bound, _fbeta_at(probs, truth, bound, beta)))
    best = max(scored, key=lambda tf: (round(tf[1], 12), tf[0]))
    return float(best[0]), float(best[1])


def _fbeta_at(probs: np.ndarray, truth: np.ndarray, threshold: float, beta: float) -> float:
    from sklearn.metrics import fbeta_score

    return float(fbeta_score(truth, probs >= threshold, beta=beta, zero_division=0))


def choose(probs: np.ndarray, truth: np.ndarray, vocab: list[str], *, default: float, floor: float, ceiling: float,
           min_positives: int, beta: float = BETA) -> Thresholds:
    """Each tag's threshold from validation probabilities ``(images, tags)`` and 0/1 ``truth``."""
    probs = np.asarray(probs, dtype=float)
    truth = np.asarray(truth).astype(bool)
    per_tag = []
    for j, tag in enumerate(vocab):
        positives = int(truth[:, j].sum())
        if positives < min_positives:
            f = _fbeta_at(probs[:, j], truth[:, j], default, beta) if positives else 0.0
            per_tag.append(TagThreshold(tag, float(default), f, positives, fallback=True))
            continue
        threshold, f = best_threshold(probs[:, j], truth[:, j], floor=floor, ceiling=ceiling, beta=beta)
        per_tag.append(TagThreshold(tag, threshold, f, positives, fallback=False))
    return Thresholds(per_tag=per_tag, default=default, floor=floor, ceiling=ceiling, min_positives=min_positives)
