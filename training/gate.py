"""The evaluation gate: a new model becomes champion only if it is not worse than the champion.

Both models are scored on the same holdout images, now, with the same pictures and the same
threshold mode (``STILLTAG_THRESHOLDS``: the global threshold, or each model's own per-tag
thresholds) — never against a number the champion once recorded on another holdout. "Not
worse" is: the new model's F2 is at least the champion's minus ``STILLTAG_GATE_TOLERANCE``. The
reason records both scores, the number of images and a bootstrap 95 % interval of the
difference (per-image F2 resampled, seeded), so an admin can tell a real gain from noise.

The first model becomes champion. A champion that cannot be scored (its artifact is missing, is
not the registered file, or will not load) is not replaced blindly: the new model stays a
candidate with the reason, and ``stilltag models promote`` overrides the gate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from shared import registry
from shared.errors import UserError, one_line
from shared.registry import ModelVersion
from shared.stores import Store
from training.dataset import Example
from training.evaluate import cutoffs, per_image_fbeta, predict, targets

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the interval is reproducible: the same scores give the same interval
BOOTSTRAP_LEVEL = 0.95


@dataclass(frozen=True)
class Comparison:
    """The new model and the champion on the same holdout images."""

    champion: str  # its version
    mode: str  # "global" or "per_tag"
    n_images: int
    new_f2: float
    champion_f2: float
    diff_low: float  # bootstrap interval of new_f2 - champion_f2
    diff_high: float
    note: str = ""  # e.g. the champion has no per-tag thresholds

    @property
    def diff(self) -> float:
        return self.new_f2 - self.champion_f2

    def describe(self) -> str:
        mode = "per-tag thresholds" if self.mode == "per_tag" else "the global threshold"
        note = f"; {self.note}" if self.note else ""
        return (f"on the same {self.n_images} holdout images with {mode}: F2 {self.new_f2:.4f} vs champion "
                f"{self.champion} {self.champion_f2:.4f}, difference {self.diff:+.4f} (95% bootstrap interval "
                f"{self.diff_low:+.4f} to {self.diff_high:+.4f}){note}")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    comparison: Comparison | None = None
    champion: str | None = None  # the champion the decision was made against

    def record(self) -> dict:
        """Stored in the new version's ``metrics["gate"]``."""
        out: dict[str, Any] = {"promote": self.promote, "reason": self.reason, "champion": self.champion}
        if self.comparison is not None:
            out.update(asdict(self.comparison))
        return out


class ChampionUnscorable(Exception):
    """The champion cannot be scored on the holdout; the message says why."""


