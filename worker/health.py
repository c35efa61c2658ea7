"""Is this tagging worker alive and ready? And the watchdog that exits a stuck one.

Liveness cannot be assumed: after a Redis restart a consumer was once seen alive, idle and
consuming nothing, forever. So it is checked from progress the consumer reports
(worker/consumer.py): the consume loop runs, and while messages wait, some are taken or a batch
commits. A stuck worker fails ``/livez`` within ``LIVENESS_STALL_S`` + one watchdog interval,
and exits non-zero after ``STILLTAG_STALL_EXIT_S`` so that its supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from worker import metrics

log = logging.getLogger(__name__)

LIVENESS_STALL_S = 20.0  # no loop run, or no progress while work waits, this long: not alive
WATCHDOG_INTERVAL_S = 5.0  # how often the watchdog looks (and reads the queue lengths)
STALL_EXIT_CODE = 3  # the process's exit status when the watchdog gives up on it


class Liveness:
    """The ``/livez`` verdict from a consumer's progress stamps (all monotonic seconds).

    Args:
        consumer: has ``last_tick``, ``last_progress``, ``inference_started_at``, ``decoding_since``
            and ``held()``.
        max_batch_s: how long one forward pass + commit, or one batch's fetches and decodes, may
            take before it counts as stuck.
        clock: for tests.
    """

    def __init__(self, consumer, *, max_batch_s: float, stall_s: float = LIVENESS_STALL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.consumer = consumer
        self.max_batch_s = max_batch_s
        self.stall_s = stall_s
        self.clock = clock
        self.waiting = 0  # messages in the broker's queues, as last read by the watchdog

    def check(self) -> tuple[bool, str]:
        c, now = self.consumer, self.clock()
        if now - c.last_tick > self.stall_s:
            return False, f"the consume loop has not run for {now - c.last_tick:.0f} s"
        started = c.inference_started_at
        if started is not None:
            if now - started > self.max_batch_s:
                return False, f"a batch has been in the forward pass for {now - started:.0f} s"
            return True, "tagging a batch"
        waiting = c.decoding_since
        if waiting is not None:
            if now - waiting > self.max_batch_s:
                return False, f"a batch has waited {now - waiting:.0f} s for its images to be fetched and decoded"
            return True, "decoding a batch"
        work = c.held() + self.waiting
        if work and now - c.last_progress > self.stall_s:
            return False, (f"{work} message(s) wait and none was taken or committed "
                           f"for {now - c.last_progress:.0f} s")
        return True, "consuming" if work else "idle"


class Watchdog:
    """Every ``WATCHDOG_INTERVAL_S``: read the queue lengths, judge liveness, and exit the process
    (``STALL_EXIT_CODE``) once it has not been alive for ``stall_exit_s``.

    The exit is ``os._exit``: a stuck thread may never let a graceful shutdown finish, and the
    messages it holds come back by the visibility timeout anyway.
    """

    def __init__(self, liveness: Liveness, *, queue_depth: Callable[[], int | None], stall_exit_s: float,
                 exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic):
        self.liveness = liveness
        self.queue_depth = queue_depth
        self.stall_exit_s = stall_exit_s
        self.exit = exit
        self.clock = clock
        self.failing_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def look(self) -> None:
        """One look; the thread calls it every interval (tests call it directly)."""
        # Unknown (the broker is down) counts as nothing waiting: that is the broker's problem,
        # reported by /readyz, and restarting this worker would not help.
        self.liveness.waiting = self.queue_depth() or 0
        ok, reason = self.liveness.check()
        metrics.LIVE.set(1 if ok else 0)
        now = self.clock()
        if ok:
            if self.failing_since is not None:
                log.info("consumer making progress again")
            self.failing_since = None
            return
        if self.failing_since is None:
            self.failing_since = now
            log.warning("consumer not alive: %s", reason)
        elif now - self.failing_since >= self.stall_exit_s:
            log.critical("consumer stuck for %.0f s (%s); exiting with status %d so that the supervisor restarts "
                         "this worker", now - self.failing_since, reason, STALL_EXIT_CODE)
            logging.shutdown()
            self.exit(STALL_EXIT_CODE)

    def _run(self) -> None:
        while not self._stop.wait(WATCHDOG_INTERVAL_S):
            try:
                self.look()
            except Exception:
                log.exception("watchdog look failed")

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def queue_depth(client, queues: Callable[[], Iterable[str]]) -> Callable[[], int | None]:
    """Messages waiting in the queues the consumer takes from now (LLEN), or None when Redis cannot
    be asked. A queue an operator cancelled (``celery control cancel_consumer``) does not count:
    its messages wait by design, not because the worker is stuck."""

    def depth() -> int | None:
        if client is None:
            return None
        try:
            pipe = client.pipeline(transaction=False)
            for name in queues():
                pipe.llen(name)
            return sum(pipe.execute())
        except Exception:
            return None

    return depth
