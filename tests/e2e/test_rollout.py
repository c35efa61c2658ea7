"""A running tagging worker follows the champion between batches: no restart, nothing lost or doubled."""

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import redis

from demo.synthetic import make_picture
from shared import registry
from shared.db import make_engine, session_factory, transaction
from shared.stores import open_store
from tests.envelopes import tag_envelope

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]  # worker start-up on a busy 2-core machine

POLL_S = 0.5


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _batch_images(log: str) -> int:
    return sum(int(n) for n in re.findall(r"batch of (\d+) ", log))


def _wait_log(worker, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in worker.log():
        assert time.monotonic() < deadline, f"{text!r} not in the worker log:\n{worker.log()[-3000:]}"
        time.sleep(0.1)


def test_worker_switches_models_between_batches_while_messages_flow(stack_factory, tiny_learner):
    stack = stack_factory(max_batch=8, model_poll_s=POLL_S)
    picture = make_picture(3).jpeg()
    ids = list(range(1, 5001))  # more than the test will send: the producer runs until stopped
    for i in ids:
        stack.put_image(i, picture)
    worker = stack.worker().wait_ready()
    client = redis.Redis.from_url(stack.settings_env["STILLTAG_BROKER_URL"])
    sent: list[int] = []
    stop = threading.Event()

    def produce():  # uploads keep arriving during the switches
        for i in ids:
            if stop.is_set():
                return
            client.lpush("tagging", json.dumps(tag_envelope(i)))
            sent.append(i)
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        stack.wait_for(ids[:20])
        second = stack.root / "second-export.pkl"
        shutil.copyfile(tiny_learner, second)
        stack.cli("models", "register", str(second), "--promote")  # v2
        _wait_log(worker, "switched model v1 → v2")

        # v3 is registered with a broken file: the worker must keep v2 and say so.
        broken = stack.root / "broken-export.pkl"
        broken.write_bytes(b"this is not a pickled learner")
        engine = make_engine(stack.settings_env["STILLTAG_DATABASE_URL"])
        with transaction(session_factory(engine)) as s:
            registry.register(session=s, store=open_store(stack.settings_env["STILLTAG_MODEL_STORE"]),
                              artifact=broken, arch="resnet18", vocab=["x"])
            registry.promote(session=s, version="v3")
        engine.dispose()
        _wait_log(worker, "new champion v3 failed to load, keeping v2")
    finally:
        stop.set()
        producer.join()
    statuses = stack.wait_for(sent, timeout_s=180)
    versions = [statuses[i][2] for i in sent]
    assert all(statuses[i][0] == "tagged" for i in sent)
    assert versions[0] == "v1" and versions[-1] == "v2" and set(versions) == {"v1", "v2"}
    # Each image was tagged by exactly one model, and the worker processed each message once.
    per_image_versions = {}
    for image_id, _tag, _p, version in stack.suggestions():
        per_image_versions.setdefault(image_id, set()).add(version)
    assert all(len(v) == 1 for v in per_image_versions.values())
    deadline = time.monotonic() + 30
    while client.hlen("unacked"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _batch_images(worker.log()) == len(sent)
    assert worker.proc.poll() is None


def test_five_switches_do_not_grow_memory(stack_factory, tiny_learner):
    stack = stack_factory(max_batch=8, model_poll_s=POLL_S)
    second = stack.root / "second-export.pkl"
    shutil.copyfile(tiny_learner, second)
    stack.cli("models", "register", str(second))  # v2, a candidate
    picture = make_picture(4).jpeg()
    worker = stack.worker().wait_ready()
    client = redis.Redis.from_url(stack.settings_env["STILLTAG_BROKER_URL"])
    next_id = iter(range(1, 10_000))

    def tag_a_few() -> None:
        batch = [next(next_id) for _ in range(16)]
        for i in batch:
            stack.put_image(i, picture)
            client.lpush("tagging", json.dumps(tag_envelope(i)))
        stack.wait_for(batch)

    tag_a_few()
    tag_a_few()
    baseline = _rss_mb(worker.proc.pid)
    readings = []
    for n, version in enumerate(["v2", "v1", "v2", "v1", "v2"], start=1):
        stack.cli("models", "promote", version)
        time.sleep(POLL_S * 2)
        tag_a_few()  # the switch happens before this batch
        assert worker.log().count("switched model") == n
        readings.append(_rss_mb(worker.proc.pid))
    print(f"worker RSS: {baseline:.0f} MB before, after each of 5 switches: "
          + ", ".join(f"{r:.0f}" for r in readings) + " MB")
    assert max(readings) <= baseline * 1.15 + 50
    assert readings[-1] <= readings[0] * 1.05 + 20  # no growth from switch to switch
