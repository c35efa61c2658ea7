"""Nothing lost: a worker killed mid-batch, a tampered model, the embedded (no-server) setup."""

import json
import time

import pytest
import redis

from demo.synthetic import make_picture
from tests.e2e.conftest import build_stack
from tests.envelopes import tag_envelope

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]  # worker start-up on a busy 2-core machine

VISIBILITY_TIMEOUT_S = 5
RESTORE_INTERVAL_S = 0.5


def _unacked_image_ids(client) -> set[int]:
    import base64

    ids = set()
    for raw in client.hvals("unacked"):
        message = json.loads(raw)[0]
        ids.add(json.loads(base64.b64decode(message["body"]))[0][0])
    return ids


def test_a_worker_killed_mid_batch_loses_no_image(stack_factory):
    stack = stack_factory(max_batch=8, max_wait_ms=50, visibility_timeout_s=VISIBILITY_TIMEOUT_S,
                          restore_interval_s=RESTORE_INTERVAL_S)
    ids = list(range(1, 301))
    for i in ids:
        stack.put_image(i, make_picture(i, size=(640, 360)).jpeg())
    victim, survivor = stack.worker("victim"), stack.worker("survivor")
    victim.wait_ready()
    survivor.wait_ready()
    client = redis.Redis.from_url(stack.settings_env["STILLTAG_BROKER_URL"])
    pipe = client.pipeline()
    for i in ids:
        pipe.lpush("backfill", json.dumps(tag_envelope(i, queue="backfill")))
    pipe.execute()

    while len(stack.statuses()) < 20:  # both workers are busy now
        time.sleep(0.01)
    in_flight_before = _unacked_image_ids(client)
    victim.kill()
    killed_at = time.monotonic()
    done_at_kill = set(stack.statuses())
    lost_in_flight = _unacked_image_ids(client) & in_flight_before - done_at_kill
    assert lost_in_flight, "the victim must have been holding unacknowledged images when it died"

    stack.wait_for(lost_in_flight, timeout_s=VISIBILITY_TIMEOUT_S + 60)
    back_s = time.monotonic() - killed_at
    statuses = stack.wait_for(ids, timeout_s=120)
    print(f"kill test: {len(lost_in_flight)} images in flight in the killed worker came back and were "
          f"committed {back_s:.1f} s after SIGKILL (visibility timeout {VISIBILITY_TIMEOUT_S} s, "
          f"restore interval {RESTORE_INTERVAL_S} s)")
    assert all(state == "tagged" for state, _, _ in statuses.values())
    assert back_s <= VISIBILITY_TIMEOUT_S + RESTORE_INTERVAL_S + 30
    rows = stack.suggestions()
    assert len(rows) == len(set((r[0], r[1]) for r in rows))  # no duplicate suggestion rows
    deadline = time.monotonic() + 30
    while client.hlen("unacked") or client.llen("backfill"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_tampered_model_file_is_refused(stack_factory):
    stack = stack_factory()
    artifact = stack.root / "models" / "v1" / "export.pkl"
    artifact.write_bytes(artifact.read_bytes()[:-10] + b"tampered!!")
    worker = stack.worker()
    assert worker.proc.wait(timeout=180) != 0
    assert "refusing to unpickle" in worker.log()


def test_embedded_defaults_tag_with_no_server(tmp_path, tiny_learner):
    """SQLite, local folders and the file-system broker: the same worker, no Redis, no PostgreSQL."""
    stack = build_stack(tmp_path, tiny_learner, database_url=f"sqlite:///{tmp_path / 'data' / 'stilltag.db'}",
                        broker_url=None)
    try:
        for i in (1, 2, 3):
            stack.put_image(i, make_picture(i).jpeg())
        stack.worker().wait_ready()
        stack.cli("enqueue", "1", "2")
        stack.cli("enqueue", "--queue", "backfill", "3")
        statuses = stack.wait_for([1, 2, 3], timeout_s=60)
        assert {s for s, _, _ in statuses.values()} == {"tagged"}
    finally:
        stack.close()
