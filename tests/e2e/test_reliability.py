"""Nothing lost: a worker killed mid-batch, a tampered model, the embedded (no-server) setup."""

import base64
import json
import re
import signal
import time
from pathlib import Path

import pytest

from bench.stack import poll_until
from demo.synthetic import make_picture
from tests.e2e.conftest import build_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]  # worker start-up on a busy 2-core machine

VISIBILITY_TIMEOUT_S = 5
RESTORE_INTERVAL_S = 0.5


def _unacked_image_ids(client) -> set[int]:
    ids = set()
    for raw in client.hvals("unacked"):
        message = json.loads(raw)[0]
        ids.add(json.loads(base64.b64decode(message["body"]))[0][0])
    return ids


def _held(worker) -> float:
    """Messages the worker took and has not written: its own account, from its /metrics."""
    return worker.metric("stilltag_messages_received_total") - worker.metric("stilltag_images_total")


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_worker_killed_mid_batch_loses_no_image(stack_factory):
    stack = stack_factory(max_batch=8, max_wait_ms=50, visibility_timeout_s=VISIBILITY_TIMEOUT_S,
                          restore_interval_s=RESTORE_INTERVAL_S)
    ids = list(range(1, 301))
    for i in ids:
        stack.put_image(i, make_picture(i, size=(640, 360)).jpeg())
    victim, survivor = stack.worker("victim"), stack.worker("survivor")
    victim.wait_ready()
    survivor.wait_ready()
    # The survivor is paused before anything is queued (its pop does not block, so it holds
    # nothing): every message taken until the kill is the victim's, and Redis's unacknowledged
    # set at the kill is exactly what the victim held.
    survivor.proc.send_signal(signal.SIGSTOP)
    poll_until(lambda: _stopped(survivor.proc.pid), 10, "the survivor paused")
    client = stack.redis
    try:
        stack.push("backfill", ids)
        poll_until(lambda: victim.metric('stilltag_images_total{state="tagged"}') >= 20 and _held(victim) > 0, 120,
                   "the victim has committed 20 images and holds more")
        held_by_metrics = _held(victim)
        victim.kill()
        killed_at = time.monotonic()
        held = _unacked_image_ids(client)  # before the survivor takes any
        queued = client.llen("backfill")
        committed = set(stack.statuses())
    finally:
        survivor.proc.send_signal(signal.SIGCONT)
    lost_in_flight = held - committed
    print(f"kill test: the victim held {len(held)} messages (its /metrics just before: {held_by_metrics:.0f}), "
          f"{len(lost_in_flight)} of them uncommitted; {len(committed)} images committed, {queued} still queued")
    assert lost_in_flight, "the victim must have been holding uncommitted images when it died"
    assert len(committed) + len(lost_in_flight) + queued == len(ids), "a message was neither queued, held nor committed"

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
    poll_until(lambda: not (client.hlen("unacked") or client.llen("backfill")), 30, "every message acknowledged")
    # Exactly the victim's held messages came back: the survivor took the queue's rest and those.
    assert survivor.metric("stilltag_messages_received_total") == queued + len(held)


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
        worker = stack.worker().wait_ready()
        stack.cli("enqueue", "1", "2")
        stack.cli("enqueue", "--queue", "backfill", "3")
        statuses = stack.wait_for([1, 2, 3], timeout_s=60)
        assert {s for s, _, _ in statuses.values()} == {"tagged"}
        # The consumer loop ran its periodic passes (the restore of expired messages first of all,
        # which only Redis has) without an error, and kombu described the file-system broker without
        # "No hostname was supplied": a healthy worker's log has no error and no warning.
        assert not re.search(r" (ERROR|WARNING) ", worker.log()), worker.log()[-3000:]
    finally:
        stack.close()
