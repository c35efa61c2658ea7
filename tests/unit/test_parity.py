"""shared.parity: the figures that decide whether a reduced precision may be served."""

import numpy as np
import pytest

from shared import parity


def test_figures_of_a_worked_example():
    base = np.array([[0.10, 0.50, 0.90], [0.19, 0.21, 0.30]])
    other = np.array([[0.11, 0.50, 0.90], [0.21, 0.19, 0.30]])  # 0.19 → 0.21 and 0.21 → 0.19 cross 0.2
    fig = parity.figures(base, other)
    assert fig["max_diff"] == pytest.approx(0.02)
    assert (fig["decisions"], fig["flips"]) == (6, 2) and fig["flip_share"] == pytest.approx(2 / 6)
    assert fig["p99_diff"] == pytest.approx(np.percentile([0.01, 0, 0, 0.02, 0.02, 0], 99))
    assert fig["within_limits"] is False


def test_decisions_are_counted_at_each_tags_own_cutoff():
    base = np.array([[0.29, 0.29]])
    other = np.array([[0.31, 0.31]])
    assert parity.figures(base, other, np.array([0.3, 0.5]))["flips"] == 1  # only the first tag's cutoff is crossed
    assert parity.figures(base, other)["flips"] == 0  # both above the default 0.2


def test_identical_probabilities_are_within_the_limits():
    p = np.random.default_rng(0).random((50, 9))
    assert parity.figures(p, p.copy()) == {"max_diff": 0.0, "p99_diff": 0.0, "flip_share": 0.0, "decisions": 450,
                                           "flips": 0, "within_limits": True}


def test_arrays_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        parity.figures(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-empty"):
        parity.figures(np.zeros((0, 3)), np.zeros((0, 3)))


def test_the_limits_are_inclusive():
    assert parity.within_limits(dict(parity.LIMITS))
    assert not parity.within_limits({**parity.LIMITS, "flip_share": 0.0010001})
    assert not parity.within_limits(None)


def test_describe():
    assert parity.describe({"max_diff": 0.00791, "p99_diff": 0.0041, "flips": 0, "decisions": 729}) == \
        "max 0.0079, p99 0.0041, 0 of 729 decisions flipped"
    assert parity.describe(None) == "not measured"
    assert parity.describe({"max_diff": 1}) == "unreadable record"


@pytest.mark.parametrize(("metrics", "found"), [
    ({"precision_parity": {"bf16": {"max_diff": 0.01}}}, {"bf16": {"max_diff": 0.01}}),
    ({"precision_parity": {"bf16": {"max_diff": 0.01}, "fp16": {"max_diff": 0.001}, "int8": {}}},
     {"bf16": {"max_diff": 0.01}, "fp16": {"max_diff": 0.001}}),  # only the precisions a worker serves
    ({"f2": 0.9}, {}),  # registered by hand, or before the retrain measured it
    (None, {}),
    ({"precision_parity": "bf16"}, {}),  # malformed: not a record, not a crash
    ({"precision_parity": {"bf16": [0.01], "fp16": {"max_diff": 0.001}}}, {"fp16": {"max_diff": 0.001}}),
])
def test_a_versions_parity_records_are_read_or_left_out(metrics, found):
    assert parity.recorded(metrics) == found
