"""The fault drill: broker and database faults under load, survived without a human.

Private Redis (append-only file, noeviction) and PostgreSQL servers of the test's own, two
tagging workers, a training worker and beat, all reaching Redis through a TCP proxy. Uploads
arrive all along. In turn: Redis SIGKILLed and restarted from its append-only file, Redis down
for 30 s, every TCP connection cut, PostgreSQL stopped, a tagging worker SIGKILLed mid-batch.
After each broker fault every tagging worker must consume again within 10 s of Redis
accepting connections; at the end every upload is tagged once, with no duplicate rows, the
Celery side of every worker answers ``inspect ping``, and beat's retrain reached the training
worker after the last broker fault.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import redis
import sqlalchemy as sa

from bench.stack import poll_until, push
from demo.synthetic import make_picture
from shared.config import Settings
from tests.e2e.conftest import build_stack
from tests.servers import PrivatePostgres, PrivateRedis, TcpProxy
from worker.process import WorkerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

BACK_WITHIN_S = 10.0  # the bound: consuming again this soon after Redis accepts connections
REDIS_DOWN_S = 30.0
POSTGRES_DOWN_S = 8.0
VISIBILITY_TIMEOUT_S = 10
UPLOADS_PER_S = 20
N_IMAGES = 4000  # more than the drill can enqueue: IDs never run out


class Uploads:
    """The website: one upload every 1/UPLOADS_PER_S s, straight to Redis, retried while it is down
    (a real website would keep them in its own outbox), so every ID pushed must be tagged."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.pushed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_id = 1
        while not self._stop.is_set() and next_id <= N_IMAGES:
            try:
                push(self.client, "tagging", [next_id])
            except redis.RedisError:
                self._stop.wait(0.1)
                continue
            self.pushed.append(next_id)
            next_id += 1
            self._stop.wait(1 / UPLOADS_PER_S)

    def burst(self, n: int) -> None:
        """``n`` uploads at once, for the kill phase."""
        start = (self.pushed[-1] if self.pushed else 0) + 1_000_000
        ids = list(range(start, start + n))
        push(self.client, "backfill", ids)
        self.pushed.extend(ids)

    def start(self) -> Uploads:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def _counters(workers) -> list[tuple[float, float]]:
    return [(w.metric("stilltag_messages_received_total"), w.metric("stilltag_batches_total")) for w in workers]


def _back(workers, before, back_at: float, label: str, figures: dict) -> None:
    """Wait until each tagging worker has taken a message and committed a batch since ``before``."""
    consume_s: list[float | None] = [None] * len(workers)
    commit_s: list[float | None] = [None] * len(workers)

    def all_back() -> bool:
        for i, (w, (received0, batches0)) in enumerate(zip(workers, before, strict=True)):
            received, batches = w.metric("stilltag_messages_received_total"), w.metric("stilltag_batches_total")
            now = time.monotonic() - back_at
            if consume_s[i] is None and received > received0:
                consume_s[i] = now
            if commit_s[i] is None and consume_s[i] is not None and batches > batches0:
                commit_s[i] = now
        return None not in consume_s and None not in commit_s

    poll_until(all_back, back_at + 60 - time.monotonic(), f"{label}: every worker consumes and commits again",
               detail=lambda: f"consumed after {consume_s} s, committed after {commit_s} s")
    figures[label] = {"consume_s": [round(s, 2) for s in consume_s], "commit_s": [round(s, 2) for s in commit_s]}
    print(f"drill: {label}: consuming again after {figures[label]['consume_s']} s, "
          f"first commit after {figures[label]['commit_s']} s (per worker, from Redis accepting connections)")
    assert max(consume_s) <= BACK_WITHIN_S, f"{label}: a worker took longer than {BACK_WITHIN_S} s: {consume_s}"


NODES = {"tagging1@drill", "tagging2@drill", "training@drill"}


def _celery_back(app, back_at: float, label: str, figures: dict) -> None:
    """Wait until every worker's Celery side (remote control) answers ``inspect ping`` again."""
    replies: dict = {}

    def all_answer() -> bool:
        nonlocal replies
        try:
            replies = app.control.inspect(timeout=1, destination=sorted(NODES)).ping() or {}  # back once all answer
        except Exception:  # this client's own connection is coming back too
            return False
        return set(replies) >= NODES

    poll_until(all_answer, back_at + BACK_WITHIN_S - time.monotonic(), f"{label}: every worker answers inspect ping",
               interval_s=0.2, detail=lambda: f"no reply from {NODES - set(replies)}")
    figures[label]["ping_s"] = round(time.monotonic() - back_at, 2)
    print(f"drill: {label}: every worker answers inspect ping after {figures[label]['ping_s']} s")


def _wait_tagged(engine, ids, timeout_s: float, workers=()) -> None:
    wanted = set(ids)
    missing: set[int] = set()

    def all_tagged() -> bool:
        with engine.connect() as c:
            got = {r[0] for r in c.execute(sa.text("SELECT image_id FROM tagging_status WHERE state = 'tagged'"))}
        missing.clear()
        missing.update(wanted - got)
        return not missing

    poll_until(all_tagged, timeout_s, f"{len(wanted)} uploads tagged", interval_s=0.2,
               detail=lambda: f"{len(missing)} not, e.g. {sorted(missing)[:10]}\n"
                              + "\n".join(w.log()[-2000:] for w in workers))


