"""The gate: the first model wins, then a model wins only within the tolerance of the champion.

``decide`` is checked on its own; ``apply`` on real registry records in SQLite and PostgreSQL.
"""

from __future__ import annotations

import pytest

from shared import registry
from shared.constants import MODEL_CANDIDATE, MODEL_CHAMPION
from shared.db import make_engine, session_factory, transaction
from shared.migrate import upgrade
from shared.registry import ModelVersion
from shared.stores import LocalStore
from training.gate import apply, decide


def champion(f2) -> ModelVersion:
    return ModelVersion(version="v1", sha256="0" * 64, arch="resnet18", vocab=["a"],
                        metrics={} if f2 is None else {"f2": f2}, status=MODEL_CHAMPION)


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
    decision = decide(f2=f2, champion=champion(champion_f2), tolerance=tolerance)
    assert decision.promote is promote
    assert "v1" in decision.reason and f"{champion_f2:.4f}" in decision.reason


def test_a_champion_without_a_score_is_not_replaced_blindly():
    decision = decide(f2=0.9, champion=champion(None), tolerance=0.0)
    assert not decision.promote and "stilltag models promote" in decision.reason


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def sessions(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'gate.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def register(sessions, tmp_path, f2: float) -> ModelVersion:
    artifact = tmp_path / f"export-{f2}.pkl"
    artifact.write_bytes(f"not a real learner {f2}".encode())
    with transaction(sessions) as session:
        return registry.register(session=session, store=LocalStore(tmp_path / "models"), artifact=artifact,
                                 arch="resnet18", vocab=["a"], metrics={"f2": f2})


def test_apply_both_ways_on_the_registry(sessions, tmp_path):
    first = register(sessions, tmp_path, 0.60)
    with transaction(sessions) as session:
        record, decision = apply(session=session, record=first, tolerance=0.0)
    assert record.status == MODEL_CHAMPION and record.reason.startswith("first model")

    worse = register(sessions, tmp_path, 0.50)
    with transaction(sessions) as session:
        record, decision = apply(session=session, record=worse, tolerance=0.05)
    assert record.status == MODEL_CANDIDATE and record.reason.startswith("stays candidate")
    with sessions() as session:
        assert registry.champion_version(session=session) == first.version
        assert registry.get_version(session=session, version=worse.version).reason == decision.reason

    better = register(sessions, tmp_path, 0.58)  # worse than 0.60, but within a 0.05 tolerance
    with transaction(sessions) as session:
        record, decision = apply(session=session, record=better, tolerance=0.05)
    assert record.status == MODEL_CHAMPION and record.reason.startswith("passed the gate")
    with sessions() as session:
        assert registry.champion_version(session=session) == better.version
