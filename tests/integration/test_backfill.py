"""The backfill loop on real Redis and PostgreSQL, without a worker: the messages it sends, its
bound, its cursor, its metrics, and the re-tag request a promotion sends."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import threading

import pytest
import redis
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest

from bench.stack import stilltag
from shared import backfill as bf
from shared import registry
from shared.backfill import INTERRUPTED, IdSelection, QuerySelection
from shared.config import ENV_PREFIX
from shared.constants import BACKFILL_ENQUEUED_KEY, BACKFILL_QUEUE, RETAG_TASK, TAG_TASK, TRAINING_QUEUE
from shared.db import make_engine, session_factory, tagging_status, transaction
from shared.health import QueueCollector
from shared.messages import check_envelope
from shared.migrate import upgrade
from shared.stores import open_store

pytestmark = pytest.mark.integration


@pytest.fixture
def site(pg_url, redis_url, make_settings, tmp_path):
    """Settings on a migrated database with a champion v1 and a ``stills`` table of IDs 1..50."""
    upgrade(pg_url)
    settings = make_settings(database_url=pg_url, broker_url=redis_url, model_store=f"file://{tmp_path / 'models'}")
    engine = make_engine(pg_url)
    artifact = tmp_path / "export.pkl"
    artifact.write_bytes(b"not loaded by these tests")
    with transaction(session_factory(engine)) as s:
        registry.register(session=s, store=open_store(settings.model_store), artifact=artifact, arch="resnet18",
                          vocab=["a"])
        registry.promote(session=s, version="v1")
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE stills (id bigint PRIMARY KEY)"))
        c.execute(sa.text("INSERT INTO stills SELECT generate_series(1, 50)"))
    client = redis.Redis.from_url(redis_url)
    yield settings, session_factory(engine), client
    client.close()
    engine.dispose()


def queued_ids(client) -> list[int]:
    """The image IDs of the messages on ``backfill``, oldest first, each checked as a worker would."""
    ids = []
    for raw in reversed(client.lrange(BACKFILL_QUEUE, 0, -1)):
        envelope, reason = check_envelope(raw)
        assert envelope is not None, reason
        assert envelope["headers"]["task"] == TAG_TASK
        assert envelope["properties"]["delivery_info"]["routing_key"] == BACKFILL_QUEUE
        assert isinstance(envelope["headers"]["stilltag_enqueued_at"], float)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids.append(args[0])
    return ids


def tag(sessions, ids, version: str = "v1") -> None:
    now = dt.datetime.now(dt.UTC)
    with sessions.begin() as s:
        s.execute(sa.insert(tagging_status), [
            {"image_id": i, "state": "tagged", "model_version": version, "created_at": now, "updated_at": now}
            for i in ids])


def test_bounded_run_stops_and_resumes_from_its_cursor(site):
    settings, sessions, client = site
    tag(sessions, [2, 4])
    stop = threading.Event()
    selection = QuerySelection("SELECT id AS image_id FROM stills")

    def stop_when_full(counts) -> None:  # the queue is full and nobody consumes: stop the run there
        if client.llen(BACKFILL_QUEUE) >= 10:
            stop.set()

    first = bf.backfill(settings, selection, max_pending=10, stop=stop, report=stop_when_full)
    assert first.state == INTERRUPTED and first.champion == "v1"
    assert first.counts.enqueued == 10 and client.llen(BACKFILL_QUEUE) == 10
    assert queued_ids(client) == [1, 3, 5, 6, 7, 8, 9, 10, 11, 12]  # ascending; 2 and 4 skipped
    assert int(client.get(BACKFILL_ENQUEUED_KEY)) == 10

    client.delete(BACKFILL_QUEUE)  # as if a worker took them
    second = bf.backfill(settings, selection, max_pending=100)
    assert second.state == bf.DONE and second.counts.resumed_after == 12
    assert second.counts.enqueued == 38 and second.counts.total == 38
    assert queued_ids(client) == list(range(13, 51))
    assert int(client.get(BACKFILL_ENQUEUED_KEY)) == 48
    assert not client.keys("stilltag:backfill:cursor:*")  # done: the next run starts over


def test_dry_run_counts_and_sends_nothing(site):
    settings, sessions, client = site
    tag(sessions, range(1, 21))
    tag(sessions, range(21, 26), version="v0")  # an older model's statuses are stale
    outcome = bf.backfill(settings, QuerySelection("SELECT id AS image_id FROM stills"), dry_run=True)
    assert outcome.counts.enqueued == 30 and outcome.counts.skipped == 20
    assert client.llen(BACKFILL_QUEUE) == 0 and not client.keys("stilltag:backfill:*")


def test_second_run_after_everything_is_tagged_sends_nothing(site):
    settings, sessions, client = site
    first = bf.backfill(settings, IdSelection([7, 3, 3, 9]), max_pending=100)
    assert first.counts.enqueued == 3 and queued_ids(client) == [3, 7, 9]
    tag(sessions, [3, 7, 9])
    client.delete(BACKFILL_QUEUE)
    second = bf.backfill(settings, IdSelection([3, 7, 9]), max_pending=100)
    assert second.counts.enqueued == 0 and second.counts.skipped == 3 and client.llen(BACKFILL_QUEUE) == 0


def test_no_champion_is_one_line(site, pg_url):
    settings, sessions, _client = site
    with sessions.begin() as s:
        s.execute(sa.text("UPDATE model_versions SET status = 'retired'"))
    with pytest.raises(bf.BackfillError, match=r"there is no champion to tag with: register one with"):
        bf.backfill(settings, IdSelection([1]))


def test_backfill_metrics_come_from_redis(site):
    _settings, _sessions, client = site
    registry_ = CollectorRegistry()
    registry_.register(QueueCollector(client))
    text = generate_latest(registry_).decode()
    assert "stilltag_backfill_enqueued_total 0.0" in text and "stilltag_backfill_pending 0.0" in text
    client.incrby(BACKFILL_ENQUEUED_KEY, 7)
    client.lpush(BACKFILL_QUEUE, "a", "b")
    text = generate_latest(registry_).decode()
    assert "stilltag_backfill_enqueued_total 7.0" in text and "stilltag_backfill_pending 2.0" in text
    assert 'stilltag_queue_length{queue="backfill"} 2.0' in text  # the same LLEN, read once per scrape


def test_rollback_enqueues_a_retag_for_the_training_worker(site, tmp_path, pg_url, redis_url):
    settings, sessions, client = site
    artifact = tmp_path / "second.pkl"
    shutil.copyfile(tmp_path / "export.pkl", artifact)
    with transaction(sessions) as s:
        registry.register(session=s, store=open_store(settings.model_store), artifact=artifact, arch="resnet18",
                          vocab=["a"])
        registry.promote(session=s, version="v2")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {
        ENV_PREFIX + "DATA_DIR": str(tmp_path / "data"), ENV_PREFIX + "DATABASE_URL": pg_url,
        ENV_PREFIX + "BROKER_URL": redis_url, ENV_PREFIX + "MODEL_STORE": settings.model_store,
        ENV_PREFIX + "RETAG_ON_PROMOTE": "true", ENV_PREFIX + "BACKFILL_QUERY": "SELECT id AS image_id FROM stills",
    }
    done = stilltag(env, "models", "rollback")
    assert "v1 is the champion again" in done.stdout and "re-tag enqueued" in done.stdout
    (raw,) = client.lrange(TRAINING_QUEUE, 0, -1)
    envelope, reason = check_envelope(raw)
    assert envelope is not None, reason
    assert envelope["headers"]["task"] == RETAG_TASK and envelope["headers"]["eta"]
    _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert kwargs == {"version": "v1", "reason": "rollback"}

    off = {k: v for k, v in env.items() if k != ENV_PREFIX + "RETAG_ON_PROMOTE"}
    stilltag(off, "models", "promote", "v2")
    assert client.llen(TRAINING_QUEUE) == 1  # the setting is off: nothing more


@pytest.mark.timeout(600)
def test_a_promotion_by_the_gate_enqueues_a_retag(make_settings, pg_url, redis_url):
    from tests.integration.test_retrain import N_IMAGES, SMALL_RUN
    from tests.learners import seed_website
    from training.service import retrain

    settings = make_settings(database_url=pg_url, broker_url=redis_url, retag_on_promote=True,
                             backfill_query="SELECT DISTINCT image_id FROM image_tags", **SMALL_RUN)
    seed_website(settings, N_IMAGES)
    record = retrain(settings)
    assert record.status == "champion"
    client = redis.Redis.from_url(redis_url)
    try:
        (raw,) = client.lrange(TRAINING_QUEUE, 0, -1)
    finally:
        client.close()
    envelope, reason = check_envelope(raw)
    assert envelope is not None, reason
    assert envelope["headers"]["task"] == RETAG_TASK
    _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert kwargs == {"version": record.version, "reason": "promoted by the gate"}
