"""Micro-batching: the tagging worker's consumer, a thread inside a Celery worker.

``stilltag worker`` is a real Celery worker (solo pool, worker/celery_worker.py): Celery owns
remote control, heartbeats and events, and this consumer owns the tagging queues. Why not a
stock Celery task: a task handles one message, and celery-batches 0.11 acks a whole batch
when its function raises, loses its flush timer after a broker reconnect and is capped by the
prefetch settings (README, "Delivery guarantees"). This consumer uses kombu, the library
Celery itself uses, on the same broker, queues and message format:

* the consumer thread receives messages, parks malformed ones, starts each image's fetch +
  decode in a thread pool the moment it arrives, closes a batch at ``max_batch`` images or
  ``max_wait_ms`` after its first, and acknowledges the messages of committed batches;
* one inference thread runs the forward pass and the transaction for one batch while the
  consumer thread gathers (and the pool decodes) the next.

A message is acknowledged only after its batch's transaction has committed; until then it is
in the broker's unacknowledged set, and a sweep every ``restore_interval_s`` returns the ones
older than ``visibility_timeout_s`` (a killed worker's) to their queue. When the connection is
lost, the batches in hand still finish and are acknowledged on the next connection.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kombu import Queue

from shared.broker import (
    RECONNECT_INTERVAL_S,
    AtomicRedisTransport,
    QuickRetryConnection,
    park,
    transport_class,
    transport_options,
)
from shared.constants import ENQUEUED_AT_HEADER, TAGGING_QUEUES
from shared.messages import BadMessage, parse_tag_request
from worker import metrics
from worker.service import Tagger

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # longest wait in the broker with nothing buffered (acks wait at most this)
FAILED_BATCH_BACKOFF_S = (0.5, 30.0)  # first and longest pause after a batch that did not commit
BUSY_POLL_S = 0.005  # how often an overdue batch looks for an idle inference thread
BATCHES_IN_FLIGHT = 3  # gathering + waiting + in the forward pass: the prefetch window, in batches
POP_REPLY_TIMEOUT_S = 5.0  # an atomic pop answers in milliseconds; no reply this long = a dead socket


@dataclass
class Batch:
    messages: list = field(default_factory=list)
    futures: list[Future] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)  # monotonic, per message: for the queue wait
    first_at: float = 0.0
    staged: Future | None = None  # GPU: the input's copy to the device, started at dispatch (Tagger.stage_async)


class BrokerLost(ConnectionError):
    """An acknowledgement could not reach the broker: reconnect, and settle it on the new connection."""


def parse_message(message) -> int:
    """The image ID of a delivered kombu message, or ``BadMessage`` saying why not."""
    if message.content_type != "application/json":
        raise BadMessage(f"content-type {message.content_type!r} is not application/json")
    try:
        body = json.loads(message.body)
    except (TypeError, ValueError) as exc:
        raise BadMessage(f"body is not JSON: {exc}") from None
    return parse_tag_request((message.headers or {}).get("task"), body)


class BatchConsumer:
    def __init__(self, tagger: Tagger, *, queues: tuple[str, ...] = TAGGING_QUEUES):
        self.tagger = tagger
        self.settings = tagger.settings
        self.queues = queues
        self.stop_event = threading.Event()
        self.ready: queue.Queue[Batch | None] = queue.Queue(maxsize=1)
        self.done: queue.Queue[tuple[Batch, Exception | None]] = queue.Queue()
        self.batch = Batch()
        self.max_wait_s = self.settings.max_wait_ms / 1000
        self._next_restore = 0.0
        self._inference_idle = threading.Event()  # set while the inference thread waits for a batch
        self._next_idle_check = 0.0
        self._channel = None  # the channel of the current connection
        self._owed: list[tuple[object, bool]] = []  # (message, committed) not yet settled with the broker
        # Progress, read by the liveness check (worker/health.py); monotonic seconds.
        self.started = threading.Event()  # set once the first connection consumes
        self.last_tick = time.monotonic()  # the consume loop ran
        self.last_progress = time.monotonic()  # a message was taken or a batch committed
        self.inference_started_at: float | None = None  # a batch is in the forward pass since

    # --- main thread ------------------------------------------------------------------------
    def on_message(self, message) -> None:
        queue_name = (message.delivery_info or {}).get("routing_key", "?")
        metrics.RECEIVED.inc()
        try:
            image_id = parse_message(message)
        except BadMessage as exc:
            park(self.tagger.runtime.events, queue=queue_name, raw=_raw(message), reason=str(exc))
            message.ack()
            return
        now = time.monotonic()
        if not self.batch.messages:
            self.batch.first_at = now
        self.batch.messages.append(message)
        self.batch.queues.append(queue_name)
        self.batch.arrived_at.append(now)
        self.batch.futures.append(self.tagger.submit(image_id))
        self._progress()

    def held(self) -> int:
        """Messages this worker holds and has not sent to the forward pass (about: a waiting batch
        counts as one)."""
        return len(self.batch.messages) + (1 if self.ready.full() else 0)

    def _progress(self) -> None:
        self.last_progress = time.monotonic()
        metrics.LAST_PROGRESS.set_to_current_time()

    def _batch_due(self) -> bool:
        b = self.batch
        if not b.messages:
            return False
        if len(b.messages) >= self.settings.max_batch:
            return True
        # Past max_wait_ms a batch goes as soon as the inference thread can take it. While that
        # thread is busy the batch keeps gathering (and decoding) instead: closed early it would
        # only wait in the hand-off, and under load it would stay small (batches of 5-9 of 64 were
        # seen in the benchmark), paying the forward pass and the transaction per few images.
        return time.monotonic() >= b.first_at + self.max_wait_s and self._inference_idle.is_set()

    def _dispatch(self) -> None:
        batch, self.batch = self.batch, Batch()
        batch.staged = self.tagger.stage_async(batch.futures)
        while True:  # the inference thread is busy: keep acknowledging while we wait for it
            self._ack_done()
            try:
                self.ready.put(batch, timeout=0.02)
                return
            except queue.Full:
                continue

    def _ack_done(self) -> None:
        self._collect_done()
        self._settle()

    def _settle(self) -> None:
        """Acknowledge (committed) or return (not committed) what is owed to the broker.

        A message from an earlier connection is settled by its delivery tag on this one (Redis
        keeps it in ``unacked`` until then). When the broker cannot be reached, ``BrokerLost``
        makes the consumer reconnect; the rest stays owed. A failed ack left in kombu's
        bookkeeping would fill the prefetch window for good: that is how workers once went
        silent after a Redis restart, alive and consuming nothing.
        """
        while self._owed:
            message, committed = self._owed[0]
            try:
                _settle(self._channel, message, committed)
            except Exception as exc:
                raise BrokerLost(f"could not {'acknowledge' if committed else 'return'} a message: {exc}") from exc
            self._owed.pop(0)

    def _maybe_restore(self, channel) -> None:
        now = time.monotonic()
        if now < self._next_restore:
            return
        self._next_restore = now + self.settings.restore_interval_s
        qos: Any = getattr(channel, "qos", None)
        if hasattr(qos, "restore_visible"):  # Redis: return expired unacked messages to their queues
            try:
                qos.restore_visible(num=channel.unacked_restore_limit, interval=1)
            except Exception:
                log.exception("could not return expired unacknowledged messages")

    def _maybe_idle_check(self) -> None:
        """With nothing to tag, still let the inference thread follow the champion, so the first
        image after a promotion does not wait for the new model to load."""
        now = time.monotonic()
        if self.batch.messages or now < self._next_idle_check:
            return
        self._next_idle_check = now + self.settings.model_poll_s
        try:
            self.ready.put_nowait(Batch())
        except queue.Full:  # busy: it checks between batches anyway
            pass

    def _wait_s(self) -> float:
        if not self.batch.messages:
            return IDLE_POLL_S
        left = self.batch.first_at + self.max_wait_s - time.monotonic()
        return left if left > 0.001 else BUSY_POLL_S  # overdue: look again soon for an idle inference thread

    def _connection(self) -> QuickRetryConnection:
        redis_broker = self.settings.broker_scheme in ("redis", "rediss")
        transport = AtomicRedisTransport if redis_broker else transport_class(self.settings)
        options = transport_options(self.settings)
        if self.settings.broker_scheme == "filesystem":
            options["polling_interval"] = 0.01
        return QuickRetryConnection(self.settings.broker_url, transport=transport, transport_options=options)

    def _tick(self) -> None:
        self.last_tick = time.monotonic()

    def _consume(self) -> None:
        prefetch = self.settings.max_batch * BATCHES_IN_FLIGHT
        with self._connection() as conn:
            conn.ensure_connection(max_retries=None, callback=self._waiting_for_broker)
            consumer = conn.Consumer([Queue(q) for q in self.queues], on_message=self.on_message,
                                     accept=["json"], prefetch_count=prefetch)
            with consumer:
                self._channel = consumer.channel
                self._settle()  # what an earlier connection could not acknowledge
                log.info("consuming %s (max_batch=%d, max_wait_ms=%d)", ",".join(self.queues),
                         self.settings.max_batch, self.settings.max_wait_ms)
                self.started.set()
                while not self.stop_event.is_set():
                    self._tick()
                    self._ack_done()
                    self._maybe_restore(consumer.channel)
                    if getattr(consumer.channel, "pop_overdue", None) and consumer.channel.pop_overdue(POP_REPLY_TIMEOUT_S):
                        raise BrokerLost(f"no reply from the broker for {POP_REPLY_TIMEOUT_S:.0f} s")
                    try:
                        conn.drain_events(timeout=self._wait_s())
                    except TimeoutError:
                        pass
                    if self._batch_due():
                        self._dispatch()
                    self._maybe_idle_check()
                self._shutdown()

    def _waiting_for_broker(self) -> None:
        """Between attempts to reach the broker: the batch in hand still goes to the forward pass
        (the database may be up), and what finished is kept to acknowledge later."""
        self._tick()  # waiting for the broker is not a stuck loop: /readyz reports the broker
        self._collect_done()  # acknowledged on the next connection
        if self.batch.messages and self._inference_idle.is_set():
            try:
                self.ready.put_nowait(self.batch)
                self.batch = Batch()
            except queue.Full:
                pass
        if self.stop_event.is_set():
            raise _Stop()

    def _collect_done(self) -> None:
        """What finished batches owe the broker: an ack (committed) or a return (not)."""
        while True:
            try:
                batch, error = self.done.get_nowait()
            except queue.Empty:
                return
            self._owed.extend((message, error is None) for message in batch.messages)

    def _shutdown(self) -> None:
        """Graceful stop: the batch in the forward pass is finished and acknowledged; every other
        message this worker holds (gathering, or waiting for the forward pass) goes back to its
        queue now, for another worker."""
        held: list[Batch | None] = [self.batch]
        self.batch = Batch()
        try:
            held.append(self.ready.get_nowait())
        except queue.Empty:
            pass
        returned = 0
        for batch in held:
            if batch is None:
                continue
            for f in batch.futures:
                f.cancel()
            self._owed.extend((message, False) for message in batch.messages)
            returned += len(batch.messages)
        self.ready.put(None)
        self._inference.join()
        self._ack_done()
        self._settle()
        log.info("stopped: the batch in the forward pass was finished; %d held message(s) returned to the queue",
                 returned)

    def run(self) -> None:
        """Consume until ``stop()``; survives broker restarts and bad messages."""
        self._inference = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        self._inference.start()
        pause = RECONNECT_INTERVAL_S[0]
        while not self.stop_event.is_set():
            try:
                self._consume()
                return
            except _Stop:
                break
            except Exception as exc:
                # Broker gone or a transport error. What this worker holds stays in its batches and is
                # acknowledged on the next connection; a killed worker's messages come back by the sweep.
                log.error("consumer error (%s: %s); reconnecting", type(exc).__name__, exc)
                metrics.RECONNECTS.inc()
                self._channel = None
                self._tick()
                self.stop_event.wait(pause)
        if self._inference.is_alive():
            self.ready.put(None)
            self._inference.join()

    def stop(self) -> None:
        self.stop_event.set()

    # --- inference thread -------------------------------------------------------------------
    def _inference_loop(self) -> None:
        backoff = 0.0
        while True:
            self._inference_idle.set()
            batch = self.ready.get()
            self._inference_idle.clear()
            if batch is None:
                return
            if not batch.messages:  # an idle tick from the main thread
                self.tagger.maybe_switch()
                continue
            try:
                self.tagger.maybe_switch()
                started = self.inference_started_at = time.monotonic()
                for arrived in batch.arrived_at:
                    metrics.QUEUE_WAIT.observe(started - arrived)
                t0 = time.perf_counter()
                staged = batch.staged.result() if batch.staged is not None else None
                self.tagger.run_batch([f.result() for f in batch.futures], staged)
                log.info("batch of %d (%d from %s) tagged with %s in %.0f ms", len(batch.messages),
                         batch.queues.count(self.queues[0]), self.queues[0], self.tagger.loaded.version,
                         (time.perf_counter() - t0) * 1000)
                _observe_enqueue_to_commit(batch.messages)
                self.done.put((batch, None))
                self._progress()
                backoff = 0.0
            except Exception as exc:
                log.exception("batch of %d not committed; its messages go back to the queue", len(batch.messages))
                metrics.BATCH_FAILURES.inc()
                self.done.put((batch, exc))
                backoff = min(max(backoff * 2, FAILED_BATCH_BACKOFF_S[0]), FAILED_BATCH_BACKOFF_S[1])
                time.sleep(backoff)
            finally:
                self.inference_started_at = None


class _Stop(Exception):
    pass


def _settle(channel, message, committed: bool) -> None:
    """Acknowledge a message, or return it to the front of its queue, on ``channel``.

    On Redis a message delivered on an earlier connection is settled by its delivery tag (Redis
    keeps it in ``unacked`` until then); one of this connection is also acknowledged to kombu,
    which frees its place in the prefetch window.
    """
    current = message.channel is channel
    qos: Any = getattr(channel, "qos", None)
    if not hasattr(qos, "restore_by_tag"):  # the embedded broker has one connection and no unacked set
        if current:
            message.ack() if committed else message.requeue()
        return
    tag = message.delivery_tag
    if not committed:
        qos.restore_by_tag(tag)  # to the consuming end: served next
    if current:
        message.ack()
    else:
        with channel.conn_or_acquire() as client:
            client.pipeline().zrem(channel.unacked_index_key, tag).hdel(channel.unacked_key, tag).execute()


def _observe_enqueue_to_commit(messages) -> None:
    """The website's view: from its enqueue (optional header, Unix seconds) to the commit."""
    now = time.time()
    for message in messages:
        enqueued_at = (message.headers or {}).get(ENQUEUED_AT_HEADER)
        if isinstance(enqueued_at, (int, float)) and not isinstance(enqueued_at, bool) and 0 < enqueued_at <= now:
            metrics.ENQUEUE_TO_COMMIT.observe(now - enqueued_at)


def _raw(message) -> str:
    try:
        return json.dumps({"headers": message.headers, "properties": message.properties,
                           "body": message.body.decode("utf-8", "replace") if isinstance(message.body, bytes) else message.body})
    except Exception:
        return repr(message)
