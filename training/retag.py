"""``stilltag.retag``: after a promotion, the training worker backfills what the new champion has
not tagged (``shared.backfill``, with the stale selection over STILLTAG_BACKFILL_QUERY).

It runs on the training worker because that worker is one per deployment and idle between
retrains; the tagging workers do the tagging as for any backfill, uploads first. The task is
acknowledged when it starts: it runs far longer than the visibility timeout, after which Redis
would hand an unacknowledged message out again while it still runs. A warm shutdown of the worker
stops the backfill between two chunks and enqueues a new ``stilltag.retag``, which carries on from
the cursor; after a crash, ``stilltag backfill --stale`` does (same query, same champion, same
cursor).
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_shutting_down

from shared.backfill import INTERRUPTED, PlainProgress, backfill, request_retag, stale_selection
from shared.config import Settings

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # a progress line in the worker's log this often

_shutting_down = threading.Event()


@worker_shutting_down.connect
def _on_shutdown(**_kwargs) -> None:
    _shutting_down.set()


def retag(settings: Settings, *, reason: str = "") -> str:
    """Run the stale backfill to its end (or until the worker shuts down); returns a summary."""
    log.info("re-tag started (%s)", reason or "requested")
    progress = PlainProgress(lambda line: log.info("re-tag %s", line), every_s=LOG_EVERY_S)
    outcome = backfill(settings, stale_selection(settings), stop=_shutting_down, report=progress)
    progress.close(outcome.counts)
    if outcome.state == INTERRUPTED:
        summary = f"re-tag for {outcome.champion} interrupted by the worker's shutdown: {outcome.counts.summary()}"
        log.warning("%s; enqueued again, it carries on from its cursor", summary)
        request_retag(settings, reason=f"carry on after a shutdown ({reason})")
        return summary
    summary = f"re-tag for {outcome.champion} done: {outcome.counts.summary()}"
    log.info("%s", summary)
    return summary


def retag_from_task(**options) -> str:
    """The ``stilltag.retag`` task's body (``options``: the ``reason`` the promotion gave)."""
    from training.service import worker_settings

    return retag(worker_settings(), reason=str(options.get("reason", "")))
