"""A running tagging worker follows the champion between batches: no restart, nothing lost or doubled."""

import shutil
import threading
import time
from pathlib import Path

import pytest

from bench.stack import poll_until, push
from demo.synthetic import make_picture
from shared import registry
from shared.db import make_engine, session_factory, transaction
from shared.stores import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]  # worker start-up on a busy 2-core machine

POLL_S = 0.5


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _model(worker) -> tuple[str | None, float]:
    """The version the worker tags with (``stilltag_model_info``) and how often it has switched."""
    return (worker.model_info() or {}).get("version"), worker.metric("stilltag_model_switches_total")


def _wait_model(worker, version: str, switches: int, timeout_s: float = 120) -> None:
    poll_until(lambda: _model(worker) == (version, switches), timeout_s,
               f"the worker tags with {version} after {switches} switch(es)",
               detail=lambda: f"now {_model(worker)}; its log ends:\n{worker.log()[-3000:]}")


def test_worker_switches_models_between_batches_while_messages_flow(stack_factory, tiny_learner):
    stack = stack_factory(max_batch=8, model_poll_s=POLL_S)
    picture = make_picture(3).jpeg()
    ids = list(range(1, 5001))  # more than the test will send: the producer runs until stopped
    for i in ids:
        stack.put_image(i, picture)
    worker = stack.worker().wait_ready()
    client = stack.redis
    sent: list[int] = []
    stop = threading.Event()

    def produce():  # uploads keep arriving during the switches
        for i in ids:
            if stop.is_set():
                return
            push(client, "tagging", [i])
            sent.append(i)
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        stack.wait_for(ids[:20])
        second = stack.root / "second-export.pkl"
        shutil.copyfile(tiny_learner, second)
        stack.cli("models", "register", str(second), "--promote")  # v2
        _wait_model(worker, "v2", 1)

        # v3 is registered with a broken file: the worker must keep v2 and say so.
        broken = stack.root / "broken-export.pkl"
        broken.write_bytes(b"this is not a pickled learner")
        engine = make_engine(stack.settings_env["STILLTAG_DATABASE_URL"])
        with transaction(session_factory(engine)) as s:
            registry.register(session=s, store=open_store(stack.settings_env["STILLTAG_MODEL_STORE"]),
                              artifact=broken, arch="resnet18", vocab=["x"])
            registry.promote(session=s, version="v3")
        engine.dispose()
        # No metric counts a failed load: the worker's log line is what the operator sees.
        poll_until(lambda: "new champion v3 failed to load, keeping v2" in worker.log(), 120,
                   "the worker refuses v3", detail=lambda: worker.log()[-3000:])
        assert _model(worker) == ("v2", 1)
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
    poll_until(lambda: not client.hlen("unacked"), 30, "every message acknowledged")
    assert worker.metric("stilltag_messages_received_total") == len(sent)
    assert worker.metric("stilltag_batch_size_sum") == len(sent), "a message was processed twice, or not at all"
    assert _model(worker) == ("v2", 1)
    assert worker.proc.poll() is None


def test_five_switches_do_not_grow_memory(stack_factory, tiny_learner):
    stack = stack_factory(max_batch=8, model_poll_s=POLL_S)
    second = stack.root / "second-export.pkl"
    shutil.copyfile(tiny_learner, second)
    stack.cli("models", "register", str(second))  # v2, a candidate
    picture = make_picture(4).jpeg()
    worker = stack.worker().wait_ready()
    next_id = iter(range(1, 10_000))

    def tag_a_few() -> set[str]:
        """The model versions that tagged 16 new images."""
        batch = [next(next_id) for _ in range(16)]
        for i in batch:
            stack.put_image(i, picture)
        stack.push("tagging", batch)
        statuses = stack.wait_for(batch)
        return {statuses[i][2] for i in batch}

    tag_a_few()
    tag_a_few()
    baseline = _rss_mb(worker.proc.pid)
    readings = []
    for n, version in enumerate(["v2", "v1", "v2", "v1", "v2"], start=1):
        stack.cli("models", "promote", version)
        _wait_model(worker, version, n)  # an idle worker follows the champion too
        assert tag_a_few() == {version}
        readings.append(_rss_mb(worker.proc.pid))
    print(f"worker RSS: {baseline:.0f} MB before, after each of 5 switches: "
          + ", ".join(f"{r:.0f}" for r in readings) + " MB")
    assert max(readings) <= baseline * 1.15 + 50
    assert readings[-1] <= readings[0] * 1.05 + 20  # no growth from switch to switch
