"""The tagging worker's side of the broker, on real Redis: the atomic pop, the idle wait, settling.

Two kombu connections on the tagging worker's transport stand for two workers. A message a
worker returns (its batch did not commit) keeps its delivery tag, and the other worker may pop it
again the moment it is back in the queue, before the first one has finished settling: neither an
acknowledgement nor a return may then lose that worker's copy.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis
from kombu import Queue

from bench.stack import poll_until, push
from shared.broker import AtomicRedisTransport, QuickRetryConnection, transport_options
from shared.constants import BACKFILL_QUEUE, TAGGING_QUEUE
from tests.servers import PrivateRedis
from worker import consumer as consumer_module


class Worker:
    """One worker's connection: pops tagging messages with the atomic pop, one at a time."""

    def __init__(self, settings):
        self.conn = QuickRetryConnection(settings.broker_url, transport=AtomicRedisTransport,
                                         transport_options=transport_options(settings))
        self.received: list = []
        self.consumer = self.conn.Consumer([Queue(TAGGING_QUEUE), Queue(BACKFILL_QUEUE)], on_message=self.received.append,
                                           accept=["json"], prefetch_count=10)
        self.consumer.consume()
        self.channel = self.consumer.channel

    def pop(self):
        before = len(self.received)
        for _ in range(100):
            try:
                self.conn.drain_events(timeout=0.1)
            except TimeoutError:
                pass
            if len(self.received) > before:
                return self.received[-1]
        raise AssertionError("no message popped within 10 s")

    def close(self):
        self.consumer.cancel()
        self.conn.release()


@pytest.fixture
def workers(redis_url, make_settings):
    settings = make_settings(broker_url=redis_url, database_url="sqlite://")
    pair = Worker(settings), Worker(settings)
    yield pair
    for w in pair:
        w.close()


def _recorded(client) -> dict[str, int]:
    """``{delivery tag: image ID}`` of every message Redis holds as unacknowledged."""
    out = {}
    for tag, raw in client.hgetall("unacked").items():
        message = json.loads(raw)[0]
        out[tag.decode()] = message["headers"]["argsrepr"]
    assert set(out) == {t.decode() for t in client.zrange("unacked_index", 0, -1)}, "index and records differ"
    return out


@pytest.mark.parametrize("same_connection", [True, False], ids=["this-connection", "earlier-connection"])
def test_a_returned_message_popped_again_at_once_keeps_its_new_record(workers, redis_url, monkeypatch,
                                                                      same_connection):
    first, second = workers
    client = redis.Redis.from_url(redis_url)
    push(client, TAGGING_QUEUE, [7])
    message = first.pop()
    tag = message.delivery_tag
    assert _recorded(client) == {tag: "(7,)"}, "the pop recorded the message as unacknowledged"

    # The interleaving under test: the second worker pops the message the moment the first one's
    # return has put it back, before the first one's settle returns.
    restore = first.channel.qos.restore_by_tag
    again = []

    def restore_then_popped_elsewhere(*args, **kwargs):
        restore(*args, **kwargs)
        again.append(second.pop())

    monkeypatch.setattr(first.channel.qos, "restore_by_tag", restore_then_popped_elsewhere)
    # "earlier-connection": the message came on a connection since lost; it is settled on a new one.
    settle_on = first.channel
    if not same_connection:
        settle_on = first.conn.clone().channel()
        monkeypatch.setattr(settle_on.qos, "restore_by_tag", restore_then_popped_elsewhere)
    consumer_module._settle(settle_on, [(message, False)])

    assert [m.delivery_tag for m in again] == [tag]
    assert _recorded(client) == {tag: "(7,)"}, "the second worker's record of the message was deleted"
    assert client.llen(TAGGING_QUEUE) == 0

    # The second worker's batch fails too: the message goes back to the queue, not lost.
    consumer_module._settle(second.channel, [(again[0], False)])
    assert _recorded(client) == {}
    assert client.llen(TAGGING_QUEUE) == 1
    if same_connection:
        assert first.channel.qos.can_consume_max_estimate() == 10, "it still fills the first worker's prefetch window"
    else:
        settle_on.close()
    client.close()


class Commands:
    """The commands Redis runs on one DB while the block runs (MONITOR), by name."""

    def __init__(self, redis_url: str):
        self.url = redis_url
        self.names: list[str] = []

    def __enter__(self):
        self.client = redis.Redis.from_url(self.url)
        self.db = self.client.connection_pool.connection_kwargs["db"]
        self.monitor = redis.Redis.from_url(self.url).monitor()
        self.monitor.__enter__()
        return self

    def __exit__(self, *exc):
        self.client.echo("end of the block")
        for event in self.monitor.listen():
            if event["db"] != self.db:
                continue
            if event["command"] == "ECHO end of the block":
                break
            self.names.append(event["command"].split()[0].upper())
        self.monitor.__exit__(*exc)
        self.client.close()


