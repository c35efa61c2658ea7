"""Image bytes from an S3-compatible server (moto over HTTP), fetched concurrently."""

import threading
import time

import pytest

from shared.stores import ImageSource, ObjectMissing

pytestmark = pytest.mark.integration


def test_fetch_many_from_s3_with_a_missing_image(s3_server):
    s3_server.client.create_bucket(Bucket="stills")
    source = ImageSource("s3://stills/uploads/{image_id}.jpg", endpoint_url=s3_server.endpoint, concurrency=8)
    for i in range(1, 6):
        source.put(i, f"image {i}".encode())
    got = source.fetch_many([1, 2, 99, 3, 4, 5])
    assert got[0] == b"image 1" and got[5] == b"image 5"
    assert isinstance(got[2], ObjectMissing) and "s3://stills/uploads/99.jpg" in str(got[2])
    source.close()


def test_a_batch_is_fetched_concurrently(s3_server):
    s3_server.client.create_bucket(Bucket="stills")
    source = ImageSource("s3://stills/{image_id}.jpg", endpoint_url=s3_server.endpoint, concurrency=8)
    for i in range(16):
        source.put(i, b"x")
    in_flight, peak, lock = 0, 0, threading.Lock()
    real_get = source.store.get

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

    source.store.get = counting_get
    assert source.fetch_many(list(range(16))) == [b"x"] * 16
    assert peak >= 4
    source.close()
