"""The fetch/decode threads of one tagging worker. Decodes are CPU work: at most ``decode_workers``
(one per core by default) run at once, so that they do not crowd out the forward pass's threads.
Fetches from S3 are I/O: ``fetch_concurrency`` run at once, each handing its image to a decode
thread and going on to the next fetch, so that no fetch waits for a decode. A ``file://`` image is
read by the decode thread itself, right before it decodes it: no thread reads ahead, and end to end
was 3-7 % faster that way than with fetch threads in front (README, Benchmarks). All of them run at
``decode_nice``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Generic, TypeAlias, TypeVar, Union

from shared.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a fetch gives: the result itself (nothing left to decode on the CPU), or the decode left to
#: do, a function that a decode thread calls for the result.
Fetched: TypeAlias = Union[T, Callable[[], T]]  # noqa: UP007 - an alias with a TypeVar


class PreparePool(Generic[T]):
    """``decode_workers`` decode threads (0: one per core), and with ``fetch_ahead`` (remote
    images) ``fetch_concurrency`` fetch threads in front of them."""

    def __init__(self, settings: Settings, *, fetch_ahead: bool, name: str = "prepare"):
        decoders = settings.decode_workers or os.cpu_count() or 1
        self._decode = _threads(decoders, f"{name}-decode", settings.decode_nice)
        self._fetch = _threads(settings.fetch_concurrency, f"{name}-fetch", settings.decode_nice) if fetch_ahead else None

    def submit(self, fetch: Callable[[], Fetched[T]]) -> Future[T]:
        """``fetch()``, then, when it gives a function, that function in a decode thread. The future
        has the result, or the exception either raised; it can be cancelled until the fetch starts."""
        if self._fetch is None:
            return self._decode.submit(_fetch_and_decode, fetch)
        out: Future[T] = Future()

        def fetch_stage() -> None:
            if not out.set_running_or_notify_cancel():
                return  # cancelled while it waited for a fetch thread
            try:
                got = fetch()
            except BaseException as exc:  # the caller's to see, in the future
                out.set_exception(exc)
                return
            if not callable(got):
                out.set_result(got)
                return
            try:
                decoding = self._decode.submit(decode_stage, got)
            except RuntimeError:  # the pool shut down while this fetch ran
                out.set_exception(CancelledError("the decode pool shut down"))
                return
            decoding.add_done_callback(decode_cancelled)

        def decode_stage(decode: Callable[[], T]) -> None:
            try:
                out.set_result(decode())
            except BaseException as exc:
                out.set_exception(exc)

        def fetch_cancelled(inner: Future) -> None:
            if inner.cancelled():  # the pool shut down before the fetch started
                out.cancel()

        def decode_cancelled(inner: Future) -> None:
            if inner.cancelled():  # the pool shut down before the decode started: no waiter hangs
                out.set_exception(CancelledError("the decode pool shut down"))

        self._fetch.submit(fetch_stage).add_done_callback(fetch_cancelled)
        return out

    def decode(self, decode: Callable[[], T]) -> Future[T]:
        """``decode()`` in a decode thread, with nothing to fetch (bytes already in memory)."""
        return self._decode.submit(decode)

    def shutdown(self, *, wait: bool = False) -> None:
        """Stop both stages; what has not started is cancelled."""
        if self._fetch is not None:
            self._fetch.shutdown(wait=wait, cancel_futures=True)
        self._decode.shutdown(wait=wait, cancel_futures=True)


def finish(got: Fetched[T]) -> T:
    """What a fetch gave, with its decode (if any) run in this thread."""
    return got() if callable(got) else got


def _fetch_and_decode(fetch: Callable[[], Fetched[T]]) -> T:
    return finish(fetch())


def _threads(count: int, name: str, nice: int | str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(count, thread_name_prefix=name, initializer=lower_priority, initargs=(nice,))


def lower_priority(nice: int | str) -> None:
    """Lower this thread's priority (Linux threads have their own): a niceness, or ``idle``
    (SCHED_IDLE: the thread runs only on a core nothing else wants); elsewhere nothing."""
    if not nice or not sys.platform.startswith("linux"):
        return
    try:
        if nice == "idle":
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        else:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(nice))
    except OSError as exc:
        log.warning("could not lower the decode threads' priority: %s", exc)