def test_a_batch_is_acknowledged_in_one_round_trip(workers, redis_url):
    first, _ = workers
    client = redis.Redis.from_url(redis_url)
    push(client, TAGGING_QUEUE, [1, 2, 3, 4, 5])
    messages = [first.pop() for _ in range(5)]
    assert len(_recorded(client)) == 5 and first.channel.qos.can_consume_max_estimate() == 5
    with Commands(redis_url) as commands:
        consumer_module._settle(first.channel, [(m, m is not messages[2]) for m in messages])
    assert commands.names.count("ZREM") == 2, commands.names  # the four acks together, then the return
    assert _recorded(client) == {}
    assert [json.loads(raw)["headers"]["argsrepr"] for raw in client.lrange(TAGGING_QUEUE, 0, -1)] == ["(3,)"]
    assert first.channel.qos.can_consume_max_estimate() == 10, "the window is free again"
    client.close()


def test_a_pop_records_the_message_once(workers, redis_url):
    """The pop script records the message as unacknowledged; kombu's own record (a second
    pipeline to Redis per message) is skipped, and kombu still counts it in the prefetch window."""
    first, _ = workers
    client = redis.Redis.from_url(redis_url)
    push(client, TAGGING_QUEUE, [9])
    with Commands(redis_url) as commands:
        message = first.pop()
    assert _recorded(client) == {message.delivery_tag: "(9,)"}
    assert commands.names.count("HSET") == 1 and commands.names.count("ZADD") == 1, commands.names
    assert first.channel.qos.can_consume_max_estimate() == 9
    client.close()


def _blocked_on_blmove(client) -> bool:
    db = client.connection_pool.connection_kwargs["db"]
    return any(c["cmd"] == "blmove" and int(c["db"]) == db for c in client.client_list())


def _drain_until(worker: Worker, condition, what: str) -> None:
    """Run the worker's consume loop (nothing to pop) until ``condition()``."""

    def drained_and_true() -> bool:
        try:
            worker.conn.drain_events(timeout=0.05)
        except TimeoutError:
            pass
        return condition()

    poll_until(drained_and_true, 10, what, interval_s=0)


def test_an_idle_pop_waits_in_redis_and_an_upload_wakes_it(workers, redis_url):
    first, _ = workers
    client = redis.Redis.from_url(redis_url)
    first.channel.idle_wait_s = 60.0  # far longer than the test may take: only the upload can end the wait
    # The pop finds nothing; the wait goes out.
    _drain_until(first, lambda: _blocked_on_blmove(client), "the idle pop waits in Redis")
    # The consumer's dead-socket check allows for the wait it asked for (as if sent 10 s ago, then 70 s).
    first.channel._brpop_sent_at -= 10
    assert not first.channel.pop_overdue(5.0), "a wait in Redis was taken for a dead socket"
    first.channel._brpop_sent_at -= 60
    assert first.channel.pop_overdue(5.0)
    started = time.monotonic()
    push(client, TAGGING_QUEUE, [42])
    message = first.pop()
    assert time.monotonic() - started < 10, "the upload did not end the wait"
    assert message.headers["argsrepr"] == "(42,)"
    assert _recorded(client) == {message.delivery_tag: "(42,)"} and client.llen(TAGGING_QUEUE) == 0
    client.close()


def test_the_wait_leaves_the_queue_in_order_and_other_queues_are_still_popped(workers, redis_url):
    first, _ = workers
    client = redis.Redis.from_url(redis_url)
    first.channel.idle_wait_s = 0.3
    push(client, TAGGING_QUEUE, [1, 2, 3])
    popped = [first.pop().headers["argsrepr"] for _ in range(3)]
    _drain_until(first, lambda: _blocked_on_blmove(client), "the idle pop waits in Redis")
    push(client, TAGGING_QUEUE, [4, 5])  # ends the wait; the list must come out oldest first
    push(client, BACKFILL_QUEUE, [6])  # not waited on: popped after uploads, within a wait or so
    popped += [first.pop().headers["argsrepr"] for _ in range(3)]
    assert popped == ["(1,)", "(2,)", "(3,)", "(4,)", "(5,)", "(6,)"]
    assert client.llen(TAGGING_QUEUE) == 0 and client.llen(BACKFILL_QUEUE) == 0
    client.close()


def test_on_a_redis_without_blmove_an_idle_pop_polls(tmp_path, make_settings, caplog):
    server = PrivateRedis(tmp_path / "redis", "--rename-command", "BLMOVE", "BLMOVE_RENAMED").start()
    worker = Worker(make_settings(broker_url=server.url, database_url="sqlite://"))
    client = redis.Redis.from_url(server.url)
    try:
        worker.channel.idle_wait_s = 60.0
        with caplog.at_level(logging.WARNING, logger="shared.broker"):
            _drain_until(worker, lambda: "has no BLMOVE" in caplog.text, "the worker says the server has no BLMOVE")
            for _ in range(5):  # more empty pops: polled, not tried and logged again
                with pytest.raises(TimeoutError):
                    worker.conn.drain_events(timeout=0.1)
        assert caplog.text.count("has no BLMOVE") == 1, caplog.text
        assert not _blocked_on_blmove(client)
        started = time.monotonic()
        push(client, TAGGING_QUEUE, [11])
        assert worker.pop().headers["argsrepr"] == "(11,)"
        assert time.monotonic() - started < 10
    finally:
        client.close()
        worker.close()
        server.stop()


