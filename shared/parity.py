"""How far a reduced precision's probabilities are from fp32's, and whether that is close enough.

A reduced precision may be a device's default only within ``LIMITS`` (README, "Precision"): the
largest difference in probability, its 99th percentile, and the share of tag decisions that flip at
the cutoffs. The retrain measures bf16 and fp16 for each model it registers
(``model_versions.metrics["precision_parity"]``); a tagging worker's ``auto`` reads those records
(bf16 on a CPU, fp16 then bf16 on a GPU); the benchmark uses the same figures.
"""

from __future__ import annotations

import numpy as np

LIMITS = {"max_diff": 0.02, "p99_diff": 0.005, "flip_share": 0.001}
THRESHOLD = 0.2  # the seed's threshold: where decisions are counted when no cutoffs are given
METRICS_KEY = "precision_parity"  # in model_versions.metrics: {"bf16": figures(...), "fp16": figures(...)}
REDUCED = ("bf16", "fp16")  # the precisions measured against fp32


def figures(base: np.ndarray, other: np.ndarray, cut: np.ndarray | float = THRESHOLD) -> dict:
    """``other`` against ``base`` (``(images, tags)`` probabilities; ``cut`` one threshold or one per tag)."""
    if base.shape != other.shape or base.size == 0:
        raise ValueError(f"parity needs two non-empty arrays of one shape, got {base.shape} and {other.shape}")
    diff = np.abs(other.astype(np.float64) - base.astype(np.float64))
    flips = (other >= cut) != (base >= cut)
    out: dict = {"max_diff": float(diff.max()), "p99_diff": float(np.percentile(diff, 99)),
                 "flip_share": float(flips.mean()), "decisions": int(flips.size), "flips": int(flips.sum())}
    out["within_limits"] = within_limits(out)
    return out


def records(stored: object) -> dict[str, dict]:
    """The parity records of a model version's ``metrics["precision_parity"]`` (``stored``), by
    precision; a malformed one is left out (``auto`` then serves as if it were not measured)."""
    if not isinstance(stored, dict):
        return {}
    return {p: stored[p] for p in REDUCED if isinstance(stored.get(p), dict)}


def recorded(metrics: dict | None) -> dict[str, dict]:
    """A model version's parity records, by precision (``metrics["precision_parity"]``): ``{}`` when none."""
    return records((metrics or {}).get(METRICS_KEY))


def within_limits(record: dict | None) -> bool:
    """Whether a parity record (as ``figures`` makes it) is within every limit; no record: no."""
    if not isinstance(record, dict):
        return False
    try:
        return all(float(record[k]) <= limit for k, limit in LIMITS.items())
    except (KeyError, TypeError, ValueError):
        return False


def describe(record: dict | None) -> str:
    """One line for a log or a report: ``max 0.0079, p99 0.0041, 0 of 729 decisions flipped``."""
    if not isinstance(record, dict):
        return "not measured"
    try:
        return (f"max {float(record['max_diff']):.4f}, p99 {float(record['p99_diff']):.4f}, "
                f"{int(record['flips'])} of {int(record['decisions'])} decisions flipped")
    except (KeyError, TypeError, ValueError):
        return "unreadable record"
