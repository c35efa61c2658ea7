"""``stilltag.retag``: after a promotion, the training worker backfills what the new champion has
not tagged (``shared.backfill``, with the stale selection over STILLTAG_BACKFILL_QUERY).

It runs on the training worker because that worker is one per deployment and idle between
retrains; the tagging workers do the tagging as for any backfill, uploads first. A warm shutdown
of the worker stops the backfill between two chunks and returns the task to its queue, so the
restarted worker carries on from the cursor.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_shutting_down

from shared.backfill import INTERRUPTED, PlainProgress, backfill, stale_selection
from shared.config import Settings

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # a progress line in the worker's log this often

_shutting_down = threading.Event()


@worker_shutting_down.connect
def _on_shutdown(**_kwargs) -> None:
    _shutting_down.set()


def retag(settings: Settings, *, reason: str = "") -> str:
    """Run the stale backfill to its end (or until the worker shuts down); returns a summary.

    Raises:
        celery.exceptions.Reject: interrupted by a shutdown; the message goes back to the queue.
    """
    from celery.exceptions import Reject

    log.info("re-tag started (%s)", reason or "requested")
    progress = PlainProgress(lambda line: log.info("re-tag %s", line), every_s=LOG_EVERY_S)
    outcome = backfill(settings, stale_selection(settings), stop=_shutting_down, report=progress)
    progress.close(outcome.counts)
    if outcome.state == INTERRUPTED:
        log.warning("re-tag interrupted by the worker's shutdown: %s; it goes back to the queue",
                    outcome.counts.summary())
        raise Reject("interrupted by a shutdown", requeue=True)
    summary = f"re-tag for {outcome.champion} done: {outcome.counts.summary()}"
    log.info("%s", summary)
    return summary


def retag_from_task(**options) -> str:
    """The ``stilltag.retag`` task's body (``options``: the ``reason`` the promotion gave)."""
    from training.service import worker_settings

    return retag(worker_settings(), reason=str(options.get("reason", "")))
