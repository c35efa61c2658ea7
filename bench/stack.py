"""One harness for a throw-away stilltag stack, used by ``stilltag bench`` and by the tests.

- :func:`claim_postgres` and :func:`claim_redis_db`: a fresh PostgreSQL database and an empty
  Redis DB number, removed and flushed afterwards;
- :func:`tag_envelope` and :func:`push`: Celery protocol-2 messages built and LPUSHed by hand,
  as the website does (no Celery client);
- :func:`stilltag`: the real command line in its own process;
- :func:`poll_until`: wait on a condition with a deadline and a message that says what did not
  happen;
- :class:`Stack`: settings, an image folder, a registered champion, tagging workers as
  separate processes (:class:`WorkerProcess`), and what the database holds.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from shared.config import ENV_PREFIX
from shared.constants import TAG_TASK, TAGGING_QUEUE
from shared.db import make_engine, tag_suggestions, tagging_status
from worker.process import WorkerProcess, free_port, probe

__all__ = ["Stack", "WorkerProcess", "claim_postgres", "claim_redis_db", "claimed_stack", "free_port", "poll_until",
           "probe", "push", "stilltag", "tag_envelope"]

REDIS_DB_RANGE = range(2, 16)  # DB 0 and 1 are left to whoever else uses the server
CLAIM_KEY = "stilltag:claim"
CLI_TIMEOUT_S = 180  # a command imports torch and fastai on a busy machine
POLL_INTERVAL_S = 0.1

T = TypeVar("T")


# --- claims ---------------------------------------------------------------------------------
@contextmanager
def claim_postgres(admin_url: str, *, prefix: str = "stilltag_test"):
    """A fresh, empty PostgreSQL database (its SQLAlchemy URL), dropped afterwards.

    Args:
        admin_url: a libpq URL of a role that may create databases, e.g. ``postgresql://postgres@host/postgres``.
        prefix: the start of the database's name, to tell whose it was.
    """
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def claim_redis_db(host_url: str):
    """A Redis DB number that is empty now (its URL), claimed atomically, flushed afterwards.

    The claim key makes two processes (test runs, a benchmark) never share a DB.
    """
    import redis

    host_url = host_url.rstrip("/")
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
    raise RuntimeError(f"no empty Redis DB among {REDIS_DB_RANGE.start}..{REDIS_DB_RANGE.stop - 1} on {host_url}; "
                       "flush one, or point at another Redis server")


# --- messages -------------------------------------------------------------------------------
def tag_envelope(image_id, *, queue: str = TAGGING_QUEUE, task: str = TAG_TASK) -> dict:
    """A Celery protocol-2 message with the exact structure of the README's Ruby snippet."""
    task_id = str(uuid.uuid4())
    body = [[image_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
            "retries": 0, "eta": None, "expires": None, "argsrepr": f"({image_id!r},)", "kwargsrepr": "{}",
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def push(client, queue: str, image_ids) -> float:
    """LPUSH one tag request per image ID in one round trip; returns the time just before sending."""
    messages = [json.dumps(tag_envelope(i, queue=queue)) for i in image_ids]
    t0 = time.perf_counter()
    client.lpush(queue, *messages)
    return t0


# --- processes and waiting ------------------------------------------------------------------
def stilltag(env: dict[str, str], *args: str, check: bool = True, timeout_s: float = CLI_TIMEOUT_S,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``stilltag ARGS`` in its own process with ``env``; with ``check``, a failure raises with its output."""
    done = subprocess.run([sys.executable, "-m", "stilltag.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=cwd)
    if check and done.returncode:
        raise RuntimeError(f"stilltag {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def poll_until(condition: Callable[[], T | None], timeout_s: float, what: str, *, interval_s: float = POLL_INTERVAL_S,
               detail: Callable[[], str] | None = None) -> T:
    """Call ``condition`` until it returns something truthy, and return that.

    Raises:
        TimeoutError: after ``timeout_s``, saying ``what`` did not happen (and ``detail()``, e.g. a log's end).
    """
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:g} s: {what}" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval_s)
    return result


# --- the stack ------------------------------------------------------------------------------
class Stack:
    """A stilltag stack on a database and a broker: settings, an image folder, the command line,
    tagging workers as separate processes, and what the database holds. ``close()`` stops them."""

    def __init__(self, root: Path, *, database_url: str, broker_url: str | None = None, **settings):
        self.root = root
        self.settings_env = {
            ENV_PREFIX + "DATA_DIR": str(root / "data"), ENV_PREFIX + "DATABASE_URL": database_url,
            ENV_PREFIX + "IMAGE_URL": f"file://{self.image_dir}/{{image_id}}.jpg",
            ENV_PREFIX + "MODEL_STORE": f"file://{root / 'models'}",
            **({ENV_PREFIX + "BROKER_URL": broker_url} if broker_url else {}),
            **{ENV_PREFIX + k.upper(): str(v) for k, v in settings.items()},
        }
        self.workers: list[WorkerProcess] = []
        self._engine: sa.Engine | None = None
        self._redis: Any = None  # a redis.Redis, made on first use

    @property
    def env(self) -> dict[str, str]:
        """The process environment for the CLI and workers: ours, and nothing else ``STILLTAG_*``."""
        base = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
        return {**base, **self.settings_env, "PYTHONUNBUFFERED": "1"}

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    @property
    def broker_url(self) -> str:
        return self.settings_env[ENV_PREFIX + "BROKER_URL"]

    def put_image(self, image_id: int, data: bytes) -> Path:
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"{image_id}.jpg"
        path.write_bytes(data)
        return path

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return stilltag(self.env, *args, **kw)

    def register_champion(self, learner: Path, **metrics) -> None:
        """``db upgrade``, then ``models register --promote`` a copy of ``learner``; ``metrics`` (such as
        its parity records) are stored with the version, as a retrain stores its own.

        The two commands run in this process, with the stack's settings (``in_process``): the
        benchmark and the tests have torch and fastai imported already, where a new process spends
        seconds importing them before it reads the learner. The tests run them in processes of
        their own elsewhere (tests/integration/test_cli_errors.py, tests/e2e/test_rollout.py)."""
        artifact = self.root / "export.pkl"
        shutil.copyfile(learner, artifact)
        for args in (["db", "upgrade"], ["models", "register", str(artifact), "--promote"]):
            self.in_process(*args)
        if metrics:
            from shared import registry
            from shared.db import session_factory, transaction

            with transaction(session_factory(self.engine())) as session:
                registry.add_metrics(session=session, version=registry.champion_version(session=session) or "",
                                     **metrics)

    def in_process(self, *args: str) -> str:
        """``stilltag ARGS`` for the commands of ``shared.cli`` (``db``, ``models``, ``enqueue``,
        ``backfill``), run in this process with the stack's settings; their output, or
        ``RuntimeError`` with it."""
        import typer
        from typer.testing import CliRunner

        from shared import cli
        from shared.config import get_settings

        app = typer.Typer()
        cli.register(app, cli.models_app)
        env: dict[str, str | None] = {k: None for k in os.environ if k.upper().startswith(ENV_PREFIX)}
        env |= self.settings_env
        get_settings.cache_clear()  # the command reads the stack's settings, not this process's
        try:
            result = CliRunner().invoke(app, list(args), env=env)
        finally:
            get_settings.cache_clear()
        if result.exit_code:
            raise RuntimeError(f"stilltag {' '.join(args)} failed ({result.exit_code}):\n{result.output}") from (
                result.exception if not isinstance(result.exception, SystemExit) else None)
        return result.output

    def worker(self, name: str = "worker", **kw) -> WorkerProcess:
        """A started ``stilltag worker`` (``kw`` as for :class:`WorkerProcess`), logging to ``root/name.log``."""
        w = WorkerProcess(self.env, self.root / f"{name}.log", **kw).start()
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            if w.proc:
                w.stop()  # also closes the log of a worker that has exited by itself

    @property
    def redis(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.broker_url)
        return self._redis

    def push(self, queue: str, image_ids) -> float:
        return push(self.redis, queue, image_ids)

    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings_env[ENV_PREFIX + "DATABASE_URL"])
        return self._engine

    def statuses(self) -> dict[int, tuple[str, str | None, str | None]]:
        """``{image_id: (state, error, model_version)}`` of every committed status row."""
        with self.engine().connect() as c:
            rows = c.execute(sa.select(tagging_status.c.image_id, tagging_status.c.state, tagging_status.c.error,
                                       tagging_status.c.model_version))
            return {r.image_id: (r.state, r.error, r.model_version) for r in rows}

    def suggestions(self) -> list[tuple]:
        with self.engine().connect() as c:
            return [tuple(row) for row in c.execute(
                sa.select(tag_suggestions.c.image_id, tag_suggestions.c.tag, tag_suggestions.c.probability,
                          tag_suggestions.c.model_version)
                .order_by(tag_suggestions.c.image_id, tag_suggestions.c.tag)
            )]

    def wait_for(self, image_ids, timeout_s: float = 120) -> dict:
        """Until every image in ``image_ids`` has a committed status; returns :meth:`statuses`."""
        wanted = set(image_ids)

        def missing() -> str:
            logs = "\n".join(w.log()[-3000:] for w in self.workers)[-6000:]
            return f"missing: {sorted(wanted - self.statuses().keys())[:20]}\n{logs}"

        def all_there() -> dict | None:
            got = self.statuses()
            return got if wanted <= got.keys() else None

        return poll_until(all_there, timeout_s, f"{len(wanted)} image(s) tagged", detail=missing)

    def close(self) -> None:
        self.stop_workers()
        if self._engine is not None:
            self._engine.dispose()
        if self._redis is not None:
            self._redis.close()


@contextmanager
def claimed_stack(root: Path, *, redis_host_url: str, pg_admin_url: str = "", **settings):
    """A :class:`Stack` on a claimed Redis DB and a fresh PostgreSQL database (SQLite in ``root``
    without an admin URL), all removed afterwards."""
    with ExitStack() as claims:
        broker_url = claims.enter_context(claim_redis_db(redis_host_url))
        if pg_admin_url:
            database_url = claims.enter_context(claim_postgres(pg_admin_url, prefix="stilltag_bench"))
        else:
            database_url = f"sqlite:///{root / 'bench.db'}"
        stack = claims.enter_context(closing(Stack(root, database_url=database_url, broker_url=broker_url,
                                                   **settings)))
        yield stack
