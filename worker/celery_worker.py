"""The tagging worker as a real Celery worker: ``celery inspect``, Flower and remote control see it.

A solo-pool Celery worker (one process per GPU, the model loaded once in it) carries two
bootsteps:

* ``TaggingStep`` (worker blueprint) runs ``TaggingService``: the batching consumer in a thread
  of its own (worker/consumer.py), the health and metrics server and the stall watchdog.
  Celery starts it with the worker and stops it on ``celery control shutdown`` or SIGTERM:
  the batch in the forward pass is finished and acknowledged, the rest goes back to the queue.
* ``HoldTaskQueues`` (consumer blueprint) keeps Celery's own task consumer from popping the
  tagging queues. Celery still lists them as the worker's queues (``inspect active_queues``,
  Flower), sends heartbeats and worker-online/offline events, and answers remote control;
  ``route_queue_commands`` sends ``cancel_consumer``/``add_consumer`` to the batching consumer.

Why a thread of our own and not Celery's event loop (a ``ConsumerStep``): a message must be
popped and recorded as unacknowledged in one atomic step, or a SIGKILL between the two loses it
(shared/broker.py). Redis cannot block inside a script, so that pop polls; Celery's event loop
waits on the BRPOP socket and would spin on it. The fault drill (tests/e2e/test_fault_drill.py)
shows this thread consuming again within seconds of every broker fault.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.utils.nodenames import host_format
from celery.worker import state as worker_state
from celery.worker.control import Panel, nok

from shared.config import Settings
from shared.health import all_of, bind, database_check, redis_check, redis_client, register_queue_lengths
from worker.consumer import BatchConsumer, QueueRefused
from worker.health import Liveness, Watchdog, queue_depth
from worker.service import Tagger

log = logging.getLogger(__name__)

FATAL_EXIT_CODE = 1  # the consumer thread could not go on (e.g. a tampered model): the worker exits


class TaggingService:
    """The batching consumer, its health endpoints and its watchdog, inside one worker process."""

    def __init__(self, settings: Settings, queues: tuple[str, ...]):
        """Make everything and take the health port; nothing runs until ``start()``."""
        self.settings = settings
        self.queues = queues
        self.tagger = Tagger(settings)
        self.consumer = BatchConsumer(self.tagger, queues=queues)
        self._redis = redis_client(settings.broker_url) if settings.broker_is_redis else None
        # A batch may take as long as a message may wait unacknowledged, not longer.
        self.liveness = Liveness(self.consumer, max_batch_s=settings.visibility_timeout_s)
        self.server = bind(settings.metrics_port, live=self._live, ready=self._ready())
        self.watchdog = Watchdog(self.liveness, queue_depth=queue_depth(self._redis, self.consumer.consuming),
                                 stall_exit_s=settings.stall_exit_s)
        self._thread = threading.Thread(target=self._run, name="batch-consumer", daemon=True)

    def start(self) -> None:
        if self._redis is not None:
            register_queue_lengths(self._redis)
        if self.server is not None:
            self.server.start()
        self._thread.start()
        self.watchdog.start()

    def _run(self) -> None:
        try:
            if self.tagger.wait_for_champion(stop=self.consumer.stop_event.is_set) is None:
                return
            self.consumer.run()
        except Exception as exc:
            log.critical("the tagging consumer stopped: %s: %s; the worker exits", type(exc).__name__, exc,
                         exc_info=not isinstance(exc, ValueError))
            worker_state.should_stop = FATAL_EXIT_CODE  # Celery's own way to ask its worker to exit

    def _live(self) -> tuple[bool, str]:
        if self._thread.ident is not None and not self._thread.is_alive() and not self.consumer.stop_event.is_set():
            return False, "the tagging consumer thread has ended"
        if not self.consumer.started.is_set():
            return True, "starting (loading the model or waiting for the broker)"
        return self.liveness.check()

    def _ready(self):
        checks = [self._model_loaded, database_check(self.tagger.runtime.engine)]
        if self._redis is not None:
            checks.append(redis_check(self._redis, "the broker (STILLTAG_BROKER_URL)"))
        return all_of(*checks)

    def _model_loaded(self) -> tuple[bool, str]:
        if self.tagger.model is None:
            return False, "no model loaded yet"
        if not self.consumer.started.is_set():
            return False, "not consuming yet"
        return True, "ok"

    def stop(self) -> None:
        """Finish the batch in the forward pass, return the rest, then release everything."""
        self.consumer.stop()
        if self._thread.ident is not None:
            self._thread.join()
        self.watchdog.stop()
        self.tagger.close()
        if self.server is not None:
            self.server.stop()
        if self._redis is not None:
            self._redis.close()
        log.info("tagging worker stopped")


class TaggingStep(bootsteps.StartStopStep):
    """Worker blueprint step: starts and stops the ``TaggingService`` with the worker."""

    label = "stilltag tagging"

    def __init__(self, parent, stilltag_service: TaggingService | None = None, **kwargs):
        self.service = parent.stilltag_service = stilltag_service  # remote control finds it there (route_queue_commands)
        super().__init__(parent, **kwargs)

    def include_if(self, parent) -> bool:
        return self.service is not None

    def create(self, parent):
        return self.service


class HoldTaskQueues(bootsteps.StartStopStep):
    """Consumer blueprint step: Celery's task consumer keeps the tagging queues (so that Celery's
    tools list them) but never consumes them; the batching consumer does (remote control reaches it
    through ``route_queue_commands``)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "stilltag hold task queues"

    def start(self, c) -> None:
        c.task_consumer.consume = _consume_nothing


