"""``stilltag worker`` (tagging or training), ``stilltag beat`` and ``stilltag bench``."""

from __future__ import annotations

import logging
import signal
from typing import Annotated

import typer

from shared.config import get_settings
from shared.constants import TAGGING_QUEUES, TRAINING_QUEUE

log = logging.getLogger(__name__)


def worker(
    queues: Annotated[str, typer.Option(help="tagging,backfill for a tagging worker; training for a training worker.")]
    = ",".join(TAGGING_QUEUES),
    loglevel: Annotated[str, typer.Option(help="Log level of the training worker (Celery).")] = "INFO",
) -> None:
    """Run a worker: tagging (one process per GPU) or training."""
    settings = get_settings()
    names = tuple(q.strip() for q in queues.split(",") if q.strip())
    if names == (TRAINING_QUEUE,):
        from training.service import run_training_worker

        run_training_worker(settings, loglevel)
        return
    if TRAINING_QUEUE in names or not set(names) <= set(TAGGING_QUEUES):
        raise typer.BadParameter(
            f"a tagging worker consumes {' and/or '.join(TAGGING_QUEUES)}; run `--queues {TRAINING_QUEUE}` separately",
            param_hint="--queues",
        )
    names = tuple(q for q in TAGGING_QUEUES if q in names)  # uploads first, whatever the order given
    run_tagging_worker(settings, names)


def run_tagging_worker(settings, queues) -> None:
    from worker.consumer import BatchConsumer
    from worker.service import Tagger

    tagger = Tagger(settings)
    consumer = BatchConsumer(tagger, queues=queues)

    def _stop(signum, _frame):
        log.info("signal %d: finishing the batches in hand, then stopping", signum)
        consumer.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        if tagger.wait_for_champion(stop=consumer.stop_event.is_set) is None:
            return
        consumer.run()
    finally:
        tagger.close()
    log.info("tagging worker stopped")


def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run Celery beat: enqueues `stilltag.retrain` on its schedule (STILLTAG_RETRAIN_SCHEDULE)."""
    from shared.celery_app import create_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    app.Beat(loglevel=loglevel, schedule=str(settings.data_dir / "beat-schedule")).run()


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(beat)
    try:
        from worker.bench import bench
    except ModuleNotFoundError as exc:
        if exc.name != "worker.bench":
            raise
    else:
        app.command()(bench)
