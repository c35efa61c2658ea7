"""Image bytes from an S3-compatible server (moto over HTTP), through the tagging worker's stages."""

import threading
import time

import pytest

from demo.synthetic import make_picture
from shared import registry
from shared.db import transaction
from shared.migrate import upgrade
from shared.stores import ImageSource, ObjectMissing
from worker.service import Tagger

pytestmark = pytest.mark.integration


def test_fetch_from_s3_and_a_missing_object(s3_server):
    s3_server.client.create_bucket(Bucket="stills")
    source = ImageSource("s3://stills/uploads/{image_id}.jpg", endpoint_url=s3_server.endpoint)
    source.put(1, b"image 1")
    assert source.fetch(1) == b"image 1"
    with pytest.raises(ObjectMissing, match=r"s3://stills/uploads/99\.jpg"):
        source.fetch(99)


def test_a_batch_is_fetched_concurrently_from_s3_and_a_missing_image_fails_alone(
        s3_server, make_settings, tiny_learner):
    s3_server.client.create_bucket(Bucket="stills")
    settings = make_settings(image_url="s3://stills/{image_id}.jpg", s3_endpoint_url=s3_server.endpoint,
                             fetch_concurrency=8)
    upgrade(settings.database_url)
    tagger = Tagger(settings)
    with transaction(tagger.runtime.sessions) as s:
        registry.register(session=s, store=tagger.runtime.model_store, artifact=tiny_learner, arch="resnet18",
                          vocab=[])
        registry.promote(session=s, version="v1")
    tagger.load_champion()
    ids = list(range(1, 17))
    for i in ids:
        tagger.runtime.images.put(i, make_picture(i).jpeg())

    in_flight, peak, lock = 0, 0, threading.Lock()
    real_get = tagger.runtime.images.store.get

    def counting_get(key, **kw):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            time.sleep(0.05)  # a slow network: overlap is visible
            return real_get(key, **kw)
        finally:
            with lock:
                in_flight -= 1

    tagger.runtime.images.store.get = counting_get
    try:
        results = tagger.tag_ids([*ids, 99])
    finally:
        tagger.close()
    assert [r.state for r in results] == ["tagged"] * 16 + ["failed"]
    assert "s3://stills/99.jpg" in results[-1].error
    assert peak >= 4
