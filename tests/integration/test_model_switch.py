"""A champion that fails to load once (an S3 blip) is tried again, not given up on until the next
promotion; the worker keeps tagging with its current model meanwhile."""

import shutil

import pytest

from shared import registry
from shared.config import Settings
from shared.db import transaction
from shared.migrate import upgrade
from worker import service
from worker.service import Tagger

pytestmark = pytest.mark.integration


def test_a_champion_that_failed_to_load_is_tried_again(tmp_path, tiny_learner):
    settings = Settings(data_dir=tmp_path, model_poll_s=0.01)
    upgrade(settings.database_url)
    tagger = Tagger(settings)
    try:
        with transaction(tagger.runtime.sessions) as s:
            for _ in range(2):
                registry.register(session=s, store=tagger.runtime.model_store, artifact=tiny_learner, arch="resnet18",
                                  vocab=["unused"])
            registry.promote(session=s, version="v1")
        tagger.load_champion()
        stored = tmp_path / "models" / "v2" / "export.pkl"
        away = tmp_path / "v2-away.pkl"
        shutil.move(stored, away)  # the store cannot give v2 for now
        with transaction(tagger.runtime.sessions) as s:
            registry.promote(session=s, version="v2")

        tagger.maybe_switch(force=True)
        assert tagger.loaded.version == "v1" and tagger._failed_version == "v2"

        shutil.move(away, stored)  # the store is back
        tagger.maybe_switch(force=True)
        assert tagger.loaded.version == "v1", "retried at once: a broken model would be reloaded every poll"

        tagger._failed_at -= service.FAILED_MODEL_RETRY_S + 1  # as if that long had passed
        tagger.maybe_switch(force=True)
        assert tagger.loaded.version == "v2"
    finally:
        tagger.close()
