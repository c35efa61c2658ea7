"""The Celery app: broker, queues, routes, delivery settings and the beat schedule.

Configuration is read lazily from ``get_settings()`` the first time the app needs it, so
importing this module (``celery -A shared.celery_app flower``) touches nothing.
"""

from __future__ import annotations

import time

from celery import Celery
from kombu import Queue

from shared.broker import QuickRetryConnection, connection_url, transport_class, transport_options
from shared.config import Settings, get_settings
from shared.constants import BACKFILL_QUEUE, ENQUEUED_AT_HEADER, RETAG_TASK, RETRAIN_TASK, TAG_TASK, TAGGING_QUEUE, TRAINING_QUEUE
from shared.schedule import retrain_crontab

PUBLISH_BATCH = 500  # messages per Redis pipeline when several are sent at once
TASK_MODULES = ("worker.tasks", "training.tasks")  # stilltag.tag; stilltag.retrain and stilltag.retag


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": connection_url(settings),
        "broker_transport": transport_class(settings),
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits for the broker forever, never gives up
        "task_queues": [Queue(TAGGING_QUEUE), Queue(BACKFILL_QUEUE), Queue(TRAINING_QUEUE)],
        "task_default_queue": TAGGING_QUEUE,
        "task_routes": {TAG_TASK: {"queue": TAGGING_QUEUE}, RETRAIN_TASK: {"queue": TRAINING_QUEUE},
                        RETAG_TASK: {"queue": TRAINING_QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # Lose nothing: acknowledge after the work is done, and redeliver when a worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "retrain-on-schedule": {
                "task": RETRAIN_TASK,
                "schedule": retrain_crontab(settings.retrain_schedule),
                "options": {"queue": TRAINING_QUEUE},
            }
        },
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (the process's settings when None), with stilltag's tasks."""
    # Celery imports the task modules by name when a worker starts: each package registers its
    # task beside its code, and shared/ imports neither.
    app = Celery("stilltag", set_as_current=False, include=list(TASK_MODULES))
    app.amqp.Connection = QuickRetryConnection  # every connection the app makes: reconnect within 2 s
    if settings is None:
        app.add_defaults(lambda: celery_config(get_settings()))
    else:
        app.conf.update(celery_config(settings))
    return app


def enqueue_tag_requests(settings: Settings, image_ids, *, queue: str = TAGGING_QUEUE, app: Celery | None = None) -> int:
    """Send ``stilltag.tag`` for each image, as the website does, with the optional enqueue-time
    header (``stilltag_enqueue_to_commit_seconds``). Returns how many were sent.

    ``app`` reuses a Celery app (and its broker connection) across calls, as a backfill does.
    """
    app = app or create_app(settings)
    sent = 0
    # kombu's publish batch: the LPUSHes of up to PUBLISH_BATCH messages go in one pipeline, not
    # one round trip each (a backfill sends hundreds of thousands); same messages.
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for image_id in image_ids:
            app.send_task(TAG_TASK, args=[image_id], queue=queue, producer=producer,
                          headers={ENQUEUED_AT_HEADER: time.time()})
            sent += 1
    return sent


app = create_app()
