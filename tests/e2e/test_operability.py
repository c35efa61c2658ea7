"""A tagging worker as operators see it: Celery's own tools, Flower, events, health and metrics,
and a graceful remote shutdown that returns what the worker holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request

import pytest

from bench.stack import poll_until
from demo.synthetic import make_picture
from shared.config import Settings
from worker.process import WorkerProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TAGGER, TRAINER = "tagging1@ops", "training1@ops"


def celery(env, *args: str, timeout: float = 60) -> str:
    """The operator's own command: ``celery -A shared.celery_app ...``."""
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "shared.celery_app", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done.stdout + done.stderr


class Events:
    """Celery's worker events, as Flower receives them."""

    def __init__(self, broker_url: str, root):
        from shared.celery_app import create_app

        self.app = create_app(Settings(broker_url=broker_url, data_dir=root / "events"))
        self.seen: list[tuple[str, str]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._receiver = None

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict) -> None:
        if event.get("type", "").startswith("worker-"):
            self.seen.append((event["type"], event.get("hostname", "")))

    def start(self) -> Events:
        self._thread.start()
        self._ready.wait(30)
        return self

    def types_from(self, hostname: str) -> set[str]:
        return {t for t, h in list(self.seen) if h == hostname}

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)


def test_a_tagging_worker_is_a_celery_worker(stack_factory, tmp_path):
    stack = stack_factory(max_batch=8, max_wait_ms=50)
    broker = stack.settings_env["STILLTAG_BROKER_URL"]
    events = Events(broker, tmp_path).start()
    ids = list(range(1, 1041))
    picture = make_picture(7, size=(320, 180)).jpeg()
    for i in ids:
        stack.put_image(i, picture)
    tagger = WorkerProcess(stack.env, stack.root / "tagger.log", name=TAGGER).start()
    trainer = WorkerProcess(stack.env, stack.root / "trainer.log", queues="training", name=TRAINER).start()
    stack.workers += [tagger, trainer]
    flower_port = free_port()
    flower_log = open(stack.root / "flower.log", "w")
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "shared.celery_app", "flower",
                               f"--port={flower_port}", "--address=127.0.0.1"], env=stack.env,
                              stdout=flower_log, stderr=subprocess.STDOUT)
    try:
        tagger.wait_ready()
        trainer.wait_ready()
        assert tagger.probe("/livez")[0] == 200 and trainer.probe("/livez")[0] == 200

        # A second worker given the same metrics port stops at once, with one line saying why.
        clash = WorkerProcess(stack.env, stack.root / "clash.log", metrics_port=tagger.metrics_port).start()
        assert clash.proc.wait(timeout=180) == 2
        errors = [line for line in clash.log().splitlines() if line.startswith("error:")]
        assert errors == [f"error: cannot serve health and metrics on port {tagger.metrics_port} "
                          "(STILLTAG_METRICS_PORT): Address already in use; give each worker process on a host its "
                          "own port, or 0 to turn it off"], clash.log()
        assert "Traceback" not in clash.log()
        clash.stop()

        # Celery's own tools list both workers, each with its queues.
        # Named, so that the reply comes once both have answered (unnamed, it waits out the timeout).
        both = f"{TAGGER},{TRAINER}"
        ping = celery(stack.env, "inspect", "ping", "--timeout", "10", "--destination", both)
        assert f"{TAGGER}: OK" in ping and f"{TRAINER}: OK" in ping, ping
        queues = celery(stack.env, "inspect", "active_queues", "--timeout", "10", "--destination", both, "--json")
        by_node = json.loads(queues.strip().splitlines()[-1])
        assert {q["name"] for q in by_node[TAGGER]} == {"tagging", "backfill"}
        assert {q["name"] for q in by_node[TRAINER]} == {"training"}

        # Tag something through Celery's client (it sets the enqueue-time header).
        stack.cli("enqueue", *map(str, ids[:40]))
        stack.wait_for(ids[:40])
        metrics = tagger.probe("/metrics")[1]
        print("metrics excerpt:\n" + "\n".join(
            line for line in metrics.splitlines()
            if line.startswith("stilltag_") and not line.startswith(("stilltag_queue_wait_seconds_bucket",
                                                                      "stilltag_decode_seconds_bucket",
                                                                      "stilltag_inference_seconds_bucket",
                                                                      "stilltag_persist_seconds_bucket",
                                                                      "stilltag_enqueue_to_commit_seconds_bucket",
                                                                      "stilltag_batch_size_bucket"))
            and "_created" not in line))
        assert tagger.metric('stilltag_images_total{state="tagged"}') == 40
        assert tagger.metric("stilltag_enqueue_to_commit_seconds_count") == 40
        assert tagger.metric("stilltag_queue_wait_seconds_count") == 40
        assert 'stilltag_model_info{arch="resnet18",device="cpu",precision="fp32",version="v1"} 1.0' in metrics
        assert 'stilltag_queue_length{queue="tagging"}' in metrics
        assert 'stilltag_retrain_runs_total{outcome="failed"} 0.0' in trainer.probe("/metrics")[1]

        # Flower sees the tagging worker online.
        def flower_online():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/workers?json=1", timeout=5) as r:
                    rows = json.loads(r.read())["data"]
            except OSError:
                return None
            return {row["hostname"] for row in rows if row.get("status")} >= {TAGGER, TRAINER}

        poll_until(flower_online, 60, "Flower shows both workers online")

        # Heartbeats and worker-online were sent.
        poll_until(lambda: {"worker-online", "worker-heartbeat"} <= events.types_from(TAGGER), 30,
             "worker-online and heartbeat events from the tagging worker")

        # Remote control reaches the batching consumer: cancel_consumer stops it taking from a
        # queue (uploads still flow), add_consumer starts it again; active_queues follows.
        client = stack.redis
        reply = celery(stack.env, "control", "cancel_consumer", "backfill", "--destination", TAGGER)
        assert "no longer consuming from" in reply, reply

        def active_queues() -> set[str]:
            out = celery(stack.env, "inspect", "active_queues", "--timeout", "10", "--destination", TAGGER, "--json")
            return {q["name"] for q in json.loads(out.strip().splitlines()[-1])[TAGGER]}

        assert active_queues() == {"tagging"}
        stack.push("backfill", ids[40:60])
        stack.push("tagging", ids[60:64])
        stack.wait_for(ids[60:64])  # uploads are tagged while backfill waits
        assert client.llen("backfill") == 20 and not set(ids[40:60]) & set(stack.statuses())
        reply = celery(stack.env, "control", "add_consumer", "backfill", "--destination", TAGGER)
        assert "add consumer" in reply, reply
        stack.wait_for(ids[40:60])
        assert active_queues() == {"tagging", "backfill"}

        # A queue the tagging worker was not started with is refused in the reply, not only in its
        # log (Celery's own commands answer "ok" before they run), and nothing changes.
        for command in ("add_consumer", "cancel_consumer"):
            reply = celery(stack.env, "control", command, "training", "--destination", TAGGER)
            assert f"{TAGGER}: ERROR" in reply and "takes only the queues it was started with (tagging, backfill), " \
                "not 'training'; start a worker for it: stilltag worker --queues training" in reply, reply
        assert active_queues() == {"tagging", "backfill"}

        # Remote shutdown mid-work: the batch in the forward pass is finished and acknowledged,
        # everything else the worker holds goes back to the queue at once.
        ids = ids[64:]  # not tagged yet
        stack.push("backfill", ids)
        received = tagger.metric("stilltag_messages_received_total")
        poll_until(lambda: tagger.metric("stilltag_messages_received_total") >= received + 20, 60,
             "the worker holds backfill messages")
        celery(stack.env, "control", "shutdown", "--destination", TAGGER)
        assert tagger.proc.wait(60) == 0
        returned = int(re.search(r"(\d+) held message\(s\) returned to the queue", tagger.log()).group(1))
        assert returned > 0, "the worker held nothing when it stopped: the test shows nothing"
        held_left = client.hlen("unacked")
        waiting = client.llen("backfill")
        tagged = set(stack.statuses())
        assert held_left == 0, "the stopped worker left messages unacknowledged (they would wait for the sweep)"
        assert len(tagged & set(ids)) + waiting == len(ids), "a message was lost or duplicated"
        poll_until(lambda: "worker-offline" in events.types_from(TAGGER), 30, "a worker-offline event")
        print(f"control shutdown: {len(tagged & set(ids))} backfill images committed, {waiting} returned "
              "to the queue, 0 left unacknowledged")
    finally:
        events.stop()
        flower.terminate()
        flower.wait(30)
        flower_log.close()
