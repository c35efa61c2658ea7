"""An upload's fetch and decode never wait behind the backfill a tagging worker holds: uploads have
a pool of their own (worker/service.py), and the consumer sends the first queue's messages there.

Where decoding is the bottleneck (a GPU, or a CPU whose forward pass is fast) a worker holds a
batch or two of backfill waiting for the decode pool; an upload queued behind them would wait for
all of those decodes before its own even started."""

import os
import threading

import pytest

from demo.synthetic import make_picture
from shared import registry
from shared.config import Settings
from shared.db import transaction
from shared.migrate import upgrade
from worker.service import Tagger

pytestmark = pytest.mark.integration


def test_an_upload_is_decoded_while_every_backfill_fetch_hangs(tmp_path, tiny_learner):
    images = tmp_path / "images"
    images.mkdir()
    settings = Settings(data_dir=tmp_path / "data", image_url=f"file://{images}/{{image_id}}.jpg")
    upgrade(settings.database_url)
    picture = make_picture(1).jpeg()
    (images / "1.jpg").write_bytes(picture)
    # The backfill's pictures are named pipes: reading one hangs until a writer comes, as a stuck
    # image store would. More of them than the backfill pool has threads, so some wait in its queue.
    threads = settings.fetch_concurrency + (settings.decode_workers or os.cpu_count() or 1)
    backfill_ids = list(range(1000, 1000 + threads + 8))
    for i in backfill_ids:
        os.mkfifo(images / f"{i}.jpg")

    def feed(i: int) -> None:  # the writer of one pipe: returns once its reader has the picture
        with open(images / f"{i}.jpg", "wb") as pipe:
            pipe.write(picture)

    tagger = Tagger(settings)
    feeders = [threading.Thread(target=feed, args=(i,), daemon=True) for i in backfill_ids]
    try:
        with transaction(tagger.runtime.sessions) as s:
            registry.register(session=s, store=tagger.runtime.model_store, artifact=tiny_learner, arch="resnet18",
                              vocab=["unused"])
            registry.promote(session=s, version="v1")
        tagger.load_champion()
        backfill = [tagger.submit(i) for i in backfill_ids]
        upload = tagger.submit(1, upload=True)
        prepared = upload.result(timeout=60)
        assert prepared.error is None and prepared.pixels is not None
        assert not any(f.done() for f in backfill), "the backfill's fetches should all still hang"

        for feeder in feeders:
            feeder.start()
        done = [f.result(timeout=60) for f in backfill]
        assert all(p.error is None and p.pixels is not None for p in done)
        results = tagger.run_batch([prepared, *done])
        assert [r.state for r in results] == ["tagged"] * (1 + len(backfill_ids))
    finally:
        for i in backfill_ids:  # a hung reader is released even when the test failed
            fd = os.open(images / f"{i}.jpg", os.O_RDWR | os.O_NONBLOCK)  # O_RDWR on a pipe never blocks
            os.close(fd)
        tagger.close()
