"""``stilltag.tag`` as a stock Celery task (Celery imports this module when a worker starts).

``stilltag worker`` batches instead (worker/consumer.py); this is the path of a plain
``celery worker`` that is handed a tag request, one image at a time, same stages.
"""

from __future__ import annotations

from celery import shared_task

from shared.constants import TAG_TASK


@shared_task(name=TAG_TASK, acks_late=True)
def tag(image_id: int) -> str:
    """Tag one image with the process's preloaded champion; returns its state."""
    from worker.service import tag_one

    return tag_one(image_id)