def test_fault_drill(tmp_path, tiny_learner):
    figures: dict = {}
    rds, pg = PrivateRedis(tmp_path / "redis"), PrivatePostgres()
    proxy = TcpProxy(rds.port)
    procs: list = []
    uploads = engine = None
    try:
        rds.start()
        pg.start()
        root = tmp_path / "stack"
        root.mkdir()
        stack = build_stack(root, tiny_learner, database_url=pg.url, broker_url=proxy.url(), max_batch=4,
                            max_wait_ms=20, visibility_timeout_s=VISIBILITY_TIMEOUT_S, restore_interval_s=1,
                            retrain_schedule="* * * * *")
        picture = make_picture(1, size=(160, 90)).jpeg()
        for i in range(1, N_IMAGES + 1):
            stack.put_image(i, picture)
        for i in range(1_000_000, 1_000_000 + N_IMAGES):
            stack.put_image(i, picture)
        taggers = [WorkerProcess(stack.env, root / f"tagging{n}.log", name=f"tagging{n}@drill").start()
                   for n in (1, 2)]
        training = WorkerProcess(stack.env, root / "training.log", queues="training", name="training@drill").start()
        beat_log = open(root / "beat.log", "w")
        beat = subprocess.Popen([sys.executable, "-m", "stilltag.cli", "beat"], env=stack.env, stdout=beat_log,
                                stderr=subprocess.STDOUT)
        procs = [*taggers, training]
        for w in procs:
            w.wait_ready()
        engine = sa.create_engine(pg.url, pool_pre_ping=True)  # it outlives a PostgreSQL restart
        from shared.celery_app import create_app

        app = create_app(Settings(broker_url=rds.url, database_url=pg.url, data_dir=root / "client"))
        uploads = Uploads(rds.url).start()
        _wait_tagged(engine, uploads.pushed[:20] or [1], 120, taggers)

        faults = (  # (label, break it, how long it stays broken, mend it)
            # Redis SIGKILLed, restarted from its append-only file two seconds later.
            ("redis SIGKILL + restart", rds.kill, 2.0, rds.start),
            (f"redis down {REDIS_DOWN_S:.0f} s", rds.stop, REDIS_DOWN_S, rds.start),
            # Every TCP connection to Redis cut under the workers, refused for 2 s, then back.
            ("TCP connections cut", proxy.cut, 2.0, proxy.restore),
        )
        for label, break_it, down_s, mend in faults:
            break_it()
            time.sleep(down_s)  # the fault itself lasts this long
            before = _counters(taggers)
            mend()  # returns once Redis answers (or the proxy forwards again)
            back_at = time.monotonic()
            _back(taggers, before, back_at, label, figures)
            _celery_back(app, back_at, label, figures)
        last_broker_fault_at = time.time()
        retrains_after_faults = training.metric("stilltag_retrain_runs_total")

        # 4. PostgreSQL stopped for a while: batches fail, their messages go back, nothing is lost.
        pg.stop()
        time.sleep(POSTGRES_DOWN_S)
        pg.start()
        pg_back = time.monotonic()
        _wait_tagged(engine, list(uploads.pushed), 120, taggers)
        figures["postgres back → all tagged s"] = round(time.monotonic() - pg_back, 1)

        # 5. A tagging worker SIGKILLed mid-batch: its messages come back by the visibility timeout.
        received0 = taggers[0].metric("stilltag_messages_received_total")
        uploads.burst(200)
        poll_until(lambda: taggers[0].metric("stilltag_messages_received_total") >= received0 + 8, 60,
                   "the first tagging worker holds burst messages", interval_s=0.02)
        taggers[0].kill()
        killed_at = time.monotonic()
        uploads.stop()
        _wait_tagged(engine, list(uploads.pushed), VISIBILITY_TIMEOUT_S + 120, taggers[1:])
        figures["SIGKILL → all tagged s"] = round(time.monotonic() - killed_at, 1)

        # Beat and the training worker: a scheduled retrain reached the worker after the faults.
        poll_until(lambda: training.metric("stilltag_retrain_runs_total") > retrains_after_faults,
                   last_broker_fault_at + 90 - time.time(), "a scheduled retrain reached the training worker "
                   "after the faults", interval_s=0.5)

        with engine.connect() as c:
            dupes = c.execute(sa.text("SELECT image_id, tag, model_version, count(*) FROM tag_suggestions "
                                      "GROUP BY image_id, tag, model_version HAVING count(*) > 1")).all()
            statuses = c.execute(sa.text("SELECT count(*) FROM tagging_status")).scalar()
        assert dupes == [], f"duplicate suggestion rows: {dupes[:5]}"
        assert statuses == len(set(uploads.pushed)), "an image was tagged that nobody enqueued, or one is missing"
        assert taggers[1].proc.poll() is None and training.proc.poll() is None, "a worker exited during the drill"
        for w in taggers:  # Celery's own consumer never took a tagging message, before or after its reconnects
            assert "Task stilltag.tag[" not in w.log(), f"{w.log_path.name}: Celery ran stilltag.tag as a task"
        figures["uploads"] = len(uploads.pushed)
        print(f"drill figures: {figures}")
    finally:
        if uploads is not None and uploads._thread.is_alive():
            uploads.stop()
        for w in procs:
            w.stop()
        if "beat" in locals():
            beat.terminate()
            beat.wait(30)
            beat_log.close()
        if engine is not None:
            engine.dispose()
        proxy.close()
        rds.stop()
        pg.remove()
