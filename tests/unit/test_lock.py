"""The file lock used when the broker is not Redis (the Redis lock is in tests/integration)."""

from __future__ import annotations

import pytest

from training.lock import RetrainBusy, retrain_lock


def test_second_retrain_is_refused_while_the_first_holds_the_lock(make_settings):
    settings = make_settings()
    with retrain_lock(settings) as holder:
        assert "pid" in holder
        with pytest.raises(RetrainBusy, match=r"another retrain is running .*pid"), retrain_lock(settings):
            pass  # pragma: no cover - never reached
    with retrain_lock(settings):  # released: the next one runs
        pass


def test_lock_is_released_when_the_retrain_fails(make_settings):
    settings = make_settings()
    with pytest.raises(ZeroDivisionError), retrain_lock(settings):
        _ = 1 / 0
    with retrain_lock(settings):
        pass
