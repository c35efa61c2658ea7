"""A throw-away stilltag stack for ``stilltag bench``: a claimed Redis DB, a database, JPEGs at
movie sizes in a temporary folder, a registered champion and a real tagging worker process.

Timing is taken from the ``stilltag:tagged`` events, which the worker publishes after its
batch's transaction commits; the database is checked afterwards for every image.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from shared.config import ENV_PREFIX
from shared.constants import TAG_TASK, TAGGED_CHANNEL
from worker.process import WorkerProcess

# Frame sizes of movie stills: 720p, 2.40:1 at 1920 wide, 4:3 and 4:3 1080p.
MOVIE_SIZES = ((1280, 720), (1920, 800), (1024, 768), (1440, 1080))
JPEG_QUALITY = 90
GRAIN_SIGMA = 6.0  # film grain: generated pictures are flat; real stills have texture (and bigger files)
REDIS_DB_RANGE = range(2, 16)  # DB 0 and 1 are left to whoever else uses the server
CLAIM_KEY = "stilltag:bench-claim"


def movie_jpegs(count: int, *, distinct_per_size: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs cycling through the movie sizes, built from a small pool of distinct pictures."""
    from PIL import Image

    from demo.synthetic import make_picture

    rng = np.random.default_rng(seed)
    pool: list[bytes] = []
    for k in range(distinct_per_size):
        for j, size in enumerate(MOVIE_SIZES):
            picture = make_picture(1 + k * len(MOVIE_SIZES) + j, seed=seed, size=size).image
            pixels = np.asarray(picture, dtype=np.float32)
            pixels = np.clip(pixels + rng.normal(0, GRAIN_SIGMA, pixels.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
            pool.append(buf.getvalue())
    return [pool[i % len(pool)] for i in range(count)]


def envelope(image_id: int, queue: str) -> str:
    """A Celery protocol-2 message, built by hand as the website does (no Celery client)."""
    task_id = str(uuid.uuid4())
    body = base64.b64encode(json.dumps([[image_id], {}, {}]).encode()).decode()
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": TAG_TASK, "id": task_id, "root_id": task_id, "argsrepr": f"({image_id},)"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": queue}, "delivery_tag": str(uuid.uuid4())},
    })


@contextmanager
def claimed_redis_db(host_url: str):
    """An empty Redis DB number, claimed atomically (like the tests do), flushed afterwards."""
    import redis

    for db in REDIS_DB_RANGE:
        client = redis.Redis.from_url(f"{host_url}/{db}")
        if client.dbsize() == 0 and client.set(CLAIM_KEY, "1", nx=True):
            try:
                yield f"{host_url}/{db}"
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError(f"no empty Redis DB among {REDIS_DB_RANGE.start}..{REDIS_DB_RANGE.stop - 1} on {host_url}")


@contextmanager
def database(folder: Path, pg_admin_url: str):
    """SQLite in ``folder``, or a fresh PostgreSQL database when an admin URL is given (dropped after)."""
    if not pg_admin_url:
        yield f"sqlite:///{folder / 'bench.db'}"
        return
    import psycopg

    name = f"stilltag_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_admin_url.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Events:
    """Listens on ``stilltag:tagged`` and records when each image's event arrived."""

    def __init__(self, redis_url: str):
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(TAGGED_CHANNEL)
        self.seen: dict[int, tuple[float, str]] = {}
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="bench-events", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg is None:
                continue
            now = time.perf_counter()
            event = json.loads(msg["data"])
            with self.cond:
                self.seen[int(event["image_id"])] = (now, event["state"])
                self.cond.notify_all()

    def wait(self, image_ids, timeout_s: float) -> dict[int, tuple[float, str]]:
        wanted = set(image_ids)
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not wanted <= self.seen.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(wanted - self.seen.keys())
                    raise TimeoutError(f"{len(missing)} image(s) not tagged after {timeout_s:.0f} s: {missing[:10]}…")
                self.cond.wait(min(left, 0.5))
            return {i: self.seen[i] for i in wanted}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pubsub.close()
        self.client.close()


class BenchStack:
    """Everything ``stilltag bench`` needs for its end-to-end part; use as a context manager."""

    def __init__(self, root: Path, *, redis_host_url: str, pg_admin_url: str = ""):
        self.root = root
        self.redis_host_url = redis_host_url
        self.pg_admin_url = pg_admin_url
        self._exit = ExitStack()
        self.worker: WorkerProcess | None = None

    def __enter__(self) -> "BenchStack":
        import redis

        self.redis_url = self._exit.enter_context(claimed_redis_db(self.redis_host_url))
        self.database_url = self._exit.enter_context(database(self.root, self.pg_admin_url))
        self.redis = redis.Redis.from_url(self.redis_url)
        self._exit.callback(self.redis.close)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_worker()
        self._exit.close()

    def env(self, **settings) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
        ours = {
            "DATA_DIR": str(self.root / "data"), "DATABASE_URL": self.database_url, "BROKER_URL": self.redis_url,
            "IMAGE_URL": f"file://{self.root / 'images'}/{{image_id}}.jpg", "MODEL_STORE": f"file://{self.root / 'models'}",
            **{k.upper(): str(v) for k, v in settings.items()},
        }
        return {**base, **{ENV_PREFIX + k: v for k, v in ours.items()}, "PYTHONUNBUFFERED": "1"}

    def put_images(self, first_id: int, jpegs: list[bytes]) -> list[int]:
        folder = self.root / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(jpegs):
            (folder / f"{first_id + k}.jpg").write_bytes(data)
        return list(range(first_id, first_id + len(jpegs)))

    def image_paths(self, image_ids) -> list[Path]:
        return [self.root / "images" / f"{i}.jpg" for i in image_ids]

    def cli(self, env: dict[str, str], *args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "stilltag.cli", *args], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"stilltag {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start_worker(self, learner: Path, **settings) -> None:
        """``db upgrade``, ``models register --promote``, then ``stilltag worker`` until it consumes."""
        env = self.env(**settings)
        self.cli(env, "db", "upgrade")
        self.cli(env, "models", "register", str(learner), "--promote")
        self.worker = WorkerProcess(env, self.root / "worker.log").start().wait_ready()

    def worker_log(self) -> str:
        return self.worker.log() if self.worker else ""

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def enqueue(self, image_ids, queue: str) -> float:
        """LPUSH the messages in one round trip; returns the time just before sending."""
        messages = [envelope(i, queue) for i in image_ids]
        t0 = time.perf_counter()
        self.redis.lpush(queue, *messages)
        return t0

    def tagged_in_db(self, image_ids) -> int:
        """How many of ``image_ids`` have a committed ``tagged`` status."""
        from shared.db import make_engine, tagging_status

        engine = make_engine(self.database_url)
        try:
            with engine.connect() as c:
                return c.execute(
                    sa.select(sa.func.count()).select_from(tagging_status)
                    .where(tagging_status.c.image_id.in_(list(image_ids)), tagging_status.c.state == "tagged")
                ).scalar_one()
        finally:
            engine.dispose()
