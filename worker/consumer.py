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
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kombu import Queue
from kombu.transport.virtual import QoS as VirtualQoS

from shared.broker import (
    RECONNECT_INTERVAL_S,
    AtomicRedisTransport,
    QuickRetryConnection,
    connection_url,
    park,
    transport_class,
    transport_options,
)
from shared.constants import ENQUEUED_AT_HEADER, TAGGING_QUEUES
from shared.messages import BadMessage, parse_tag_request
from worker import metrics
from worker.service import Tagger

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # longest wait in the broker with nothing in hand (acks wait at most this)
# After a pop that found nothing, the wait in Redis: an upload wakes the pop at once, other queues
# are looked at this often (or at once, where the consumer has room for one it skipped again).
REDIS_WAIT_S = 0.5
BUSY_POLL_S = 0.02  # longest wait in the broker while a batch runs: its acknowledgement waits this
FAILED_BATCH_BACKOFF_S = (0.5, 30.0)  # first and longest pause after a batch that did not commit
BATCHES_IN_FLIGHT = 3  # per queue: in the forward pass + decoding for the next + gathering
SETTLE_CHUNK = 1000  # messages acknowledged per pipeline
WAIT_DECODED_S = 1.0  # the inference thread waits for a batch's decodes; each one wakes it (a safety net)
POP_REPLY_TIMEOUT_S = 5.0  # an atomic pop answers in milliseconds; no reply this long = a dead socket


@dataclass
class Held:
    """One message in hand: its image's fetch + decode runs in the pool from the moment it arrives."""

    message: Any
    queue: str
    future: Future
    arrived_at: float  # monotonic: for the queue wait, max_wait_ms and the starvation guard


@dataclass
class Batch:
    items: list[Held] = field(default_factory=list)
    staged: Future | None = None  # GPU: its input's copy to the device, started ahead (Tagger.stage_async)

    @property
    def messages(self) -> list:
        return [h.message for h in self.items]


class Pending:
    """Messages taken from the broker and not yet in a forward pass, one FIFO lane per queue.

    The inference thread takes a batch when it is free (``take``), so nothing closed early waits
    in a hand-off: a batch is whatever is best to run at that moment. ``take`` fills it from the
    lanes in priority order (``tagging`` before ``backfill``), so an upload rides in the very next
    forward pass, ahead of any backfill the worker holds. A batch that carries a message of the
    first lane (an upload) is topped up from the other lanes only to ``fill`` images, and only with
    images already decoded: on a CPU every image adds to the forward pass that the upload waits
    for, and no upload waits for a backfill decode. A message held for
    ``starve_s`` goes first whatever its lane, so a flood of uploads cannot keep backfill in hand
    until the visibility timeout hands it to another worker.
    """

    def __init__(self, queues: tuple[str, ...], *, starve_s: float, fill: int | None = None):
        self.lanes: dict[str, deque[Held]] = {q: deque() for q in queues}
        self.starve_s = starve_s
        self.fill = fill  # None: batches carrying uploads are filled to max_batch like any other

    def __len__(self) -> int:
        return sum(len(lane) for lane in self.lanes.values())

    def add(self, held: Held) -> None:
        self.lanes.setdefault(held.queue, deque()).append(held)

    def oldest(self) -> float | None:
        fronts = [lane[0].arrived_at for lane in self.lanes.values() if lane]
        return min(fronts) if fronts else None

    def due_at(self, *, max_batch: int, max_wait_s: float) -> float | None:
        """When a batch should start (monotonic; 0 = now), or None with nothing pending."""
        oldest = self.oldest()
        if oldest is None:
            return None
        return 0.0 if len(self) >= max_batch else oldest + max_wait_s

    def take(self, max_batch: int, now: float) -> Batch:
        batch = Batch()
        for lane in self.lanes.values():  # starving messages first, whatever their queue
            while lane and len(batch.items) < max_batch and now - lane[0].arrived_at >= self.starve_s:
                batch.items.append(lane.popleft())
        first = next(iter(self.lanes), None)
        for name, lane in self.lanes.items():  # then by queue priority, oldest first within a queue
            if name != first and self.fill is not None and any(h.queue == first for h in batch.items):
                # An upload's batch: topped up only to fill, and only with images already decoded,
                # so that no backfill decode delays the upload; the rest keep their place.
                room = min(max_batch, self.fill) - len(batch.items)
                ready = [h for h in lane if h.future.done()][:max(0, room)]
                for held in ready:
                    lane.remove(held)
                batch.items.extend(ready)
                continue
            while lane and len(batch.items) < max_batch:
                batch.items.append(lane.popleft())
        return batch

    def outranks(self, batch: Batch) -> bool:
        """Whether something pending should run before part of ``batch`` (taken ahead of time):
        a message of a higher-priority queue than the lowest in the batch, arrived since."""
        order = list(self.lanes)
        lowest = max((order.index(h.queue) for h in batch.items if h.queue in self.lanes), default=0)
        return any(self.lanes[q] for q in order[:lowest])

    def put_back(self, batch: Batch) -> None:
        """Return a batch taken ahead of time to the front of its lanes, in its order."""
        for held in reversed(batch.items):
            self.lanes.setdefault(held.queue, deque()).appendleft(held)

    def drain(self) -> list[Held]:
        items = [h for lane in self.lanes.values() for h in lane]
        for lane in self.lanes.values():
            lane.clear()
        return items


