"""The fetch/decode threads' priority (STILLTAG_DECODE_NICE): a niceness, or SCHED_IDLE."""

import os
import sys
import threading

import pytest
from pydantic import ValidationError

from shared.config import Settings
from worker.prepare_pool import lower_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")


def _in_a_thread(nice) -> tuple[int, int]:
    """The scheduling policy and niceness a new thread has after ``lower_priority(nice)``."""
    seen: list[tuple[int, int]] = []

    def run() -> None:
        lower_priority(nice)
        tid = threading.get_native_id()
        seen.append((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


def test_idle_puts_the_thread_in_sched_idle_and_leaves_the_caller_alone():
    before = os.sched_getscheduler(threading.get_native_id())
    policy, _ = _in_a_thread("idle")
    assert policy == os.SCHED_IDLE
    assert os.sched_getscheduler(threading.get_native_id()) == before == os.SCHED_OTHER


def test_a_niceness_is_set_on_the_thread_only():
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base > 7:
        pytest.skip(f"this process already runs at niceness {base}")
    policy, nice = _in_a_thread(7)
    assert (policy, nice) == (os.SCHED_OTHER, 7)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


@pytest.mark.parametrize(("value", "expected"), [("idle", "idle"), ("IDLE", "idle"), ("0", 0), ("19", 19)])
def test_the_setting_takes_a_niceness_or_idle(monkeypatch, value, expected):
    monkeypatch.setenv("STILLTAG_DECODE_NICE", value)
    assert Settings().decode_nice == expected


@pytest.mark.parametrize("value", ["20", "-1", "lowest", "5.5", ""])
def test_other_values_are_refused(monkeypatch, value):
    monkeypatch.setenv("STILLTAG_DECODE_NICE", value)
    with pytest.raises(ValidationError, match="must be a niceness from 0 to 19, or idle"):
        Settings()


def test_the_default_is_niceness_10():
    assert Settings().decode_nice == 10
