"""``stilltag.retrain`` (Celery imports this module when a worker starts)."""

from __future__ import annotations

from celery import shared_task

from shared.constants import RETRAIN_TASK


@shared_task(name=RETRAIN_TASK, acks_late=False, bind=True)
def retrain(self, **options) -> str | None:
    """Retrain from the website's tags; acked at start, since a retrain is not worth repeating blindly.

    The task's id is the run's id in ``retrain_runs``.
    """
    from training.service import retrain_from_task

    return retrain_from_task(self.request.id, **options)
