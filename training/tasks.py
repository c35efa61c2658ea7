"""``stilltag.retrain`` and ``stilltag.retag`` (Celery imports this module when a worker starts)."""

from __future__ import annotations

from celery import shared_task

from shared.constants import RETAG_TASK, RETRAIN_TASK


@shared_task(name=RETRAIN_TASK, acks_late=False, bind=True)
def retrain(self, **options) -> str | None:
    """Retrain from the website's tags; acked at start, since a retrain is not worth repeating blindly.

    The task's id is the run's id in ``retrain_runs``.
    """
    from training.service import retrain_from_task

    return retrain_from_task(self.request.id, **options)


@shared_task(name=RETAG_TASK, acks_late=False)
def retag(**options) -> str:
    """A stale backfill for the champion; acked at start, as it outlives the visibility timeout
    (a shutdown enqueues it again, and it carries on from its cursor)."""
    from training.retag import retag_from_task

    return retag_from_task(**options)
