"""``stilltag.retrain`` (Celery imports this module when a worker starts)."""

from __future__ import annotations

from celery import shared_task

from shared.constants import RETRAIN_TASK


@shared_task(name=RETRAIN_TASK, acks_late=False)
def retrain(**options) -> str | None:
    """Retrain from the website's tags; acked at start, since a retrain is not worth repeating blindly."""
    from training.service import retrain_from_task

    return retrain_from_task(**options)
