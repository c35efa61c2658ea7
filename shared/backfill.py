"""Backfill: send an archive's images to the ``backfill`` queue in bounded chunks, resumably.

One loop serves ``stilltag backfill`` and the training worker's ``stilltag.retag`` task:

* **Selection.** A SQL query on the website's database (one column ``image_id``) or a list of
  IDs, read in ascending order, a page at a time.
* **Skip.** An image whose status already comes from the champion is left out (a failed one
  too, unless ``retry_failed``): a second run enqueues nothing.
* **Bound.** Messages go out only while ``LLEN backfill`` is below ``max_pending``, at most the
  room left, so the queue never holds more than the bound (other producers aside).
* **Resume.** After each chunk the highest ID sent is kept in Redis under a key naming the
  selection and the champion (``stilltag:backfill:cursor:*``). A run that is interrupted
  leaves it; the next run of the same selection for the same champion starts after it, so what
  the first run enqueued is neither sent again nor forgotten (it waits in the queue). The cursor
  lives in the broker's Redis, beside the queue: if Redis loses the queue, it loses the cursor
  too, and the next run starts over, skipping what is tagged. A run that finishes deletes it.
* **Interruption.** ``stop`` (set by a signal handler or a worker shutdown) ends the loop
  between two chunks; a broker or database outage ends it with :class:`BackfillInterrupted`.
  Both keep the cursor.

The caller passes ``send`` (``shared.celery_app.enqueue_tag_requests`` in practice: the same
``stilltag.tag`` messages the website sends) and a ``report`` callback for progress.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from shared import registry
from shared.config import Settings
from shared.constants import (
    BACKFILL_CURSOR_KEY,
    BACKFILL_ENQUEUED_KEY,
    BACKFILL_QUEUE,
    RETAG_TASK,
    STATE_TAGGED,
    TRAINING_QUEUE,
)
from shared.db import tagging_status
from shared.errors import UserError, translate

log = logging.getLogger(__name__)

PAGE_IDS = 10_000  # IDs read from the selection per query (keyset pagination on image_id)
SKIP_CHECK_IDS = 1_000  # IDs per "already done by the champion?" query
SEND_MAX = 1_000  # messages per publish round, at most (fewer when the queue has less room)
PENDING_POLL_S = 0.1  # how often a full queue is looked at again
TAGGED_REFRESH_S = 5.0  # how often "tagged so far" is counted in the database
CURSOR_TTL_S = 30 * 86_400  # 30 days: a cursor nobody resumes does not stay forever
REDIS_TIMEOUT_S = 10  # one Redis command never takes this long; an outage ends the run instead
START = -(2**63)  # before every image ID
RETAG_DELAY_POLLS = 2  # a re-tag starts this many champion polls after the promotion
PLAIN_EVERY_S = 10.0  # a plain progress line this often when output is not a terminal

DONE, INTERRUPTED = "done", "interrupted"


class BackfillError(UserError):
    """The backfill cannot run as asked; the message says what to change."""


class BackfillInterrupted(UserError):
    """The broker or the database went away mid-run; the cursor is kept, a re-run carries on."""


@dataclass
class Counts:
    """Where a backfill stands. ``total`` is how many IDs the selection has after the cursor."""

    total: int = 0
    enqueued: int = 0
    skipped: int = 0
    tagged: int = 0  # statuses the champion has written since the run started (uploads included)
    resumed_after: int | None = None

    @property
    def seen(self) -> int:
        return self.enqueued + self.skipped

    def summary(self) -> str:
        return f"enqueued {self.enqueued:,}, skipped {self.skipped:,} (done by the champion) of {self.total:,}"


@dataclass(frozen=True)
class Outcome:
    state: str  # DONE or INTERRUPTED
    champion: str
    counts: Counts


Report = Callable[[Counts], None]
Send = Callable[[list[int]], object]


class Selection(Protocol):
    key: str  # names the selection in the cursor's key

    def count(self, session: Session, after: int) -> int: ...

    def page(self, session: Session, after: int, limit: int) -> list[int]: ...


def rate_eta(counts: Counts, elapsed_s: float) -> tuple[float, str]:
    rate = counts.seen / elapsed_s if elapsed_s > 0 else 0.0
    left = max(counts.total - counts.seen, 0)
    eta = str(timedelta(seconds=round(left / rate))) if rate > 0 else "-"
    return rate, eta


def progress_line(counts: Counts, elapsed_s: float) -> str:
    """One plain progress line: done/total, the counts, the rate and the ETA."""
    rate, eta = rate_eta(counts, elapsed_s)
    pct = 100 * counts.seen / counts.total if counts.total else 100.0
    return (f"backfill: {counts.seen:,}/{counts.total:,} ({pct:.0f}%) enqueued {counts.enqueued:,} "
            f"skipped {counts.skipped:,} tagged {counts.tagged:,} at {rate:,.0f}/s, ETA {eta}")


class PlainProgress:
    """Progress as a line every ``every_s`` seconds (and a last one at the end), for logs and pipes."""

    def __init__(self, emit: Callable[[str], object], *, every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.emit, self.every_s, self.clock = emit, every_s, clock
        self.started = clock()
        self._last: float | None = None

    def __call__(self, counts: Counts) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self.every_s:
            self._last = now
            self.line(counts)

    def line(self, counts: Counts) -> None:
        self.emit(progress_line(counts, self.clock() - self.started))

    def close(self, counts: Counts) -> None:
        if self._last is not None:  # nothing to add to an error before the first count
            self.line(counts)


class QuerySelection:
    """The IDs a SQL query returns (column ``image_id``), distinct, ascending.

    The query is wrapped (``SELECT DISTINCT image_id FROM (query) ... WHERE image_id > :after
    ORDER BY image_id LIMIT n``) and run once per page: on a table's primary key that is an
    index range scan, so a 10-million-row archive is read in pages without a long transaction.
    """

    def __init__(self, query: str, *, name: str = "the backfill query"):
        self.query = query.strip().rstrip(";").strip()
        if not self.query:
            raise BackfillError("no backfill query: pass --query 'SELECT id AS image_id FROM ...' or set "
                                "STILLTAG_BACKFILL_QUERY")
        self.name = name
        self.key = "query:" + self.query

    def _run(self, session: Session, sql: str, params: dict):
        try:
            return session.execute(sa.text(sql), params)
        except sa.exc.DBAPIError as exc:
            if isinstance(exc, sa.exc.OperationalError) and session.get_bind().dialect.name != "sqlite":
                raise  # the server is away, not the query wrong: shared.errors says so
            reason = " ".join(str(getattr(exc, "orig", exc)).split("\n")[0].split())
            raise BackfillError(f"{self.name} failed: {reason}; it must be a SELECT returning one column "
                                "image_id, e.g. SELECT id AS image_id FROM stills") from None

    def check(self, session: Session) -> None:
        columns = list(self._run(session, f"SELECT * FROM ({self.query}) AS q LIMIT 0", {}).keys())
        if [c.lower() for c in columns] != ["image_id"]:
            raise BackfillError(f"{self.name} returns columns {columns}; it must return one column image_id, "
                                "e.g. SELECT id AS image_id FROM stills")

    def count(self, session: Session, after: int) -> int:
        sql = f"SELECT count(DISTINCT q.image_id) FROM ({self.query}) AS q WHERE q.image_id > :after"
        return int(self._run(session, sql, {"after": after}).scalar_one())

    def page(self, session: Session, after: int, limit: int) -> list[int]:
        sql = (f"SELECT DISTINCT q.image_id FROM ({self.query}) AS q WHERE q.image_id > :after "
               "ORDER BY q.image_id LIMIT :limit")
        return [int(i) for (i,) in self._run(session, sql, {"after": after, "limit": limit}) if i is not None]


class IdSelection:
    """Given IDs (standard input or a file), distinct, ascending."""

    def __init__(self, ids: Iterable[int]):
        import numpy as np

        self.ids = np.unique(np.fromiter(ids, dtype=np.int64))
        self.key = "ids:" + hashlib.sha256(self.ids.tobytes()).hexdigest()

    def _start(self, after: int) -> int:
        import numpy as np

        return int(np.searchsorted(self.ids, after, side="right"))

    def count(self, session: Session, after: int) -> int:
        return len(self.ids) - self._start(after)

    def page(self, session: Session, after: int, limit: int) -> list[int]:
        start = self._start(after)
        return [int(i) for i in self.ids[start:start + limit]]


def parse_ids(lines: Iterable[str], *, source: str = "standard input") -> Iterator[int]:
    """Image IDs from text: whitespace- or comma-separated integers, ``#`` starts a comment."""
    for number, line in enumerate(lines, 1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            try:
                yield int(token)
            except ValueError:
                raise BackfillError(f"{source}, line {number}: {token!r} is not an image ID (one integer per "
                                    "line, or separated by spaces or commas)") from None


def already_done(*, session: Session, ids: list[int], champion: str, retry_failed: bool = False) -> set[int]:
    """The IDs among ``ids`` whose status comes from ``champion`` (only ``tagged`` ones with
    ``retry_failed``)."""
    done: set[int] = set()
    for start in range(0, len(ids), SKIP_CHECK_IDS):
        query = sa.select(tagging_status.c.image_id).where(
            tagging_status.c.image_id.in_(ids[start:start + SKIP_CHECK_IDS]),
            tagging_status.c.model_version == champion,
        )
        if retry_failed:
            query = query.where(tagging_status.c.state == STATE_TAGGED)
        done.update(int(i) for (i,) in session.execute(query))
    return done


def cursor_key(selection: Selection, champion: str) -> str:
    digest = hashlib.sha256(f"{champion}\n{selection.key}".encode()).hexdigest()[:32]
    return BACKFILL_CURSOR_KEY.format(selection=digest)


def _champion(session: Session) -> str:
    version = registry.champion_version(session=session)
    if version is None:
        raise BackfillError("there is no champion to tag with: register one with "
                            "`stilltag models register PATH --promote`")
    return version


class _Loop:
    """One run's state; ``run()`` is the public entry point."""

    def __init__(self, *, sessions: sessionmaker[Session], redis, send: Send, selection: Selection, max_pending: int,
                 stop: threading.Event, report: Report, retry_failed: bool, dry_run: bool):
        self.sessions, self.redis, self.send, self.selection = sessions, redis, send, selection
        self.max_pending, self.stop, self.report = max_pending, stop, report
        self.retry_failed, self.dry_run = retry_failed, dry_run
        self.counts = Counts()
        self.champion = ""
        self.key = ""
        self._since: object = None
        self._tagged_at = 0.0

    def tick(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.dry_run and (force or now - self._tagged_at >= TAGGED_REFRESH_S):
            self._tagged_at = now
            with self.sessions() as session:
                self.counts.tagged = session.execute(
                    sa.select(sa.func.count()).select_from(tagging_status).where(
                        tagging_status.c.model_version == self.champion, tagging_status.c.updated_at >= self._since)
                ).scalar_one()
        self.report(self.counts)

    def room(self) -> int | None:
        """How many messages may go now (waiting while the queue is full); None when stopped."""
        while not self.stop.is_set():
            pending = self.redis.llen(BACKFILL_QUEUE)
            if pending < self.max_pending:
                return self.max_pending - pending
            if self.stop.wait(PENDING_POLL_S):
                break
            self.tick()
        return None

    def save(self, last_id: int, sent: int = 0) -> None:
        pipe = self.redis.pipeline(transaction=True)
        if sent:
            pipe.incrby(BACKFILL_ENQUEUED_KEY, sent)
        pipe.set(self.key, last_id, ex=CURSOR_TTL_S)
        pipe.execute()

    def start(self, restart: bool) -> int:
        with self.sessions() as session:
            self.champion = _champion(session)
            if isinstance(self.selection, QuerySelection):
                self.selection.check(session)
            self._since = session.execute(sa.select(sa.func.now())).scalar_one()
        self.key = cursor_key(self.selection, self.champion)
        after = START
        if restart and not self.dry_run:
            self.redis.delete(self.key)
        elif (saved := self.redis.get(self.key)) is not None:
            after = int(saved)
            self.counts.resumed_after = after
        with self.sessions() as session:
            self.counts.total = self.selection.count(session, after)
        return after

    def run(self, restart: bool) -> str:
        after = self.start(restart)
        self.tick(force=True)
        while not self.stop.is_set():
            with self.sessions() as session:
                page = self.selection.page(session, after, PAGE_IDS)
                if not page:
                    break
                done = already_done(session=session, ids=page, champion=self.champion,
                                    retry_failed=self.retry_failed)
            todo = [i for i in page if i not in done]
            self.counts.skipped += len(page) - len(todo)
            if self.dry_run:
                self.counts.enqueued += len(todo)
                after = page[-1]
                continue
            while todo:
                room = self.room()
                if room is None:
                    return INTERRUPTED
                piece, todo = todo[:min(room, SEND_MAX)], todo[min(room, SEND_MAX):]
                self.send(piece)
                self.save(piece[-1], len(piece))
                self.counts.enqueued += len(piece)
                self.tick()
            after = page[-1]
            self.save(after)
        if self.stop.is_set():
            return INTERRUPTED
        if not self.dry_run:
            self.redis.delete(self.key)
        self.tick(force=True)
        return DONE


def run(*, sessions: sessionmaker[Session], redis, send: Send, selection: Selection, max_pending: int,
        stop: threading.Event | None = None, report: Report | None = None, restart: bool = False,
        retry_failed: bool = False, dry_run: bool = False) -> Outcome:
    """Enqueue the selection's images that the champion has not done, ``max_pending`` at most waiting.

    Args:
        sessions: the website's database (where ``tagging_status`` lives).
        redis: a redis-py client of the broker (queue length, cursor, the enqueued counter).
        send: publishes ``stilltag.tag`` for a list of IDs on ``backfill``.
        selection: :class:`QuerySelection` or :class:`IdSelection`.
        max_pending: the bound on ``LLEN backfill``.
        stop: set it to stop between two chunks (the cursor is kept).
        report: called with the counts as they change.
        restart: forget the cursor of an interrupted run and start from the first ID.
        retry_failed: send images whose status from the champion is ``failed`` again.
        dry_run: count what would be sent; send nothing, keep no cursor.

    Raises:
        BackfillError: no champion, or a query that cannot run.
        BackfillInterrupted: the broker or the database went away; a re-run carries on.
    """
    if max_pending < 1:
        raise BackfillError("--max-pending must be at least 1")
    loop = _Loop(sessions=sessions, redis=redis, send=send, selection=selection, max_pending=max_pending,
                 stop=stop or threading.Event(), report=report or (lambda _counts: None),
                 retry_failed=retry_failed, dry_run=dry_run)
    try:
        state = loop.run(restart)
    except UserError:
        raise
    except Exception as exc:
        known = translate(exc)
        if known is None:
            raise
        raise BackfillInterrupted(f"{known} — stopped after {loop.counts.summary()}; run the same command "
                                  "again to carry on") from exc
    return Outcome(state=state, champion=loop.champion, counts=loop.counts)


def backfill(settings: Settings, selection: Selection, **options) -> Outcome:
    """:func:`run` on the configured database and broker, sending through
    ``shared.celery_app.enqueue_tag_requests`` (``options`` as for :func:`run`; ``max_pending``
    defaults to the setting)."""
    if not settings.broker_is_redis:
        raise BackfillError("a backfill needs the Redis broker (STILLTAG_BROKER_URL=redis://...): it waits on the "
                            "length of the backfill queue and keeps its cursor there")
    import redis as redis_lib

    from shared.celery_app import create_app, enqueue_tag_requests
    from shared.runtime import Runtime

    options.setdefault("max_pending", settings.max_pending)
    rt = Runtime(settings)
    app = create_app(settings)
    client = redis_lib.Redis.from_url(settings.broker_url, socket_timeout=REDIS_TIMEOUT_S,
                                      socket_connect_timeout=REDIS_TIMEOUT_S)

    def send(ids: list[int]) -> int:
        return enqueue_tag_requests(settings, ids, queue=BACKFILL_QUEUE, app=app)

    try:
        return run(sessions=rt.sessions, redis=client, send=send, selection=selection, **options)
    finally:
        client.close()
        app.close()
        rt.close()


def stale_selection(settings: Settings, query: str = "") -> QuerySelection:
    """``--stale``: the IDs of ``query`` (STILLTAG_BACKFILL_QUERY when empty); the champion's own are skipped."""
    if query:
        return QuerySelection(query, name="--query")
    return QuerySelection(settings.backfill_query, name="STILLTAG_BACKFILL_QUERY")


def request_retag(settings: Settings, *, version: str, reason: str) -> str | None:
    """Enqueue ``stilltag.retag`` for the training worker when STILLTAG_RETAG_ON_PROMOTE is on;
    returns the task ID (None when the setting is off). Call it after the promotion committed.

    ``version`` is the new champion: a re-tag that starts when another version is champion is
    skipped (a later promotion asked for its own), so two promotions in a row re-tag once."""
    if not settings.retag_on_promote:
        return None
    from shared.celery_app import create_app

    app = create_app(settings)
    try:
        # Tagging workers take up a new champion within STILLTAG_MODEL_POLL_S: starting later keeps
        # them from tagging the first chunks with the old one (which the re-tag would then skip).
        result = app.send_task(RETAG_TASK, kwargs={"version": version, "reason": reason}, queue=TRAINING_QUEUE,
                               countdown=RETAG_DELAY_POLLS * settings.model_poll_s)
    finally:
        app.close()
    log.info("re-tag requested (%s): task %s on %r", reason, result.id, TRAINING_QUEUE)
    return result.id
