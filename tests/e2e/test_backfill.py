"""``stilltag backfill`` through a real tagging worker: every image once, the queue bounded, resumable
after a signal or a Redis outage, and a re-tag by the training worker after a promotion."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest
import sqlalchemy as sa

from bench.stack import Stack, poll_until
from demo.synthetic import make_picture
from shared.constants import BACKFILL_ENQUEUED_KEY, BACKFILL_QUEUE, TRAINING_QUEUE
from tests.e2e.conftest import build_stack
from tests.servers import PrivateRedis
from worker.process import WorkerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # worker start-up and thousands of images on 2 cores

QUERY = "SELECT id AS image_id FROM stills"


def add_archive(stack: Stack, n_images: int) -> list[int]:
    """The website's table of stills (``stills.id``) and an image file for each."""
    ids = list(range(1, n_images + 1))
    picture = make_picture(7).jpeg()
    for i in ids:
        stack.put_image(i, picture)
    with stack.engine().begin() as c:
        c.execute(sa.text("CREATE TABLE stills (id bigint PRIMARY KEY)"))
        c.execute(sa.text("INSERT INTO stills (id) SELECT generate_series(1, :n)"), {"n": n_images})
    return ids


class QueueSampler:
    """``LLEN backfill`` sampled every few milliseconds in a thread; ``highest`` is the largest seen."""

    def __init__(self, client):
        self.client, self.highest, self.samples = client, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.highest = max(self.highest, self.client.llen(BACKFILL_QUEUE))
            self.samples += 1

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def start_backfill(stack: Stack, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stilltag.cli", "backfill", *args], env=stack.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def enqueued(stack: Stack) -> int:
    return int(stack.redis.get(BACKFILL_ENQUEUED_KEY) or 0)


def assert_tagged_once_by(stack: Stack, ids: list[int], version: str) -> None:
    statuses = stack.statuses()
    assert sorted(statuses) == ids
    assert {s for s, _e, _v in statuses.values()} == {"tagged"}
    assert {v for _s, _e, v in statuses.values()} == {version}
    rows = Counter((image_id, tag, v) for image_id, tag, _p, v in stack.suggestions())
    assert rows and max(rows.values()) == 1  # one row per image, tag and version
    assert {image_id for image_id, _t, v in rows if v == version} == set(ids)


def test_backfill_tags_every_image_once_and_keeps_the_queue_bounded(stack_factory):
    stack = stack_factory(max_batch=16, max_wait_ms=20)
    ids = add_archive(stack, 2000)
    worker = stack.worker().wait_ready()
    stack.push("tagging", ids[:40])  # uploads already tagged by the champion: skipped
    stack.wait_for(ids[:40])

    dry = stack.cli("backfill", "--query", QUERY, "--dry-run")
    assert dry.stdout.strip() == str(len(ids) - 40)

    with QueueSampler(stack.redis) as sampler:
        done = stack.cli("backfill", "--query", QUERY, "--max-pending", "64", "--progress-every", "0.5")
    assert sampler.samples > 100
    assert 0 < sampler.highest <= 64, sampler.highest
    assert "backfill done for v1: enqueued 1,960, skipped 40 (done by the champion) of 2,000" in done.stdout
    assert done.stdout.startswith("backfill: 0/2,000 (0%) enqueued 0 skipped 0 tagged 0 at 0/s")  # plain lines
    assert enqueued(stack) == 1960

    stack.wait_for(ids, timeout_s=600)
    assert_tagged_once_by(stack, ids, "v1")
    assert worker.metric("stilltag_images_total") == len(ids)  # each image went through the model once
    assert worker.metric("stilltag_backfill_enqueued_total") == 1960
    assert worker.metric("stilltag_backfill_pending") == 0

    again = stack.cli("backfill", "--query", QUERY)
    assert "enqueued 0, skipped 2,000" in again.stdout
    assert stack.redis.llen(BACKFILL_QUEUE) == 0 and enqueued(stack) == 1960
    print(f"highest LLEN backfill {sampler.highest} (bound 64)")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_backfill_stops_on_a_signal_and_carries_on(stack_factory, signum):
    stack = stack_factory(max_batch=16, max_wait_ms=20)
    ids = add_archive(stack, 1200)
    stack.worker().wait_ready()

    first = start_backfill(stack, "--query", QUERY, "--max-pending", "48")
    poll_until(lambda: enqueued(stack) >= 300, 300, "the first run enqueues 300")
    first.send_signal(signum)
    _out, err = first.communicate(timeout=60)
    assert first.returncode == 128 + signum, (first.returncode, err)
    assert err.count("\n") == 1 and err.startswith(f"backfill interrupted by {signum.name}: enqueued "), err
    assert "run the same command again to carry on" in err
    sent_first = enqueued(stack)
    assert 300 <= sent_first < len(ids)

    second = stack.cli("backfill", "--query", QUERY, "--max-pending", "48")
    assert "resumed after image" in second.stdout, second.stdout
    stack.wait_for(ids, timeout_s=600)
    assert enqueued(stack) == len(ids)  # the second run sent what the first had not, nothing twice
    assert_tagged_once_by(stack, ids, "v1")


def test_backfill_survives_a_redis_outage(tmp_path, pg_url, tiny_learner):
    redis_server = PrivateRedis(tmp_path / "redis").start()
    (tmp_path / "stack").mkdir()
    stack = build_stack(tmp_path / "stack", tiny_learner, database_url=pg_url, broker_url=redis_server.url,
                        max_batch=16, max_wait_ms=20)
    try:
        ids = add_archive(stack, 800)
        stack.worker().wait_ready()
        run = start_backfill(stack, "--query", QUERY, "--max-pending", "32")
        poll_until(lambda: enqueued(stack) >= 200, 300, "the backfill enqueues 200")
        redis_server.kill()
        _out, err = run.communicate(timeout=120)
        assert run.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith("error: cannot reach"), err
        assert "run the same command again to carry on" in err

        redis_server.start()  # same port and append-only file: the queue and the cursor are back
        again = stack.cli("backfill", "--query", QUERY, "--max-pending", "32")
        assert "resumed after image" in again.stdout and "backfill done for v1" in again.stdout, again.stdout
        stack.wait_for(ids, timeout_s=600)
        statuses = stack.statuses()
        assert sorted(statuses) == ids and {v for _s, _e, v in statuses.values()} == {"v1"}
    finally:
        stack.close()
        redis_server.stop()


def test_promotion_retags_the_archive_on_the_training_worker(stack_factory, tiny_learner):
    stack = stack_factory(max_batch=16, max_wait_ms=20, model_poll_s=0.5, retag_on_promote="true",
                          backfill_query=QUERY)
    ids = add_archive(stack, 300)
    worker = stack.worker().wait_ready()
    stack.cli("backfill", "--stale")
    stack.wait_for(ids, timeout_s=300)
    assert_tagged_once_by(stack, ids, "v1")

    second = stack.root / "second-export.pkl"
    shutil.copyfile(tiny_learner, second)
    registered = stack.cli("models", "register", str(second))
    assert "re-tag" not in registered.stdout  # registered, not promoted
    promoted = stack.cli("models", "promote", "v2")
    assert "re-tag enqueued" in promoted.stdout, promoted.stdout
    assert stack.redis.llen(TRAINING_QUEUE) == 2  # v1's registration with --promote asked for one too
    # The training worker starts once the tagging worker tags with v2, so no image is tagged by v1 on the way.
    poll_until(lambda: 'version="v2"' in worker.probe("/metrics")[1], 120, "the tagging worker switches to v2")
    trainer = WorkerProcess(stack.env, stack.root / "trainer.log", queues="training").start()
    try:
        poll_until(lambda: {v for _s, _e, v in stack.statuses().values()} == {"v2"}, 600,
                   "every image re-tagged by v2", detail=lambda: trainer.log()[-3000:])
        poll_until(lambda: "re-tag for v2 done: enqueued 300" in trainer.log(), 60, "the re-tag reports its end",
                   detail=lambda: trainer.log()[-3000:])
        assert "re-tag for v1 skipped: v2 is the champion now" in trainer.log()
    finally:
        trainer.stop()
    statuses = stack.statuses()
    assert sorted(statuses) == ids
    rows = Counter((image_id, v) for image_id, _t, _p, v in stack.suggestions())
    assert {i for i, v in rows if v == "v2"} == set(ids) and {i for i, v in rows if v == "v1"} == set(ids)