def test_a_wait_is_cut_short_and_the_next_pop_takes_the_queue_it_left_out(workers, redis_url):
    """A worker holding a full window of backfill waits in Redis for uploads only; once it has
    room again, ``cut_wait`` ends the wait (CLIENT UNBLOCK), and backfill is popped at once."""
    first, _ = workers
    client = redis.Redis.from_url(redis_url)
    first.channel.idle_wait_s = 60.0  # far longer than the test may take: only the cut can end it
    first.channel.skip_queues = frozenset({BACKFILL_QUEUE})
    push(client, BACKFILL_QUEUE, [5])
    _drain_until(first, lambda: _blocked_on_blmove(client), "the pop waits in Redis for uploads")
    first.channel.skip_queues = frozenset()
    started = time.monotonic()
    first.channel.cut_wait()
    assert first.pop().headers["argsrepr"] == "(5,)"  # pop() gives up after 10 s
    assert time.monotonic() - started < 10
    first.channel.cut_wait()  # no wait in flight: nothing to cut, nothing breaks
    client.close()


def test_the_consumer_cuts_the_wait_when_a_full_window_has_room_again(workers, redis_url, make_settings):
    """``BatchConsumer._steer``: a full backfill window leaves backfill out of the pop and the wait;
    the acknowledgements that make room end the wait in flight, not REDIS_WAIT_S later."""
    from types import SimpleNamespace

    first, _ = workers
    client = redis.Redis.from_url(redis_url)
    tagger = SimpleNamespace(settings=make_settings(broker_url=redis_url, max_batch=2), upload_fill=None,
                             submit=lambda *a, **k: None)
    consumer = consumer_module.BatchConsumer(tagger, queues=(TAGGING_QUEUE, BACKFILL_QUEUE))
    consumer._held_by_queue[BACKFILL_QUEUE] = consumer.window  # holding all the backfill it may
    consumer._steer(first.channel, idle=False)
    assert first.channel.skip_queues == {BACKFILL_QUEUE}
    assert first.channel.idle_wait_s == consumer_module.REDIS_WAIT_S  # it waits, with work in hand too
    first.channel.idle_wait_s = 60.0  # as if REDIS_WAIT_S were long: only the cut can end the wait
    push(client, BACKFILL_QUEUE, [6])
    _drain_until(first, lambda: _blocked_on_blmove(client), "the pop waits in Redis for uploads")
    consumer._held_by_queue[BACKFILL_QUEUE] -= 2  # a batch acknowledged
    consumer._steer(first.channel, idle=False)
    first.channel.idle_wait_s = 60.0
    started = time.monotonic()
    assert first.pop().headers["argsrepr"] == "(6,)"
    assert time.monotonic() - started < 10
    first.channel.can_cut_wait = False  # a server that refuses CLIENT UNBLOCK: with work in hand it polls
    consumer._steer(first.channel, idle=False)
    assert first.channel.idle_wait_s == 0.0
    consumer._steer(first.channel, idle=True)
    assert first.channel.idle_wait_s == consumer_module.REDIS_WAIT_S
    client.close()


def test_a_waiting_pop_sweeps_only_when_the_consumer_asks(workers, redis_url):
    """kombu's poller would sweep the unacknowledged set after every poll that found nothing (with
    the throttle of 1 the Celery workers need): a tagging worker waiting in Redis ran a sweep up to
    fifty times a second. It sweeps every restore_interval_s itself (``sweep``), and only then."""
    first, _ = workers
    client = redis.Redis.from_url(redis_url)
    first.channel.idle_wait_s = 60.0
    _drain_until(first, lambda: _blocked_on_blmove(client), "the pop waits in Redis")
    with Commands(redis_url) as commands:
        for _ in range(20):  # twenty polls that find nothing, as the consumer's loop makes them
            with pytest.raises(TimeoutError):
                first.conn.drain_events(timeout=0.02)
    assert "ZRANGE" not in commands.names and "SET" not in commands.names, commands.names
    with Commands(redis_url) as commands:
        first.channel.qos.sweep(num=first.channel.unacked_restore_limit)
    assert commands.names.count("ZRANGE") == 1, commands.names
    first.channel.idle_wait_s = 0.0  # end the wait, and send no other: the connection closes at once
    first.channel.cut_wait()
    _drain_until(first, lambda: not _blocked_on_blmove(client), "the wait ended")
    client.close()
