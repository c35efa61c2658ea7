"""``stilltag.tag`` as a plain Celery task (a stock Celery worker's path): same stages, one image."""

import pytest

from demo.synthetic import make_picture
from shared import registry
from shared.config import get_settings
from shared.db import transaction
from shared.migrate import upgrade
from shared.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def embedded(tmp_path, monkeypatch, tiny_learner):
    monkeypatch.setenv("STILLTAG_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    settings = get_settings()
    upgrade(settings.database_url)
    rt = Runtime(settings)
    with transaction(rt.sessions) as s:
        registry.register(session=s, store=rt.model_store, artifact=tiny_learner, arch="resnet18",
                          vocab=["unused"])
        registry.promote(session=s, version="v1")
    rt.images.put(1, make_picture(1).jpeg())
    rt.images.put(2, b"not an image")
    yield rt
    import worker.service

    if worker.service._process_tagger is not None:
        worker.service._process_tagger.close()
        worker.service._process_tagger = None
    rt.close()
    get_settings.cache_clear()


def test_the_celery_task_tags_one_image_with_the_preloaded_champion(embedded):
    import worker.service
    import worker.tasks
    from shared.celery_app import create_app
    from shared.constants import TAG_TASK

    app = create_app(get_settings())
    assert app.tasks[TAG_TASK].apply(args=[1]).get() == "tagged"
    tagger = worker.service._process_tagger
    assert app.tasks[TAG_TASK].apply(args=[2]).get() == "failed"
    assert worker.service._process_tagger is tagger  # loaded once per process, not per task
