"""The broker side shared by every process: transport options and a guarded Redis transport.

The Redis transport is kombu's, with one change: each raw message is checked before kombu
builds a Message from it. A payload kombu cannot handle (not JSON, no delivery tag, no
task id, ...) is parked on the ``stilltag:parked`` list with the reason instead of being lost
or crashing the consumer.
"""

from __future__ import annotations

import json
import logging
import time
from time import monotonic

from kombu import Connection
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from prometheus_client import Counter
from redis.exceptions import ResponseError

from shared.config import Settings
from shared.constants import PARKED_KEY, PARKED_MAX_LEN, TASK_QUEUES
from shared.messages import check_envelope

log = logging.getLogger(__name__)

GUARDED_REDIS_TRANSPORT = "shared.broker:GuardedRedisTransport"
UNACKED_MUTEX_EXPIRE_S = 10  # longest a sweep's lock outlives a killed holder
BROKER_SOCKET_TIMEOUT_S = 10  # a Redis command (not a blocking pop) never takes this long
RECONNECT_INTERVAL_S = (0.5, 2.0)  # first and longest pause between attempts to reach a lost broker
BROKER_HEALTH_CHECK_S = 10  # redis-py PINGs a connection idle this long before using it

PARKED = Counter("stilltag_parked", "Malformed messages parked on stilltag:parked, by reason.", ["reason"])


def parked_reason(reason: str) -> str:
    """The kind of problem, as a label with few values (the details stay in the parked record)."""
    text = reason.lower()
    for prefix, label in (("not json", "not_json"), ("broken envelope", "envelope"), ("envelope is", "envelope"),
                          ("body", "body"), ("content-type", "content_type"), ("task ", "wrong_task")):
        if text.startswith(prefix):
            return label
    return "arguments"


def park(client, *, queue: str, raw: bytes | str, reason: str) -> None:
    """Keep a message that cannot be processed, with the reason, newest first."""
    record = json.dumps({"queue": queue, "reason": reason, "raw": bytes_to_str(raw), "parked_at": time.time()})
    log.error("parked a message from %r: %s", queue, reason)
    PARKED.labels(parked_reason(reason)).inc()
    if client is None:
        return
    try:
        client.pipeline().lpush(PARKED_KEY, record).ltrim(PARKED_KEY, 0, PARKED_MAX_LEN - 1).execute()
    except Exception:  # parking is best effort; the error log above already has it
        log.exception("could not write the parked message to Redis")


class QuickRetryConnection(Connection):
    """kombu's Connection, retrying a lost broker every 0.5 s, backing off to 2 s at most.

    Celery's worker reconnects through ``ensure_connection`` with kombu's defaults (2 s, growing
    by 2 s up to 30 s), so after a long Redis outage its remote control, heartbeats and the
    training worker's task consumer came back up to 30 s after Redis did.
    """

    def ensure_connection(self, *args, **kwargs):
        kwargs.setdefault("interval_start", RECONNECT_INTERVAL_S[0])
        kwargs.setdefault("interval_step", RECONNECT_INTERVAL_S[0])
        kwargs.setdefault("interval_max", RECONNECT_INTERVAL_S[1])
        return super().ensure_connection(*args, **kwargs)


class GuardedRedisChannel(kombu_redis.Channel):
    def _deliver_or_park(self, dest: str, item, recorded_tag: str = "") -> bool:
        """Hand a checked envelope to kombu, or park it (and forget its unacked record, if any).

        Only task queues are checked: replies to ``celery inspect`` (``*.reply.celery.pidbox``)
        are no task messages and go to kombu as they are.
        """
        if dest not in TASK_QUEUES:
            self.connection._deliver(loads(bytes_to_str(item)), dest)
            return True
        envelope, reason = check_envelope(item)
        if envelope is None:
            with self.conn_or_acquire() as client:
                park(client, queue=dest, raw=item, reason=reason or "broken envelope")
                if recorded_tag:  # recorded as unacked: forget it, or the sweep would bring it back
                    client.pipeline().zrem(self.unacked_index_key, recorded_tag).hdel(
                        self.unacked_key, recorded_tag).execute()
            return True
        self.connection._deliver(envelope, dest)
        return True

    def _brpop_read(self, **options):
        # kombu 5.7's Channel._brpop_read, with check_envelope() between the read and _deliver():
        # kombu itself would raise on bad JSON or lose a message missing delivery_tag/delivery_info.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            return self._deliver_or_park(dest, item)
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class GuardedRedisTransport(kombu_redis.Transport):
    Channel = GuardedRedisChannel


