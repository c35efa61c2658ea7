"""``stilltag worker`` (tagging or training), ``stilltag beat`` and ``stilltag bench``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from shared.config import get_settings
from shared.constants import TAGGING_QUEUES, TRAINING_QUEUE

log = logging.getLogger(__name__)


def worker(
    queues: Annotated[str, typer.Option(help="tagging,backfill for a tagging worker; training for a training worker.")]
    = ",".join(TAGGING_QUEUES),
    loglevel: Annotated[str, typer.Option(help="Log level (Celery's).")] = "INFO",
    hostname: Annotated[str, typer.Option(help="Celery node name; default tagging.PID@HOST or training.PID@HOST.")]
    = "",
) -> None:
    """Run a worker: tagging (one process per GPU) or training."""
    settings = get_settings()
    names = tuple(q.strip() for q in queues.split(",") if q.strip())
    if names == (TRAINING_QUEUE,):
        from training.service import run_training_worker

        raise typer.Exit(run_training_worker(settings, loglevel, hostname=hostname or None))
    if TRAINING_QUEUE in names or not set(names) <= set(TAGGING_QUEUES):
        raise typer.BadParameter(
            f"a tagging worker consumes {' and/or '.join(TAGGING_QUEUES)}; run `--queues {TRAINING_QUEUE}` separately",
            param_hint="--queues",
        )
    names = tuple(q for q in TAGGING_QUEUES if q in names)  # uploads first, whatever the order given
    from worker.celery_worker import run_tagging_worker

    raise typer.Exit(run_tagging_worker(settings, names, loglevel=loglevel, hostname=hostname or None))


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
