"""The training worker's metrics: a restarted worker remembers the last retrain from the registry."""

import datetime as dt

import pytest

from shared import registry
from shared.config import Settings
from shared.db import transaction
from shared.migrate import upgrade
from shared.runtime import Runtime

pytestmark = pytest.mark.integration


def test_last_success_is_read_back_from_the_registry(tmp_path):
    from training import metrics
    from training.service import _restore_last_success

    settings = Settings(data_dir=tmp_path)
    upgrade(settings.database_url)
    rt = Runtime(settings)
    artifact = tmp_path / "export.pkl"
    artifact.write_bytes(b"not a learner; the registry only stores it")
    try:
        metrics.RETRAIN_LAST_SUCCESS.set(0)
        with transaction(rt.sessions) as s:  # imported by an admin: not a retrain
            registry.register(session=s, store=rt.model_store, artifact=artifact, arch="resnet18", vocab=["a"])
        _restore_last_success(rt)
        assert metrics.RETRAIN_LAST_SUCCESS._value.get() == 0
        with transaction(rt.sessions) as s:
            record = registry.register(session=s, store=rt.model_store, artifact=artifact, arch="resnet18",
                                       vocab=["a"], dataset_size=100, snapshot_at=dt.datetime.now(dt.UTC))
        _restore_last_success(rt)
        created = record.created_at if record.created_at.tzinfo else record.created_at.replace(tzinfo=dt.UTC)
        assert metrics.RETRAIN_LAST_SUCCESS._value.get() == pytest.approx(created.timestamp(), abs=1)
    finally:
        rt.close()
