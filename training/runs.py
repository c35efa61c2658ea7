"""Retrain runs as the website sees them: the ``retrain_runs`` table and the ``stilltag:retrain`` events.

A run's id is the Celery task id of its ``stilltag.retrain`` message (what ``stilltag train`` and
the README's Ruby snippet return), or a fresh uuid for ``stilltag train --now``. Its states:

- ``queued``: written by ``stilltag train`` when it enqueues, or by the training worker when it
  takes a message that has no row yet (the website's Ruby enqueue writes none);
- ``running``: the run holds the retrain lock; ``stage``, ``epoch`` and ``n_epochs`` follow it;
- ``succeeded`` (``version`` and the gate's ``reason``), ``failed`` (``reason`` says why) or
  ``skipped`` (another retrain held the lock, or the data cannot make a training set).

A run whose process died (SIGKILL, OOM, a lost machine) is marked ``failed`` by the next training
worker that starts (``recover_orphans``), by a running training worker's check once the dead
worker's lock has expired (``OrphanSweep``), or by the next run that takes the lock.

Every state or stage change is committed first, then published as JSON on ``stilltag:retrain``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import SQLAlchemyError

from shared.config import Settings
from shared.constants import (
    RETRAIN_CHANNEL,
    RUN_FAILED,
    RUN_QUEUED,
    RUN_RUNNING,
    RUN_SKIPPED,
    RUN_SUCCEEDED,
)
from shared.db import retrain_runs, transaction
from shared.errors import one_line
from shared.runtime import Runtime
from training.dataset import DatasetError
from training.lock import LOCK_TTL_S, RetrainBusy, lock_holder

log = logging.getLogger(__name__)

Progress = Callable[[str, dict], None]
FINISHED = (RUN_SUCCEEDED, RUN_FAILED, RUN_SKIPPED)
_recording: set[str] = set()  # the runs this process records now (``tracked``): alive, whatever the lock says
HEARTBEAT_S = LOCK_TTL_S / 5  # a running run's updated_at moves at least this often (OrphanSweep)


def this_worker() -> str:
    """``host pid N``: who runs a run, so a later process can tell whether it is gone."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def new_run_id() -> str:
    return str(uuid.uuid4())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def get_run(*, session, run_id: str) -> dict | None:
    row = session.execute(sa.select(retrain_runs).where(retrain_runs.c.id == run_id)).first()
    return row._asdict() if row else None


def list_runs(*, session, limit: int = 20) -> list[dict]:
    rows = session.execute(sa.select(retrain_runs).order_by(retrain_runs.c.created_at.desc()).limit(limit))
    return [r._asdict() for r in rows]


def insert_queued(*, session, run_id: str, options: dict | None) -> bool:
    """The ``queued`` row, unless the run has one already. Returns whether it was written."""
    if session.execute(sa.select(retrain_runs.c.id).where(retrain_runs.c.id == run_id)).first():
        return False
    now = _now()
    session.execute(sa.insert(retrain_runs).values(id=run_id, state=RUN_QUEUED, options=options or {},
                                                   created_at=now, updated_at=now))
    return True


def event(row: dict) -> dict:
    """The JSON published on ``stilltag:retrain`` for a row."""
    return {"run_id": row["id"], "state": row["state"], "stage": row.get("stage"), "epoch": row.get("epoch"),
            "version": row.get("version"), "reason": row.get("reason")}


def publish(client, row: dict) -> None:
    """Best effort, after commit: the row is the truth, the event only says "look again"."""
    if client is None:
        return
    try:
        client.publish(RETRAIN_CHANNEL, json.dumps(event(row)))
    except Exception as exc:  # Redis away: the website still reads the table
        log.warning("could not publish run %s %s on %s: %s", row["id"], row["state"], RETRAIN_CHANNEL, exc)


def enqueued(rt: Runtime, *, run_id: str, options: dict | None) -> None:
    """What ``stilltag train`` records after sending the message: the ``queued`` row and its event."""
    with transaction(rt.sessions) as session:
        insert_queued(session=session, run_id=run_id, options=options)
        row = get_run(session=session, run_id=run_id)
    if row:
        publish(rt.events, row)