# Pop the first message of the first non-empty queue key AND record it as unacknowledged, in one
# atomic step. kombu's BRPOP followed by a separate HSET loses the message in between when the
# worker is killed there (seen in the kill test: about one message in a few hundred kills).
# A payload without a delivery tag is returned unrecorded and parked by the caller.
_POP_AND_RECORD = """
local unacked, index, now = ARGV[1], ARGV[2], ARGV[3]
for i = 1, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    local tag = ''
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      local t = msg['properties']['delivery_tag']
      if type(t) == 'string' then tag = t end
    end
    if tag ~= '' then
      redis.call('HSET', unacked, tag, '[' .. item .. ',"",' .. cjson.encode(ARGV[3 + i]) .. ']')
      redis.call('ZADD', index, now, tag)
    end
    return {KEYS[i], item, tag}
  end
end
return false
"""

# With no blocking pop, an empty poll waits this long before the next (latency it adds, at most).
ATOMIC_POLL_INTERVAL_S = 0.01


class _RecordedByPopQoS(kombu_redis.QoS):
    """kombu's Redis QoS, minus its second write of a record the pop script already made.

    kombu records every delivered message in ``unacked`` (a pipeline to Redis) after the pop; the
    atomic pop has recorded it already, so only kombu's own bookkeeping (the prefetch window) is
    kept: one round trip less per message on the tagging worker's consumer thread.
    """

    def append(self, message, delivery_tag):
        if delivery_tag and delivery_tag == self.channel._recorded_tag:
            VirtualQoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def restore_visible(self, start=0, num=10, interval=10):
        """Nothing: the consumer sweeps itself, every ``restore_interval_s`` (``sweep``).

        kombu's poller calls this after every poll that found nothing, and with the throttle of 1
        that ``transport_options`` sets for the Celery workers, a tagging worker waiting in Redis
        ran a whole sweep (a lock, a ZRANGE, an unlock) after each poll of its loop: up to fifty
        times a second.
        """

    def sweep(self, *, num: int) -> None:
        """Return up to ``num`` messages unacknowledged past the visibility timeout to their queues."""
        super().restore_visible(num=num, interval=1)