def bootstrap_interval(new: np.ndarray, old: np.ndarray, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(new) - mean(old)``, resampling images (paired)."""
    diff = np.asarray(new, dtype=float) - np.asarray(old, dtype=float)
    if diff.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_resamples, diff.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def compare(*, champion: str, mode: str, new_scores: np.ndarray, champion_scores: np.ndarray,
            note: str = "") -> Comparison:
    """Per-image F2 of both models on the same images → the comparison."""
    if len(new_scores) != len(champion_scores):
        raise ValueError(f"{len(new_scores)} scores for the new model, {len(champion_scores)} for the champion")
    low, high = bootstrap_interval(new_scores, champion_scores)
    return Comparison(champion=champion, mode=mode, n_images=len(new_scores), new_f2=float(np.mean(new_scores)),
                      champion_f2=float(np.mean(champion_scores)), diff_low=low, diff_high=high, note=note)


def decide(*, f2: float, champion: ModelVersion | None, tolerance: float, comparison: Comparison | None = None,
           unscored: str | None = None) -> Decision:
    """Whether a model with holdout ``f2`` should replace ``champion``.

    Args:
        comparison: both models on the same holdout (needed when there is a champion).
        unscored: why the champion could not be scored, when it could not.
    """
    if champion is None:
        return Decision(True, f"first model (holdout F2 {f2:.4f})")
    if comparison is None:
        why = unscored or "it was not scored"
        return Decision(
            False,
            f"champion {champion.version} could not be scored on the holdout ({why}); this model scored "
            f"{f2:.4f}: promote it with `stilltag models promote` if it is better",
            champion=champion.version,
        )
    bar = comparison.champion_f2 - tolerance
    verdict = f"{comparison.describe()}; tolerance {tolerance:g}, bar {bar:.4f}"
    if comparison.new_f2 >= bar:
        return Decision(True, f"passed the gate: {verdict}", comparison, champion.version)
    return Decision(False, f"stays candidate: {verdict}", comparison, champion.version)


def champion_probabilities(champion: ModelVersion, *, store: Store, cache_dir: Path, holdout: list[Example],
                           read: Callable[[Example], Any], cpu: bool = True) -> tuple[np.ndarray, list[str]]:
    """The champion's probabilities on ``holdout`` and its vocabulary (its sha256 checked first).

    Raises:
        ChampionUnscorable: the artifact is missing, not the registered file, or does not load or run.
    """
    from shared.learner_pickle import load_learner

    try:
        path = registry.fetch_artifact(store=store, record=champion, cache_dir=cache_dir)
        learn = load_learner(path, cpu=cpu)
        return predict(learn, holdout, read=read), [str(t) for t in learn.dls.vocab]
    except Exception as exc:
        detail = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        raise ChampionUnscorable(one_line(detail)[:500]) from exc


def judge(*, f2: float, new_probs: np.ndarray, vocab: list[str], holdout: list[Example], champion: ModelVersion | None,
          mode: str, threshold: float, new_thresholds: dict[str, float] | None, tolerance: float,
          champion_probs: Callable[[ModelVersion], tuple[np.ndarray, list[str]]]) -> Decision:
    """Score the champion on the same holdout and decide.

    Args:
        f2: the new model's holdout F2 in ``mode`` (for the message when there is no champion).
        new_probs: the new model's probabilities on ``holdout``, in ``vocab`` order.
        mode: ``global`` (every tag at ``threshold``) or ``per_tag`` (each model's own thresholds;
            a champion without any is cut at ``threshold``, and the reason says so).
        champion_probs: the champion's probabilities on ``holdout`` and its vocabulary
            (``champion_probabilities``); raises ``ChampionUnscorable``.
    """
    if champion is None:
        return decide(f2=f2, champion=None, tolerance=tolerance)
    try:
        old_probs, old_vocab = champion_probs(champion)
    except ChampionUnscorable as exc:
        log.warning("champion %s could not be scored on the holdout: %s", champion.version, exc)
        return decide(f2=f2, champion=champion, tolerance=tolerance, unscored=str(exc))
    note = ""
    old_thresholds = None
    if mode == "per_tag":
        old_thresholds = registry.tag_thresholds(champion)
        if old_thresholds is None:
            note = f"champion {champion.version} has no per-tag thresholds, so it is cut at {threshold:g}"
    new_cut = cutoffs(vocab, threshold=threshold, per_tag=new_thresholds if mode == "per_tag" else None)
    old_cut = cutoffs(old_vocab, threshold=threshold, per_tag=old_thresholds)
    # Each model against the images' tags in its own vocabulary (the champion's may differ).
    new_scores = per_image_fbeta(new_probs, targets(holdout, vocab), new_cut)
    old_scores = per_image_fbeta(old_probs, targets(holdout, old_vocab), old_cut)
    comparison = compare(champion=champion.version, mode=mode, new_scores=new_scores, champion_scores=old_scores,
                         note=note)
    return decide(f2=f2, champion=champion, tolerance=tolerance, comparison=comparison)


def apply(*, session: Session, record: ModelVersion, decision: Decision) -> ModelVersion:
    """Promote ``record`` or record the reason, in ``session``'s transaction.

    A champion that changed since the decision (promoted by hand meanwhile) is not overridden.
    """
    current = registry.champion_version(session=session)
    if decision.promote and current != decision.champion:
        reason = (f"stays candidate: the champion changed to {current} while this model was judged against "
                  f"{decision.champion or 'none'}; {decision.reason}")
        registry.set_candidate_reason(session=session, version=record.version, reason=reason)
        return registry.get_version(session=session, version=record.version)
    if decision.promote:
        return registry.promote(session=session, version=record.version, reason=decision.reason)
    registry.set_candidate_reason(session=session, version=record.version, reason=decision.reason)
    return registry.get_version(session=session, version=record.version)
