"""Liveness, the stall watchdog and the health server, driven without a broker."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from shared.errors import SettingsError
from shared.health import HealthServer, all_of, bind
from worker.health import LIVENESS_STALL_S, STALL_EXIT_CODE, Liveness, Watchdog
from worker.process import free_port, probe


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeConsumer:
    """The progress stamps a BatchConsumer reports."""

    def __init__(self, clock: Clock):
        self.last_tick = self.last_progress = clock.now
        self.inference_started_at = None
        self.decoding_since = None
        self.holding = 0

    def held(self) -> int:
        return self.holding


@pytest.fixture
def clock():
    return Clock()


def test_idle_worker_with_nothing_waiting_stays_alive(clock):
    consumer = FakeConsumer(clock)
    live = Liveness(consumer, max_batch_s=120, clock=clock)
    clock.now += 3600
    consumer.last_tick = clock.now  # the loop keeps running, nothing comes
    assert live.check() == (True, "idle")


def test_waiting_messages_and_no_progress_is_not_alive(clock):
    """The failure seen after a Redis restart: the loop runs, messages wait, none is taken."""
    consumer = FakeConsumer(clock)
    live = Liveness(consumer, max_batch_s=120, clock=clock)
    live.waiting = 40
    clock.now += LIVENESS_STALL_S - 1
    consumer.last_tick = clock.now
    assert live.check()[0]
    clock.now += 2
    consumer.last_tick = clock.now
    ok, reason = live.check()
    assert not ok and "40 message(s) wait" in reason


def test_a_loop_that_stopped_running_is_not_alive(clock):
    consumer = FakeConsumer(clock)
    live = Liveness(consumer, max_batch_s=120, clock=clock)
    clock.now += LIVENESS_STALL_S + 1
    ok, reason = live.check()
    assert not ok and "consume loop" in reason


@pytest.mark.parametrize(("since", "alive", "stuck"), [
    ("inference_started_at", "tagging a batch", "a batch has been in the forward pass for 121 s"),
    # A batch taken waits for its images' fetches and decodes (a slow image store): alive as a
    # forward pass is; a fetch that hangs for good is not, though nothing else is held.
    ("decoding_since", "decoding a batch", "a batch has waited 121 s for its images to be fetched and decoded"),
])
def test_a_long_batch_is_alive_until_the_visibility_timeout(clock, since, alive, stuck):
    consumer = FakeConsumer(clock)
    live = Liveness(consumer, max_batch_s=120, clock=clock)
    live.waiting = 500
    setattr(consumer, since, clock.now)
    clock.now += 100
    consumer.last_tick = clock.now
    assert live.check() == (True, alive)
    clock.now += 21
    consumer.last_tick = clock.now
    assert live.check() == (False, stuck)


def test_watchdog_exits_only_after_stall_exit_s_of_failing(clock):
    consumer = FakeConsumer(clock)
    exits = []
    depth = {"value": 10}
    dog = Watchdog(Liveness(consumer, max_batch_s=120, clock=clock), queue_depth=lambda: depth["value"],
                   stall_exit_s=60, exit=exits.append, clock=clock)
    for _ in range(4):  # 20 s while progress is made: fine
        clock.now += 5
        consumer.last_tick = consumer.last_progress = clock.now
        dog.look()
    assert dog.failing_since is None
    for _ in range(16):  # then the loop runs but takes nothing, while 10 messages wait
        clock.now += 5
        consumer.last_tick = clock.now
        dog.look()
    assert exits == []  # not alive from 25 s without progress on: failing for 55 s, not yet 60 s
    clock.now += 5
    consumer.last_tick = clock.now
    dog.look()
    assert exits == [STALL_EXIT_CODE]


def test_watchdog_does_not_exit_while_the_broker_is_unreachable(clock):
    """Restarting a worker does not bring Redis back: unknown queue depth is not a stall."""
    consumer = FakeConsumer(clock)
    exits = []
    dog = Watchdog(Liveness(consumer, max_batch_s=120, clock=clock), queue_depth=lambda: None,
                   stall_exit_s=30, exit=exits.append, clock=clock)
    for _ in range(40):
        clock.now += 5
        consumer.last_tick = clock.now
        dog.look()
    assert exits == [] and dog.failing_since is None


def test_watchdog_recovers_when_progress_resumes(clock):
    consumer = FakeConsumer(clock)
    exits = []
    dog = Watchdog(Liveness(consumer, max_batch_s=120, clock=clock), queue_depth=lambda: 5,
                   stall_exit_s=60, exit=exits.append, clock=clock)
    clock.now += 30
    consumer.last_tick = clock.now
    dog.look()
    assert dog.failing_since is not None
    consumer.last_progress = clock.now
    dog.look()
    assert dog.failing_since is None and exits == []


def test_health_server_answers_checks_and_metrics():
    state = {"live": (True, "consuming"), "ready": (False, "no model loaded yet")}
    server = HealthServer(0, live=lambda: state["live"], ready=lambda: state["ready"], host="127.0.0.1").start()
    try:
        assert probe(server.port, "/livez") == (200, "consuming\n")
        assert probe(server.port, "/readyz") == (503, "no model loaded yet\n")
        state["ready"] = (True, "ok")
        assert probe(server.port, "/readyz")[0] == 200
        status, text = probe(server.port, "/metrics")
        assert status == 200 and "python_info" in text
    finally:
        server.stop()


def test_a_check_that_raises_fails_the_probe_not_the_server():
    def broken():
        raise RuntimeError("boom")

    server = HealthServer(0, live=broken, host="127.0.0.1").start()
    try:
        assert probe(server.port, "/livez") == (503, "RuntimeError: boom\n")
        assert probe(server.port, "/readyz")[0] == 200
    finally:
        server.stop()


def test_all_of_names_the_first_failing_check():
    check = all_of(lambda: (True, "ok"), lambda: (False, "the database does not answer"), lambda: (False, "later"))
    assert check() == (False, "the database does not answer")


def test_port_zero_turns_the_server_off_and_a_taken_port_is_one_clear_error():
    assert bind(0) is None
    port = free_port()
    first = bind(port)
    try:
        with pytest.raises(SettingsError, match=rf"port {port} \(STILLTAG_METRICS_PORT\).*own port, or 0"):
            bind(port)
    finally:
        first.stop()


def test_probe_reports_nothing_listening():
    status, reason = probe(free_port(), "/livez")
    assert status == 0 and reason
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{free_port()}/livez", timeout=1)


class CountingRedis:
    """Answers queue_depth's pipeline: each queue's length from ``lengths``."""

    def __init__(self, lengths: dict[str, int]):
        self.lengths, self.asked = lengths, []

    def pipeline(self, transaction):
        self.asked = []
        return self

    def llen(self, name):
        self.asked.append(name)

    def execute(self):
        return [self.lengths[q] for q in self.asked]


def test_a_queue_cancelled_by_remote_control_is_not_work_waiting(clock):
    """``celery control cancel_consumer backfill``: backfill waits by design, and the watchdog must
    not take the worker for stuck (nor restart it) while it does."""
    from types import SimpleNamespace

    from shared.config import Settings
    from worker.consumer import BatchConsumer, QueueRefused
    from worker.health import queue_depth

    tagger = SimpleNamespace(settings=Settings(broker_url="redis://127.0.0.1:6379/0"), upload_fill=16)
    consumer = BatchConsumer(tagger, queues=("tagging", "backfill"))
    depth = queue_depth(CountingRedis({"tagging": 0, "backfill": 500}), consumer.consuming)
    assert depth() == 500
    consumer.pause("backfill")
    assert consumer.consuming() == ("tagging",)
    assert depth() == 0
    for refused in (consumer.pause, consumer.resume):  # not one of its queues: the reply says so
        with pytest.raises(QueueRefused, match=r"takes only the queues it was started with \(tagging, backfill\), "
                                               r"not 'training'; start a worker for it: stilltag worker --queues training"):
            refused("training")
    assert consumer.consuming() == ("tagging",)
    consumer.resume("backfill")
    assert depth() == 500

    embedded = BatchConsumer(SimpleNamespace(settings=Settings(broker_url="filesystem://"), upload_fill=16))
    with pytest.raises(QueueRefused, match="pausing a queue needs the Redis broker"):  # only the Redis pop can skip one
        embedded.pause("backfill")
    assert embedded.consuming() == ("tagging", "backfill")