class RunRecorder:
    """Writes one run's row as it goes, and publishes each change. Also a retrain ``progress`` callback.

    A failure to write the row is logged, never raised: the website's view must not stop a retrain.
    """

    def __init__(self, rt: Runtime, run_id: str, options: dict | None = None, *, forward: Progress | None = None):
        self.rt = rt
        self.run_id = run_id
        self.options = dict(options or {})
        self.forward = forward
        self.state = RUN_QUEUED
        self.stage: str | None = None
        self.version: str | None = None
        self.reason: str | None = None

    def _write(self, publish_it: bool = True, **values) -> None:
        try:
            with transaction(self.rt.sessions) as session:
                insert_queued(session=session, run_id=self.run_id, options=self.options)
                session.execute(sa.update(retrain_runs).where(retrain_runs.c.id == self.run_id)
                                .values(**values, updated_at=_now()))
                row = get_run(session=session, run_id=self.run_id)
        except SQLAlchemyError as exc:
            log.error("could not record retrain run %s (%s): %s; run `stilltag db upgrade`?", self.run_id,
                      values.get("state", self.state), one_line(str(exc)))
            return
        if publish_it and row:
            publish(self.rt.events, row)

    def queued(self) -> None:
        self._write(state=RUN_QUEUED, worker=this_worker())

    def __call__(self, name: str, fields: dict) -> None:
        if self.state == RUN_QUEUED:
            # The first progress event comes from inside the retrain lock: no other run is alive.
            fail_orphans(self.rt, reason=f"its worker was gone when run {self.run_id} took the retrain lock",
                         keep=self.run_id)
            self.state = RUN_RUNNING
            self._write(state=RUN_RUNNING, started_at=_now(), worker=this_worker(), stage=fields.get("name"))
            self.stage = fields.get("name")
        if name == "stage" and fields.get("name") != self.stage:
            self.stage = fields.get("name")
            self._write(stage=self.stage)
        elif name == "epoch_start":
            self._write(False, epoch=fields.get("epoch"), n_epochs=fields.get("n_epochs"))
        elif name == "done":
            self.version, self.reason = fields.get("version"), fields.get("reason")
        if self.forward is not None:
            self.forward(name, fields)

    def heartbeat(self) -> None:
        """While running: move ``updated_at``, so that ``OrphanSweep`` sees the run alive even when
        its lock is out of reach (Redis partitioned from this host, not the database)."""
        if self.state != RUN_RUNNING:
            return
        try:
            with transaction(self.rt.sessions) as session:
                session.execute(sa.update(retrain_runs).where(retrain_runs.c.id == self.run_id)
                                .where(retrain_runs.c.state == RUN_RUNNING).values(updated_at=_now()))
        except SQLAlchemyError as exc:
            log.warning("could not record that retrain run %s is alive: %s", self.run_id, one_line(str(exc)))

    def finish(self, state: str, *, reason: str | None, version: str | None = None) -> None:
        self.state = state
        self._write(state=state, reason=reason, version=version, finished_at=_now())


