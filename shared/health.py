"""Health and metrics over HTTP for every worker process: ``/livez``, ``/readyz``, ``/metrics``.

One small server per process on ``STILLTAG_METRICS_PORT`` (0 turns it off), in a daemon
thread. What "alive" and "ready" mean is the worker's business: it passes two checks, each a
callable returning ``(ok, reason)``. Kubernetes and docker-compose probe the first two paths;
Prometheus scrapes the third (prometheus-client's own exposition, the default registry).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from shared.constants import BACKFILL_ENQUEUED_KEY, BACKFILL_QUEUE, TAGGING_QUEUE, TRAINING_QUEUE
from shared.errors import SettingsError

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
QUEUE_LENGTH_TIMEOUT_S = 2.0  # a scrape never waits longer than this for Redis
STOP_POLL_S = 0.1  # how often the server looks for stop(): a worker stops this soon (socketserver: 0.5)


def always_ok() -> tuple[bool, str]:
    return True, "ok"


def all_of(*checks: Check) -> Check:
    """A check that passes when every one passes; the reason names the first that fails."""

    def check() -> tuple[bool, str]:
        for one in checks:
            ok, reason = one()
            if not ok:
                return False, reason
        return True, "ok"

    return check


class HealthServer:
    """``/livez`` and ``/readyz`` from the given checks, anything else ``/metrics``."""

    def __init__(self, port: int, *, live: Check = always_ok, ready: Check = always_ok, host: str = "0.0.0.0"):
        self.live, self.ready = live, ready
        self._metrics = make_wsgi_app(REGISTRY)
        try:
            self._server = make_server(host, port, self._app, ThreadingWSGIServer, handler_class=_SilentHandler)
        except OSError as exc:
            raise SettingsError(
                f"cannot serve health and metrics on port {port} (STILLTAG_METRICS_PORT): {exc.strerror}; "
                "give each worker process on a host its own port, or 0 to turn it off"
            ) from None
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": STOP_POLL_S},
                                        name="health", daemon=True)

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/livez", "/readyz"):
            try:
                ok, reason = (self.live if path == "/livez" else self.ready)()
            except Exception as exc:  # a check that breaks says so; it never takes the server down
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"{reason}\n".encode()]
        return self._metrics(environ, start_response)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics on :%d (/livez, /readyz, /metrics)", self.port)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a server never started
            self._server.shutdown()
        self._server.server_close()


def bind(port: int, *, live: Check = always_ok, ready: Check = always_ok) -> HealthServer | None:
    """Take the port now (a clash is a one-line error before anything starts); ``start()`` it later."""
    return HealthServer(port, live=live, ready=ready) if port else None


def redis_check(client, what: str) -> Check:
    """Ready only while this Redis answers PING."""

    def check() -> tuple[bool, str]:
        try:
            client.ping()
            return True, "ok"
        except Exception as exc:
            return False, f"{what} does not answer: {type(exc).__name__}: {exc}"

    return check


def database_check(engine) -> Check:
    """Ready only while the database answers ``SELECT 1``."""
    import sqlalchemy as sa

    def check() -> tuple[bool, str]:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True, "ok"
        except Exception as exc:
            return False, f"the database does not answer: {type(exc).__name__}"

    return check


class QueueCollector:
    """The broker's figures, read from Redis at scrape time in one pipeline (one round trip):

    * ``stilltag_queue_length{queue}``: LLEN of each queue and the number of unacknowledged
      messages. Prefetched messages are out of the lists (they are in ``unacked``), which is why
      both are reported;
    * ``stilltag_backfill_enqueued_total`` and ``stilltag_backfill_pending``: a backfill is a process
      of its own (``stilltag backfill``, or the training worker's re-tag), so it keeps its count in
      Redis (``stilltag:backfill:enqueued``), and every worker serves it beside the queue lengths.
    """

    QUEUES = (TAGGING_QUEUE, BACKFILL_QUEUE, TRAINING_QUEUE)

    def __init__(self, client):
        self.client = client

    def collect(self):
        try:
            pipe = self.client.pipeline(transaction=False)
            for name in self.QUEUES:
                pipe.llen(name)
            pipe.hlen("unacked")
            pipe.get(BACKFILL_ENQUEUED_KEY)
            *counts, enqueued = pipe.execute()
        except Exception as exc:  # Redis down: no sample rather than a wrong one
            log.debug("queue lengths unavailable: %s", exc)
            return
        lengths = dict(zip((*self.QUEUES, "unacked"), counts, strict=True))
        family = GaugeMetricFamily("stilltag_queue_length", "Messages waiting in each queue, and unacknowledged.",
                                   labels=["queue"])
        for name, count in lengths.items():
            family.add_metric([name], count)
        yield family
        yield CounterMetricFamily("stilltag_backfill_enqueued", "Messages every backfill has sent to the backfill "
                                  "queue (kept in Redis, stilltag:backfill:enqueued).", value=int(enqueued or 0))
        yield GaugeMetricFamily("stilltag_backfill_pending", "Messages waiting in the backfill queue (LLEN); "
                                "a backfill keeps it at or below its --max-pending.", value=lengths[BACKFILL_QUEUE])


def redis_client(url: str):
    """A Redis client for health checks and queue lengths: short timeouts, never blocks a scrape."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=QUEUE_LENGTH_TIMEOUT_S,
                                socket_connect_timeout=QUEUE_LENGTH_TIMEOUT_S)


def register_queue_lengths(client) -> None:
    """Export ``stilltag_queue_length`` and the backfill metrics from this Redis client (the broker's)."""
    REGISTRY.register(QueueCollector(client))
