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


def retag(settings: Settings, *, version: str = "", reason: str = "") -> str:
    """Run the stale backfill for ``version`` to its end (or until the worker shuts down); returns
    a summary. Skipped when ``version`` is no longer the champion (a later promotion asked too)."""
    from shared import registry
    from shared.runtime import Runtime

    rt = Runtime(settings)
    try:
        with rt.sessions() as session:
            champion = registry.champion_version(session=session)
    finally:
        rt.close()
    if version and champion != version:
        summary = f"re-tag for {version} skipped: {champion} is the champion now"
        log.info("%s", summary)
        return summary
    log.info("re-tag for %s started (%s)", champion, reason or "requested")
    progress = PlainProgress(lambda line: log.info("re-tag %s", line), every_s=LOG_EVERY_S)
    outcome = backfill(settings, stale_selection(settings), stop=_shutting_down, report=progress)
    progress.close(outcome.counts)
    if outcome.state == INTERRUPTED:
        summary = f"re-tag for {outcome.champion} interrupted by the worker's shutdown: {outcome.counts.summary()}"
        log.warning("%s; enqueued again, it carries on from its cursor", summary)
        request_retag(settings, version=outcome.champion, reason="carry on after a shutdown")
        return summary
    summary = f"re-tag for {outcome.champion} done: {outcome.counts.summary()}"
    log.info("%s", summary)
    return summary


def retag_from_task(**options) -> str:
    """The ``stilltag.retag`` task's body (``options``: the new champion's ``version`` and the ``reason``)."""
    from training.service import worker_settings

    return retag(worker_settings(), version=str(options.get("version", "")), reason=str(options.get("reason", "")))