@contextmanager
def tracked(settings: Settings, run_id: str | None, options: dict | None = None, *,
            forward: Progress | None = None) -> Iterator[RunRecorder]:
    """Record a retrain run around the block; the block passes the recorder as ``progress``.

    ``run_id`` None: a fresh one. The block's exception still propagates: the run is skipped for
    ``RetrainBusy`` and ``DatasetError``, failed for anything else.
    """
    rt = Runtime(settings)
    recorder = RunRecorder(rt, run_id or new_run_id(), options, forward=forward)
    _recording.add(recorder.run_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            recorder.heartbeat()

    threading.Thread(target=beat, name="retrain-heartbeat", daemon=True).start()
    try:
        recorder.queued()
        try:
            yield recorder
        except RetrainBusy as exc:
            recorder.finish(RUN_SKIPPED, reason=one_line(str(exc)))
            raise
        except DatasetError as exc:
            recorder.finish(RUN_SKIPPED, reason=f"nothing to train on: {one_line(str(exc))}")
            raise
        except BaseException as exc:
            recorder.finish(RUN_FAILED, reason=f"{type(exc).__name__}: {one_line(str(exc))}"[:2000])
            raise
        else:
            recorder.finish(RUN_SUCCEEDED, reason=recorder.reason, version=recorder.version)
    finally:
        stop.set()
        _recording.discard(recorder.run_id)
        rt.close()


# --- runs whose process died ------------------------------------------------------------------
_WORKER = re.compile(r"^(?P<host>.+) pid (?P<pid>\d+)$")


def holder_gone(worker: str | None) -> bool:
    """Whether the process named ``host pid N`` is known to be gone (only this host can tell).

    The same pid as ours is a former incarnation of this process (a restarted container keeps its
    host name and often its pid); the callers spare the runs this process records itself.
    """
    match = _WORKER.match(worker or "")
    if not match or match["host"] != socket.gethostname():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def fail_orphans(rt: Runtime, *, reason: str, keep: str | None = None,
                 only: Callable[[dict], bool] | None = None) -> list[str]:
    """Mark ``running`` runs (but ``keep``, and only those ``only`` accepts) failed; returns their ids."""
    try:
        with transaction(rt.sessions) as session:
            rows = [r._asdict() for r in session.execute(sa.select(retrain_runs)
                                                         .where(retrain_runs.c.state == RUN_RUNNING))]
            candidates = [r for r in rows if r["id"] != keep and (only is None or only(r))]
            orphans = []
            now = _now()
            for r in candidates:
                seen_at = r["updated_at"]
                r.update(state=RUN_FAILED, finished_at=now,
                         reason=f"the training worker ({r['worker']}) stopped before the run finished, at stage "
                                f"{r['stage'] or '-'}: {reason}")
                # Not if the run wrote (or beat) since it was read: then it is alive.
                update = (sa.update(retrain_runs).where(retrain_runs.c.id == r["id"])
                          .where(retrain_runs.c.state == RUN_RUNNING).where(retrain_runs.c.updated_at == seen_at)
                          .values(state=RUN_FAILED, reason=r["reason"], finished_at=now, updated_at=now))
                done: CursorResult = session.execute(update)  # type: ignore[assignment]
                if done.rowcount:
                    orphans.append(r)
    except SQLAlchemyError as exc:
        log.warning("could not look for abandoned retrain runs: %s", one_line(str(exc)))
        return []
    for r in orphans:
        log.warning("retrain run %s marked failed: %s", r["id"], r["reason"])
        publish(rt.events, r)
    return [r["id"] for r in orphans]


def abandoned(run_id: str, worker: str | None, holder: str | None) -> bool:
    """Whether run ``run_id``, left ``running`` by ``worker`` (``host pid N``), cannot be alive,
    given the lock's ``holder`` (``host pid N since …``, None: nobody holds it).

    A retrain holds the lock for its whole run, so a live run's process is the holder: the run is
    abandoned when nobody holds the lock, when another process does, or when its process is known
    to be gone. A run this process is recording is alive, whatever the lock says.
    """
    if run_id in _recording:
        return False
    if holder is None or not holder.startswith(f"{worker} since "):
        return True
    return holder_gone(worker)


def known_dead(run_id: str, worker: str | None, holder: str | None) -> bool:
    """``abandoned``, without the doubt of a lock nobody holds: a live run on another host may be
    between its lock's release and its last write, or about to take its lock again after a
    Redis outage (``OrphanSweep`` waits for a second check for those)."""
    return abandoned(run_id, worker, holder) and (holder is not None or holder_gone(worker))


def _running(rt: Runtime) -> dict[str, tuple]:
    """The ``running`` runs: id → (worker, updated_at)."""
    with rt.sessions() as session:
        rows = session.execute(sa.select(retrain_runs.c.id, retrain_runs.c.worker, retrain_runs.c.updated_at)
                               .where(retrain_runs.c.state == RUN_RUNNING))
        return {r.id: (r.worker, r.updated_at) for r in rows}


def recover_orphans(settings: Settings) -> list[str]:
    """At a training worker's start: runs left ``running`` by a process that is gone become ``failed``.

    Gone means: its process is known to be gone (same host, no such pid), or another process holds
    the lock. A run on another host while nobody, or its own (possibly dead) worker, holds the lock
    is left to ``OrphanSweep``.
    """
    rt = Runtime(settings)
    try:
        running = _running(rt)
        if not running:
            return []
        holder = lock_holder(settings)
        dead = {run_id for run_id, (worker, _) in running.items() if known_dead(run_id, worker, holder)}
        return fail_orphans(rt, reason=f"found by {this_worker()} at its start ({_why(holder)})",
                            only=lambda r: r["id"] in dead) if dead else []
    except (SQLAlchemyError, OSError, RedisError) as exc:
        log.warning("could not look for abandoned retrain runs: %s", one_line(str(exc)))
        return []
    finally:
        rt.close()


def _why(holder: str | None) -> str:
    return "no retrain held the lock" if holder is None else f"the retrain lock was held by {holder}"


class OrphanSweep:
    """A training worker's check, every ``orphan_check_s``, for runs whose worker died elsewhere.

    ``recover_orphans`` at a worker's start leaves a run on another host alone while nobody, or its
    own (possibly dead) worker, holds the lock; that lock expires within ``LOCK_TTL_S`` of the
    worker's death. A run is failed when two checks in a row find it abandoned with the same
    ``updated_at``: a live run moves it every ``HEARTBEAT_S``, even while its lock is out of reach;
    it releases the lock a moment before it writes its end, and takes the lock again within
    ``LOCK_TTL_S / 5`` if it expired while Redis was out of reach. None of these is failed.
    The lock is read, never taken, so no retrain is ever skipped for a check.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.suspects: dict[str, object] = {}  # run id → its updated_at when found abandoned

    def check(self) -> list[str]:
        """One check; returns the ids of the runs it failed."""
        rt = Runtime(self.settings)
        try:
            running = _running(rt)
            holder = lock_holder(self.settings) if running else None
            found = {run_id: updated for run_id, (worker, updated) in running.items()
                     if abandoned(run_id, worker, holder)}
            confirmed = {run_id for run_id, updated in found.items() if self.suspects.get(run_id) == updated}
            self.suspects = found
            if not confirmed:
                return []
            failed = fail_orphans(rt, reason=f"found by {this_worker()} ({_why(holder)})",
                                  only=lambda r: r["id"] in confirmed and r["updated_at"] == found[r["id"]])
            for run_id in failed:
                self.suspects.pop(run_id, None)
            return failed
        except (SQLAlchemyError, OSError, RedisError) as exc:
            log.warning("could not look for abandoned retrain runs: %s", one_line(str(exc)))
            return []
        finally:
            rt.close()

    def run(self, stop: threading.Event) -> None:
        """Check every ``orphan_check_s`` until ``stop`` is set (a daemon thread's target)."""
        while not stop.wait(self.settings.orphan_check_s):
            try:
                self.check()
            except Exception:  # the next check may do better; the thread must not end
                log.exception("the check for abandoned retrain runs failed")