class BrokerLost(ConnectionError):
    """An acknowledgement could not reach the broker: reconnect, and settle it on the new connection."""


class QueueRefused(ValueError):
    """A remote control command for a queue this worker cannot pause or resume; says why in one line."""


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
        self.max_wait_s = self.settings.max_wait_ms / 1000
        # Per queue, at most this many messages in hand (pending, in the forward pass or not yet
        # acknowledged): enough for the forward pass, the next batch decoding, and one gathering.
        self.window = self.settings.max_batch * BATCHES_IN_FLIGHT
        self.pending = Pending(queues, starve_s=self.settings.visibility_timeout_s / 2,
                               fill=tagger.upload_fill)
        self._cond = threading.Condition()  # guards pending and _closing; wakes the inference thread
        self._closing = False
        self._ahead: Batch | None = None  # GPU: the next batch, taken and staged during a forward pass
        self._held_by_queue: dict[str, int] = dict.fromkeys(queues, 0)  # consumer thread only
        self.paused: frozenset[str] = frozenset()  # queues an operator cancelled (celery control cancel_consumer)
        self.done: queue.Queue[tuple[Batch, Exception | None]] = queue.Queue()
        self._next_restore = 0.0
        self._channel = None  # the channel of the current connection
        self._owed: list[tuple[Held, bool]] = []  # (message, committed) not yet settled with the broker
        # Progress, read by the liveness check (worker/health.py); monotonic seconds.
        self.started = threading.Event()  # set once the first connection consumes
        self.last_tick = time.monotonic()  # the consume loop ran
        self.last_progress = time.monotonic()  # a message was taken or a batch committed
        self.inference_started_at: float | None = None  # a batch is in the forward pass since
        self.decoding_since: float | None = None  # a batch taken waits for its images' decodes since

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
        upload = queue_name == self.queues[0] and len(self.queues) > 1  # the first lane: uploads
        held = Held(message, queue_name, self.tagger.submit(image_id, upload=upload), time.monotonic())
        held.future.add_done_callback(self._decoded)
        self._held_by_queue[queue_name] = self._held_by_queue.get(queue_name, 0) + 1
        with self._cond:
            self.pending.add(held)
            self._cond.notify()
        self._progress()

    def _decoded(self, _future: Future) -> None:
        """(A pool thread.) An image is decoded: the inference thread may wait for it (``_wait_decoded``)."""
        with self._cond:
            self._cond.notify_all()

    def held(self) -> int:
        """Messages this worker holds and has not sent to the forward pass."""
        return len(self.pending)

    def _progress(self) -> None:
        self.last_progress = time.monotonic()
        metrics.LAST_PROGRESS.set_to_current_time()

    def pause(self, queue: str) -> None:
        """Stop taking from ``queue`` (remote control); what this worker holds is still tagged.
        ``QueueRefused`` (its reason is the remote control's reply) when it cannot."""
        self._check_mine(queue)
        if self.settings.broker_scheme not in ("redis", "rediss"):
            raise QueueRefused(f"cannot stop taking from {queue}: pausing a queue needs the Redis broker")
        self.paused = self.paused | {queue}
        log.info("no longer taking messages from %s (remote control)", queue)

    def resume(self, queue: str) -> None:
        self._check_mine(queue)
        if queue in self.paused:
            self.paused = self.paused - {queue}
            log.info("taking messages from %s again (remote control)", queue)

    def _check_mine(self, queue: str) -> None:
        if queue not in self.queues:
            raise QueueRefused(f"a tagging worker takes only the queues it was started with "
                               f"({', '.join(self.queues)}), not {queue!r}; start a worker for it: "
                               f"stilltag worker --queues {queue}")

    def consuming(self) -> tuple[str, ...]:
        """The queues this worker takes from now."""
        paused = self.paused
        return tuple(q for q in self.queues if q not in paused)

    def _full_queues(self) -> frozenset[str]:
        """Queues this worker holds a full window of: the next pop skips them, so a backlog of
        backfill never keeps an upload in Redis."""
        return frozenset(q for q, n in self._held_by_queue.items() if n >= self.window)

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
            chunk = self._owed[:SETTLE_CHUNK]
            try:
                _settle(self._channel, [(held.message, committed) for held, committed in chunk])
            except Exception as exc:
                raise BrokerLost(f"could not acknowledge or return {len(chunk)} message(s): {exc}") from exc
            del self._owed[:len(chunk)]
            for held, _committed in chunk:
                self._held_by_queue[held.queue] = max(0, self._held_by_queue.get(held.queue, 0) - 1)

    def _maybe_restore(self, channel) -> None:
        now = time.monotonic()
        if now < self._next_restore:
            return
        self._next_restore = now + self.settings.restore_interval_s
        sweep = getattr(getattr(channel, "qos", None), "sweep", None)  # only Redis has a visibility timeout
        if sweep is not None:  # return expired unacked messages to their queues
            try:
                sweep(num=channel.unacked_restore_limit)
            except Exception:
                log.exception("could not return expired unacknowledged messages")

    def _wait_s(self) -> float:
        # Acknowledgements wait for this loop: look often while a batch is in the forward pass.
        return BUSY_POLL_S if self.inference_started_at is not None or self.pending.oldest() else IDLE_POLL_S

    def _connection(self) -> QuickRetryConnection:
        redis_broker = self.settings.broker_scheme in ("redis", "rediss")
        transport = AtomicRedisTransport if redis_broker else transport_class(self.settings)
        options = transport_options(self.settings)
        if self.settings.broker_scheme == "filesystem":
            options["polling_interval"] = 0.01
        return QuickRetryConnection(connection_url(self.settings), transport=transport, transport_options=options)

    def _tick(self) -> None:
        self.last_tick = time.monotonic()

    def _consume(self) -> None:
        with self._connection() as conn:
            conn.ensure_connection(max_retries=None, callback=self._waiting_for_broker)
            # kombu's window covers every queue; the per-queue window is kept by ``_full_queues``.
            consumer = conn.Consumer([Queue(q) for q in self.queues], on_message=self.on_message,
                                     accept=["json"], prefetch_count=self.window * len(self.queues))
            with consumer:
                channel = self._channel = consumer.channel
                self._settle()  # what an earlier connection could not acknowledge
                log.info("consuming %s (max_batch=%d, max_wait_ms=%d)", ",".join(self.queues),
                         self.settings.max_batch, self.settings.max_wait_ms)
                self.started.set()
                while not self.stop_event.is_set():
                    self._tick()
                    self._ack_done()
                    self._maybe_restore(channel)
                    if getattr(channel, "pop_overdue", None) and channel.pop_overdue(POP_REPLY_TIMEOUT_S):
                        raise BrokerLost(f"no reply from the broker for {POP_REPLY_TIMEOUT_S:.0f} s")
                    wait_s = self._wait_s()
                    if hasattr(channel, "skip_queues"):
                        self._steer(channel, idle=wait_s == IDLE_POLL_S)
                    try:
                        conn.drain_events(timeout=wait_s)
                    except TimeoutError:
                        pass
                self._shutdown()

    def _steer(self, channel, *, idle: bool) -> None:
        """The next pop's queues and its wait in Redis (``AtomicRedisChannel``).

        After a pop that found nothing, the channel waits in Redis for an upload instead of popping
        again every 10 ms (a hundred pops a second while a batch runs, each a script over every
        queue key). A queue whose window was full is left out of the pop and the wait; once an
        acknowledgement (or ``resume``) makes room for it, the wait in flight is cut short, so that
        the window fills again at once, not ``REDIS_WAIT_S`` later. With work in hand it waits
        only where the wait can be cut (``can_cut_wait``); otherwise it polls, as before.
        """
        skip = self._full_queues() | self.paused
        reopened = channel.skip_queues - skip
        channel.skip_queues = skip
        channel.idle_wait_s = REDIS_WAIT_S if idle or channel.can_cut_wait else 0.0
        if reopened:
            channel.cut_wait()

    def _waiting_for_broker(self) -> None:
        """Between attempts to reach the broker: the inference thread goes on with what this
        worker holds (the database may be up), and what finishes is kept to acknowledge later."""
        self._tick()  # waiting for the broker is not a stuck loop: /readyz reports the broker
        self._collect_done()  # acknowledged on the next connection
        if self.stop_event.is_set():
            raise _Stop()

    def _collect_done(self) -> None:
        """What finished batches owe the broker: an ack (committed) or a return (not)."""
        while True:
            try:
                batch, error = self.done.get_nowait()
            except queue.Empty:
                return
            self._owed.extend((held, error is None) for held in batch.items)

    def _close_inference(self) -> list[Held]:
        """Stop the inference thread after the batch in its forward pass; what it has not taken
        comes back, for the queue."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._inference.join()
        # Drained after the join: a batch that was waiting for its decodes went back to pending.
        left = self.pending.drain()
        if self._ahead is not None:
            left = [*self._ahead.items, *left]
            self._ahead = None
        return left

    def _shutdown(self) -> None:
        """Graceful stop: the batch in the forward pass is finished and acknowledged; every other
        message this worker holds goes back to its queue now, for another worker."""
        left = self._close_inference()
        for held in left:
            held.future.cancel()
        self._owed.extend((held, False) for held in left)
        self._ack_done()
        log.info("stopped: the batch in the forward pass was finished; %d held message(s) returned to the queue",
                 len(left))

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
                # Broker gone or a transport error. What this worker holds stays pending and is
                # acknowledged on the next connection; a killed worker's messages come back by the sweep.
                log.error("consumer error (%s: %s); reconnecting", type(exc).__name__, exc)
                metrics.RECONNECTS.inc()
                self._channel = None
                self._tick()
                self.stop_event.wait(pause)
        if self._inference.is_alive():
            self._close_inference()

    def stop(self) -> None:
        self.stop_event.set()

    # --- inference thread -------------------------------------------------------------------
    def _next_batch(self) -> Batch | None:
        """The next batch to run, as soon as one is due; an empty one when it is time to look for
        a new champion; None once the consumer closes.

        A batch is due at ``max_batch`` images, or ``max_wait_ms`` after its oldest. While the
        forward pass runs, images keep arriving and decoding here, so the next batch is full under
        load instead of closed small early. It is returned once all its images are decoded; an
        upload arriving before that goes first (``_wait_decoded``).
        """
        next_check = time.monotonic() + self.settings.model_poll_s
        with self._cond:
            if self._ahead is not None and not self._closing:  # closing: _close_inference returns it
                ahead, self._ahead = self._ahead, None
                if not self.pending.outranks(ahead):
                    return ahead
                self.pending.put_back(ahead)  # an upload came meanwhile: it goes first, the copy is wasted
            while not self._closing:
                now = time.monotonic()
                due = self.pending.due_at(max_batch=self.settings.max_batch, max_wait_s=self.max_wait_s)
                if due is not None and due <= now:
                    batch = self.pending.take(self.settings.max_batch, now)
                    # Uploads left over (the batch is full of older ones and starving backfill) would
                    # make the same batch again, and so would any upload arriving after them: such a
                    # batch yields to no upload, it waits for its decodes.
                    if self._wait_decoded(batch, yield_to_uploads=not self.pending.outranks(batch)):
                        return batch
                    continue  # back in pending: an upload came, it goes first
                if due is None and now >= next_check:
                    return Batch()  # idle: follow the champion, so the first image after a promotion does not wait
                self._cond.wait(max(0.0, min(next_check if due is None else due, next_check) - now))
        return None

    def _wait_decoded(self, batch: Batch, *, yield_to_uploads: bool = True) -> bool:
        """(Holding ``_cond``.) Until every image of ``batch`` is decoded: True. False, with the batch
        back in pending, when an upload that outranks it arrives meanwhile (``yield_to_uploads``) or
        the consumer closes. ``decoding_since`` says how long it has waited (the liveness check).

        Where decoding is the bottleneck (a GPU, or a CPU whose forward pass is fast) a batch of
        backfill is taken long before its last image is decoded; an upload that arrived meanwhile
        would wait for all of those decodes and that batch's forward pass. Decoded in a pool of its
        own (Tagger.submit), it is ready long before, and rides in the next batch at once instead.
        """
        self.decoding_since = time.monotonic()
        try:
            while not all(held.future.done() for held in batch.items):
                if self._closing or (yield_to_uploads and self.pending.outranks(batch)):
                    self.pending.put_back(batch)
                    return False
                self._cond.wait(WAIT_DECODED_S)
            return True
        finally:
            self.decoding_since = None

    def _look_ahead(self) -> None:
        """On a GPU, with a full batch already pending: take it now and start its copy to the device
        (a side stream, Tagger.stage_async), so that it overlaps this batch's forward pass. If an
        upload arrives before it runs, it goes back (``_next_batch``): uploads stay first."""
        if self.tagger.stager is None:
            return
        with self._cond:
            if self._ahead is None and len(self.pending) >= self.settings.max_batch and not self._closing:
                ahead = self.pending.take(self.settings.max_batch, time.monotonic())
                ahead.staged = self.tagger.stage_async([h.future for h in ahead.items])
                self._ahead = ahead

    def _inference_loop(self) -> None:
        backoff = 0.0
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch.items:
                self.tagger.maybe_switch()
                continue
            try:
                self.tagger.maybe_switch()
                self._look_ahead()
                started = self.inference_started_at = time.monotonic()
                for held in batch.items:
                    metrics.QUEUE_WAIT.observe(started - held.arrived_at)
                t0 = time.perf_counter()
                staged = batch.staged.result() if batch.staged is not None else None
                self.tagger.run_batch([held.future.result() for held in batch.items], staged)
                log.info("batch of %d (%d from %s) tagged with %s in %.0f ms", len(batch.items),
                         sum(h.queue == self.queues[0] for h in batch.items), self.queues[0],
                         self.tagger.loaded.version, (time.perf_counter() - t0) * 1000)
                _observe_enqueue_to_commit(batch.messages)
                self.done.put((batch, None))
                self._progress()
                backoff = 0.0
            except Exception as exc:
                log.exception("batch of %d not committed; its messages go back to the queue", len(batch.items))
                metrics.BATCH_FAILURES.inc()
                self.done.put((batch, exc))
                backoff = min(max(backoff * 2, FAILED_BATCH_BACKOFF_S[0]), FAILED_BATCH_BACKOFF_S[1])
                time.sleep(backoff)
            finally:
                self.inference_started_at = None


class _Stop(Exception):
    pass


def _settle(channel, settled: list[tuple[Any, bool]]) -> None:
    """Acknowledge (committed) or return (not) each ``(message, committed)`` on ``channel``.

    On Redis a message delivered on an earlier connection is settled by its delivery tag (Redis
    keeps it in ``unacked`` until then); one of this connection is also settled with kombu, which
    frees its place in the prefetch window. The acknowledgements of a batch go in one pipeline
    (one round trip, not one per image). A settle that fails part way is repeated on the next
    connection: removing a record twice does nothing, and returning a message twice at worst
    delivers it once more (tagging is idempotent); neither loses it.

    A return is one transaction (``restore_by_tag``: the record leaves ``unacked`` and the message
    goes back to its queue) and nothing after it touches Redis. The message keeps its delivery
    tag, and another worker may pop it again at once and record it under that same tag: a Redis
    ack sent after the return, as kombu's ``Message.ack`` would, deletes that worker's record, and
    if its batch then fails too the message is gone (the fault drill lost an upload that way
    while PostgreSQL was down).
    """
    qos: Any = getattr(channel, "qos", None)
    if not hasattr(qos, "restore_by_tag"):  # the embedded broker has one connection and no unacked set
        for message, committed in settled:
            if message.channel is channel:
                message.ack() if committed else message.requeue()
        return
    acked = [message.delivery_tag for message, committed in settled if committed]
    if acked:
        with channel.conn_or_acquire() as client:
            client.pipeline().zrem(channel.unacked_index_key, *acked).hdel(channel.unacked_key, *acked).execute()
    for message, committed in settled:
        if not committed:
            qos.restore_by_tag(message.delivery_tag)  # to the consuming end: served next
        if message.channel is channel:
            VirtualQoS.ack(qos, message.delivery_tag)  # kombu's bookkeeping only: the prefetch window


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
