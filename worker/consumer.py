"""Micro-batching: the tagging worker's consumer loop on the Celery broker.

Why not a stock Celery task: a task handles one message, and celery-batches 0.11 acks a whole
batch when its function raises, loses its flush timer after a broker reconnect and is capped by
the prefetch settings (README, "Delivery guarantees"). This consumer uses kombu — the library
Celery itself uses — directly, on the same broker, queues and message format:

* the main thread receives messages, parks malformed ones, starts each image's fetch + decode
  in a thread pool the moment it arrives, closes a batch at ``max_batch`` images or
  ``max_wait_ms`` after its first, and acknowledges the messages of committed batches;
* one inference thread runs the forward pass and the transaction for one batch while the main
  thread gathers (and the pool decodes) the next.

A message is acknowledged only after its batch's transaction has committed; until then it is
in the broker's unacknowledged set, and a sweep every ``restore_interval_s`` returns the ones
older than ``visibility_timeout_s`` (a killed worker's) to their queue.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from kombu import Connection, Queue

from shared.broker import AtomicRedisTransport, park, transport_class, transport_options
from shared.constants import TAGGING_QUEUES
from shared.messages import BadMessage, parse_tag_request
from worker.service import Tagger

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # longest wait in the broker with nothing buffered (acks wait at most this)
FAILED_BATCH_BACKOFF_S = (0.5, 30.0)  # first and longest pause after a batch that did not commit
BUSY_POLL_S = 0.005  # how often an overdue batch looks for an idle inference thread
BATCHES_IN_FLIGHT = 3  # gathering + waiting + in the forward pass: the prefetch window, in batches


@dataclass
class Batch:
    messages: list = field(default_factory=list)
    futures: list[Future] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    first_at: float = 0.0


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

    # --- main thread ------------------------------------------------------------------------
    def on_message(self, message) -> None:
        queue_name = (message.delivery_info or {}).get("routing_key", "?")
        try:
            image_id = parse_message(message)
        except BadMessage as exc:
            park(self.tagger.runtime.events, queue=queue_name, raw=_raw(message), reason=str(exc))
            message.ack()
            return
        if not self.batch.messages:
            self.batch.first_at = time.monotonic()
        self.batch.messages.append(message)
        self.batch.queues.append(queue_name)
        self.batch.futures.append(self.tagger.submit(image_id))

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
        while True:  # the inference thread is busy: keep acknowledging while we wait for it
            self._ack_done()
            try:
                self.ready.put(batch, timeout=0.02)
                return
            except queue.Full:
                continue

    def _ack_done(self) -> None:
        while True:
            try:
                batch, error = self.done.get_nowait()
            except queue.Empty:
                return
            for message in batch.messages:
                try:
                    message.ack() if error is None else message.requeue()
                except Exception:  # the broker connection went away: redelivery takes over
                    log.exception("could not %s a message", "ack" if error is None else "requeue")

    def _maybe_restore(self, channel) -> None:
        now = time.monotonic()
        if now < self._next_restore:
            return
        self._next_restore = now + self.settings.restore_interval_s
        qos = getattr(channel, "qos", None)
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

    def _connection(self) -> Connection:
        redis_broker = self.settings.broker_scheme in ("redis", "rediss")
        transport = AtomicRedisTransport if redis_broker else transport_class(self.settings)
        options = transport_options(self.settings)
        if self.settings.broker_scheme == "filesystem":
            options["polling_interval"] = 0.01
        return Connection(self.settings.broker_url, transport=transport, transport_options=options)

    def _consume(self) -> None:
        prefetch = self.settings.max_batch * BATCHES_IN_FLIGHT
        with self._connection() as conn:
            conn.ensure_connection(max_retries=None, interval_start=1, interval_step=1, interval_max=5,
                                   callback=lambda: self.stop_event.is_set() and _raise_stop())
            consumer = conn.Consumer([Queue(q) for q in self.queues], on_message=self.on_message,
                                     accept=["json"], prefetch_count=prefetch)
            with consumer:
                log.info("consuming %s (max_batch=%d, max_wait_ms=%d)", ",".join(self.queues),
                         self.settings.max_batch, self.settings.max_wait_ms)
                while not self.stop_event.is_set():
                    self._ack_done()
                    self._maybe_restore(consumer.channel)
                    try:
                        conn.drain_events(timeout=self._wait_s())
                    except socket.timeout:
                        pass
                    if self._batch_due():
                        self._dispatch()
                    self._maybe_idle_check()
                # Graceful stop: what is already gathered (and decoded) is finished and acked.
                if self.batch.messages:
                    self._dispatch()
                self.ready.put(None)
                self._inference.join()
                self._ack_done()

    def run(self) -> None:
        """Consume until ``stop()``; survives broker restarts and bad messages."""
        self._inference = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        self._inference.start()
        while not self.stop_event.is_set():
            try:
                self._consume()
                return
            except _Stop:
                break
            except Exception as exc:
                # Broker gone or a transport error: unacked messages come back by the sweep.
                log.error("consumer error (%s: %s); reconnecting", type(exc).__name__, exc)
                self.batch = Batch()
                time.sleep(1)
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
                t0 = time.perf_counter()
                self.tagger.run_batch([f.result() for f in batch.futures])
                log.info("batch of %d (%d from %s) tagged with %s in %.0f ms", len(batch.messages),
                         batch.queues.count(self.queues[0]), self.queues[0], self.tagger.model.version,
                         (time.perf_counter() - t0) * 1000)
                self.done.put((batch, None))
                backoff = 0.0
            except Exception as exc:
                log.exception("batch of %d not committed; its messages go back to the queue", len(batch.messages))
                self.done.put((batch, exc))
                backoff = min(max(backoff * 2, FAILED_BATCH_BACKOFF_S[0]), FAILED_BATCH_BACKOFF_S[1])
                time.sleep(backoff)


class _Stop(Exception):
    pass


def _raise_stop():
    raise _Stop()


def _raw(message) -> str:
    try:
        return json.dumps({"headers": message.headers, "properties": message.properties,
                           "body": message.body.decode("utf-8", "replace") if isinstance(message.body, bytes) else message.body})
    except Exception:
        return repr(message)