def _consume_nothing(*_args, **_kwargs) -> None:
    return None


def route_queue_commands() -> None:
    """Celery's ``cancel_consumer`` and ``add_consumer`` reach a tagging worker's batching consumer.

    ``celery control cancel_consumer backfill`` stops it taking from ``backfill`` (what it holds is
    still tagged), ``add_consumer backfill`` starts it again, and ``inspect active_queues`` follows
    (Celery's own bookkeeping runs after ours). A queue it cannot pause or resume (not one it was
    started with; pausing without the Redis broker) is refused in the reply the operator reads,
    not only in the worker's log: Celery's commands answer "ok" before they run. Registered in the
    tagging worker's process only; a worker without the tagging service keeps Celery's behaviour."""
    for name, action in (("cancel_consumer", "pause"), ("add_consumer", "resume")):
        celery_command = Panel.data[name]
        if getattr(celery_command, "stilltag_routed", False):
            continue
        Panel.data[name] = _routed(celery_command, action)


def _routed(celery_command: Callable[..., dict], action: str) -> Callable[..., dict]:
    def command(state: Any, queue: str, *args: Any, **kwargs: Any) -> dict:
        service: TaggingService | None = getattr(state.consumer.controller, "stilltag_service", None)
        if service is not None:
            try:
                getattr(service.consumer, action)(queue)
            except QueueRefused as exc:
                log.warning("remote control refused: %s", exc)
                return nok(str(exc))
        return celery_command(state, queue, *args, **kwargs)

    command.stilltag_routed = True  # type: ignore[attr-defined]
    command.__doc__ = celery_command.__doc__
    return command


def run_tagging_worker(settings: Settings, queues: tuple[str, ...], *, loglevel: str = "INFO",
                       hostname: str | None = None) -> int:
    """Run a tagging worker until it is shut down; returns its exit status."""
    from shared.celery_app import create_app

    service = TaggingService(settings, queues)  # a port clash fails here, in one line
    app = create_app(settings)
    app.steps["worker"].add(TaggingStep)
    app.steps["consumer"].add(HoldTaskQueues)
    route_queue_commands()
    worker = app.Worker(
        pool="solo", concurrency=1, queues=list(queues), loglevel=loglevel,
        hostname=host_format(hostname or f"tagging.{os.getpid()}@%h"),
        without_mingle=True, without_gossip=True, stilltag_service=service,
    )
    worker.start()
    return worker.exitcode or 0
