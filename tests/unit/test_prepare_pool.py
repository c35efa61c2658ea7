"""The fetch/decode threads (worker/prepare_pool.py): fetches never wait for a decode, decodes run
at most ``decode_workers`` at once, failures and cancellations reach the caller's future; without
fetch threads (a local store) the decode thread fetches its own image."""

import os
import sys
import threading
from concurrent.futures import CancelledError

import pytest

from shared.config import Settings
from worker.prepare_pool import PreparePool

WAIT_S = 30  # the longest any condition below is waited for; each returns as soon as it holds


class Gate:
    """Decodes that block until opened, counting how many run at once."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.open = False
        self.running = self.most = self.fetched = 0

    def fetch(self, value: int):
        with self.cond:
            self.fetched += 1
            self.cond.notify_all()
        return lambda: self.decode(value)

    def decode(self, value: int) -> tuple[int, str]:
        with self.cond:
            self.running += 1
            self.most = max(self.most, self.running)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.open, WAIT_S)
            self.running -= 1
        return value, threading.current_thread().name

    def wait_for(self, predicate) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT_S), "timed out"

    def release(self) -> None:
        with self.cond:
            self.open = True
            self.cond.notify_all()


def _pool(fetch_ahead: bool = True, **settings) -> PreparePool:
    return PreparePool(Settings(**settings), fetch_ahead=fetch_ahead)


def test_fetches_go_on_while_every_decode_thread_is_busy_and_decodes_are_capped():
    pool, gate = _pool(fetch_concurrency=4, decode_workers=2), Gate()
    try:
        futures = [pool.submit(lambda i=i: gate.fetch(i)) for i in range(10)]
        gate.wait_for(lambda: gate.fetched == 10 and gate.running == 2)  # all fetched, two decoding
        assert not any(f.done() for f in futures)
        gate.release()
        results = [f.result(timeout=WAIT_S) for f in futures]
        assert [value for value, _ in results] == list(range(10))
        assert all(name.startswith("prepare-decode") for _, name in results)
        assert gate.most == 2
    finally:
        gate.release()
        pool.shutdown()


def test_a_fetch_that_gives_a_result_needs_no_decode_thread():
    pool, gate = _pool(fetch_concurrency=2, decode_workers=1), Gate()
    try:
        blocked = pool.submit(lambda: gate.fetch(0))  # holds the only decode thread
        gate.wait_for(lambda: gate.running == 1)
        assert pool.submit(lambda: ("ready", threading.current_thread().name)).result(timeout=WAIT_S)[1].startswith(
            "prepare-fetch")
        gate.release()
        assert blocked.result(timeout=WAIT_S)[0] == 0
    finally:
        gate.release()
        pool.shutdown()


def _raise(exc: Exception):
    raise exc


def test_an_exception_in_either_stage_is_the_futures():
    pool = _pool()
    try:
        with pytest.raises(OSError, match="store down"):
            pool.submit(lambda: _raise(OSError("store down"))).result(timeout=WAIT_S)
        with pytest.raises(ValueError, match="bad pixels"):
            pool.submit(lambda: lambda: _raise(ValueError("bad pixels"))).result(timeout=WAIT_S)
    finally:
        pool.shutdown()


def test_a_future_whose_fetch_has_not_started_can_be_cancelled():
    pool, started = _pool(fetch_concurrency=1), threading.Event()
    release, ran = threading.Event(), []

    def slow_fetch():
        started.set()
        assert release.wait(WAIT_S)
        return "first"

    try:
        first = pool.submit(slow_fetch)
        assert started.wait(WAIT_S)
        queued = pool.submit(lambda: ran.append("queued") or "queued")
        assert queued.cancel()
        release.set()
        assert first.result(timeout=WAIT_S) == "first"
        assert pool.submit(lambda: "after").result(timeout=WAIT_S) == "after"  # the queue has moved past it
        assert ran == []
    finally:
        release.set()
        pool.shutdown()


def test_shutdown_ends_every_waiting_future():
    pool, gate = _pool(fetch_concurrency=4, decode_workers=1), Gate()
    try:
        futures = [pool.submit(lambda i=i: gate.fetch(i)) for i in range(4)]
        gate.wait_for(lambda: gate.fetched == 4 and gate.running == 1)
        pool.shutdown()  # three decodes had not started
        gate.release()
        assert futures[0].result(timeout=WAIT_S)[0] == 0
        for f in futures[1:]:
            with pytest.raises(CancelledError):
                f.result(timeout=WAIT_S)
    finally:
        gate.release()
        pool.shutdown()


def test_a_shutdown_while_a_fetch_runs_cancels_its_decode():
    pool, fetching, shut = _pool(fetch_concurrency=1), threading.Event(), threading.Event()

    def fetch():
        fetching.set()
        assert shut.wait(WAIT_S)
        return lambda: "decoded"  # a decode to hand to a pool that has shut down

    try:
        future = pool.submit(fetch)
        assert fetching.wait(WAIT_S)
        pool.shutdown()
        shut.set()
        with pytest.raises(CancelledError):
            future.result(timeout=WAIT_S)
    finally:
        shut.set()
        pool.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_both_stages_run_at_the_decode_niceness():
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base > 7:
        pytest.skip(f"this process already runs at niceness {base}")
    pool = _pool(decode_nice=7)

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        assert pool.submit(niceness).result(timeout=WAIT_S) == 7
        assert pool.submit(lambda: niceness).result(timeout=WAIT_S) == 7
    finally:
        pool.shutdown()


def test_without_fetch_ahead_the_decode_thread_fetches_and_decodes():
    pool, gate = _pool(fetch_ahead=False, decode_workers=2), Gate()
    try:
        futures = [pool.submit(lambda i=i: gate.fetch(i)) for i in range(5)]
        gate.wait_for(lambda: gate.running == 2)
        assert gate.fetched == 2  # no fetch runs ahead of a free decode thread
        fetching = pool.submit(lambda: threading.current_thread().name)
        gate.release()
        assert [f.result(timeout=WAIT_S)[0] for f in futures] == list(range(5))
        assert fetching.result(timeout=WAIT_S).startswith("prepare-decode")
        assert gate.most == 2
        with pytest.raises(OSError, match="store down"):
            pool.submit(lambda: _raise(OSError("store down"))).result(timeout=WAIT_S)
    finally:
        gate.release()
        pool.shutdown()