class AtomicRedisChannel(GuardedRedisChannel):
    """For the tagging worker's synchronous consumer: a pop that cannot lose a message.

    Redis cannot block inside a script, so the pop polls (``polling_interval``). With
    ``idle_wait_s`` set, after a pop that found nothing the channel waits in Redis for the first
    queue it may pop (uploads) with ``BLMOVE key key RIGHT RIGHT``, which blocks until the list is
    not empty and leaves it exactly as it was (the oldest message comes off the consuming end and
    goes straight back). An upload wakes it at once and the pop follows in the same read; the
    other queues are looked at again after ``idle_wait_s``, or at once after ``cut_wait`` (the
    consumer has room again for a queue it skipped). A waiting worker then sends a few commands a
    second instead of a hundred. Meant for ``drain_events`` loops, not for Celery's event loop (the
    training worker uses ``GuardedRedisChannel``).
    """

    # The consumer finishes and acknowledges what it holds itself, also across a reconnect
    # (worker/consumer.py): returning it all to the queue when the connection closes would have
    # every in-flight image tagged twice.
    do_restore = False
    QoS = _RecordedByPopQoS
    _recorded_tag = ""  # the delivery tag the pop being delivered recorded as unacknowledged
    # Queues the next pop leaves alone: the consumer holds a full window of them. ``tagging``
    # stays poppable while the worker holds all the ``backfill`` it may.
    skip_queues: frozenset[str] = frozenset()
    idle_wait_s = 0.0  # > 0: after an empty pop, wait this long in Redis for the first queue
    _waiting: list | None = None  # the pop's (key, queue) pairs while a wait is in flight
    _wait_sent_s = 0.0  # how long the wait in flight asked Redis to block
    _wait_next = False  # the last pop found nothing: the next command may be a wait
    _can_wait = True  # False on a server without BLMOVE (Redis < 6.2): the pop polls only
    # The socket the waits are sent on and its CLIENT ID, which CLIENT UNBLOCK (cut_wait) names.
    _wait_client: tuple[object, int] | None = None
    can_cut_wait = True  # False where the server refuses CLIENT ID or CLIENT UNBLOCK (an ACL)

    def pop_overdue(self, timeout_s: float) -> bool:
        """True when a pop was sent more than ``timeout_s`` ago (plus the wait it asked for) and
        has no reply: the socket is half-open (a cut connection that no error announced)."""
        allowed = timeout_s + (self._wait_sent_s if self._waiting is not None else 0.0)
        return bool(self._in_poll) and self._brpop_sent_at is not None and monotonic() - self._brpop_sent_at > allowed

    def _brpop_start(self, timeout=None):
        queues = [q for q in self._queue_cycle.consume(len(self.active_queues)) if q not in self.skip_queues]
        if not queues:
            return
        pairs = [(self._q_for_pri(q, pri), q) for pri in self.priority_steps for q in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self.idle_wait_s > 0 and self._wait_next and self._can_wait:
            self._name_wait_client()
            self._waiting, self._wait_sent_s = pairs, self.idle_wait_s
            key = pairs[0][0]
            self.client.connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", self._wait_sent_s)
        else:
            self._send_pop(pairs)

    def _name_wait_client(self) -> None:
        """The CLIENT ID of the connection the wait goes out on, asked once per socket (nothing is
        in flight on it here): ``cut_wait`` unblocks that client from another connection."""
        conn = self.client.connection
        if not self.can_cut_wait or (self._wait_client is not None and self._wait_client[0] is conn._sock):
            return
        conn.send_command("CLIENT", "ID")
        try:
            self._wait_client = (conn._sock, int(conn.read_response()))
        except ResponseError as exc:
            self._refuse_cut(exc)

    def _refuse_cut(self, exc: Exception) -> None:
        log.warning("this Redis refuses CLIENT ID or CLIENT UNBLOCK (%s): a tagging worker holding messages polls "
                    "for uploads instead of waiting", exc)
        self.can_cut_wait = False
        self._wait_client = None

    def cut_wait(self) -> None:
        """End the wait in flight now (CLIENT UNBLOCK from another connection): it ends as a wait
        that timed out, and the next pop looks at every queue the consumer may pop again."""
        if self._waiting is None or self._wait_client is None:
            return
        try:
            with self.conn_or_acquire() as client:
                client.client_unblock(self._wait_client[1])
        except ResponseError as exc:
            self._refuse_cut(exc)

    def _send_pop(self, pairs) -> None:
        self.client.connection.send_command(
            "EVAL", _POP_AND_RECORD, len(pairs), *[k for k, _ in pairs],
            self.unacked_key, self.unacked_index_key, time.time(), *[q for _, q in pairs],
        )

    def _brpop_read(self, **options):
        try:
            try:
                if self._waiting is not None:
                    pairs, self._waiting = self._waiting, None
                    self._wait_next = False  # whatever the wait's end, the next command is a pop
                    if self.client.parse_response(self.client.connection, "BLMOVE", **options) is None:
                        raise kombu_redis.Empty()  # nothing came for the first queue: pop them all next
                    pairs = [(key, q) for key, q in pairs if q not in self.skip_queues]  # paused meanwhile?
                    if not pairs:
                        raise kombu_redis.Empty()
                    self._send_pop(pairs)  # an upload came: pop it now, in this read
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                log.warning("this Redis has no BLMOVE (Redis 6.2 or later): an idle tagging worker polls instead")
                self._can_wait = False
                raise kombu_redis.Empty() from None
            if not reply:
                self._wait_next = True
                raise kombu_redis.Empty()
            dest, item, tag = (bytes_to_str(x) if x is not None else "" for x in reply)
            self._recorded_tag = tag
            return self._deliver_or_park(dest.rsplit(self.sep, 1)[0], item, recorded_tag=tag)
        finally:
            self._recorded_tag = ""
            self._in_poll = None
            self._flush_brpop_reauth()


class AtomicRedisTransport(kombu_redis.Transport):
    Channel = AtomicRedisChannel
    polling_interval = ATOMIC_POLL_INTERVAL_S  # type: ignore[assignment]  # kombu declares it None


def transport_options(settings: Settings) -> dict:
    """Broker transport options, set on purpose (README, "Delivery guarantees")."""
    if settings.broker_is_redis:
        return {
            # A message not acknowledged within this time is handed out again. It must exceed the
            # longest wait + batch time of a prefetched message, or live work is delivered twice.
            "visibility_timeout": settings.visibility_timeout_s,
            # Celery-worker processes (training) sweep expired messages this often; the tagging
            # worker runs its own sweep at the same interval (worker/consumer.py).
            "unacked_restore_interval": max(1, round(settings.restore_interval_s)),
            "unacked_restore_throttle": 1,
            # The sweep's lock: kombu's default (300 s) outlives a worker or a Redis killed while
            # holding it (the lock survives in the append-only file), stopping every sweep for 5 min.
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
            # A dead or half-open socket is noticed within seconds instead of waiting forever.
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_keepalive": True,
            "health_check_interval": BROKER_HEALTH_CHECK_S,
            # Uploads before backfill: BRPOP lists the keys in this fixed order.
            "queue_order_strategy": "priority",
        }
    if settings.broker_scheme == "filesystem":
        folder = settings.data_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    return {}


def connection_url(settings: Settings) -> str:
    """The broker URL kombu is given. ``filesystem://`` gets the host it ignores: without one, kombu
    warns "No hostname was supplied" each time it describes the connection (the worker's banner,
    every remote-control reply)."""
    scheme, _, rest = settings.broker_url.partition("://")
    if scheme == "filesystem" and not rest.strip("/"):
        return "filesystem://localhost/"
    return settings.broker_url


def transport_class(settings: Settings) -> str | None:
    return GUARDED_REDIS_TRANSPORT if settings.broker_is_redis else None
