"""The ``stilltag`` command line: every package's commands, and ``stilltag worker``, which picks
the tagging or the training worker by its queues.

A failure ends in one ``error: ...`` line on stderr and a non-zero status (shared/errors.py);
``--debug`` shows the traceback too.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from bench.run import bench
from demo import cli as demo_cli
from shared import cli as shared_cli
from shared.config import get_settings
from shared.constants import TAGGING_QUEUES, TRAINING_QUEUE
from shared.errors import report
from shared.runtime import Runtime
from training import cli as training_cli

# fastai's layers.py scripts a few activations with torch.jit.script when it is imported, which
# torch deprecates: without this, every command that loads a learner (and every worker's log)
# starts with a FutureWarning about code that is not ours.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

app = typer.Typer(help="stilltag: asynchronous image tagging with a preloaded fastai learner.", no_args_is_help=True)


@dataclass
class _Options:
    debug: bool = False  # set by the --debug flag; main() reads it when a command fails


options = _Options()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback when a command fails.")] = False,
) -> None:
    options.debug = debug
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


@app.command()
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
    from worker.celery_worker import run_tagging_worker

    names = tuple(q for q in TAGGING_QUEUES if q in names)  # uploads first, whatever the order given
    raise typer.Exit(run_tagging_worker(settings, names, loglevel=loglevel, hostname=hostname or None))


@app.command()
def audit(
    version: Annotated[str, typer.Option(help="Model version to audit with; default the champion.")] = "",
    limit: Annotated[int, typer.Option(min=0, help="Entries per list in the CSV and HTML (most confident first); "
                                                   "0 for all.")] = 200,
    all_images: Annotated[bool, typer.Option("--all", help="Score every tagged image, not only the holdout.")]
    = False,
    out: Annotated[Path | None, typer.Option(help="Folder for audit.csv, index.html and thumbs/; "
                                                  "default STILLTAG_DATA_DIR/audits/VERSION-TIME.")] = None,
    low: Annotated[float, typer.Option(help="List website tags the model puts below this.")] = 0.05,
    high: Annotated[float, typer.Option(help="List tags the website lacks that the model puts above this.")] = 0.9,
    rows: Annotated[int, typer.Option(min=0, help="Entries per list in the terminal table.")] = 10,
) -> None:
    """Check the website's tags with a model: tags it doubts, and tags it would add (CSV, HTML, table)."""
    import datetime as dt

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stilltag import audit as auditing

    settings = get_settings()
    console = Console(soft_wrap=True)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bars:
        task = bars.add_task("scoring", total=None)
        result = auditing.run_audit(settings, version=version or None, include_all=all_images, low=low, high=high,
                                    progress=lambda done, total: bars.update(task, completed=done, total=total))
    folder = out or settings.data_dir / "audits" / f"{result.version}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    folder.mkdir(parents=True, exist_ok=True)
    rt = Runtime(settings)
    try:
        csv_path = auditing.write_csv(folder / auditing.CSV_NAME, result, limit=limit or None)
        html_path = auditing.write_html(folder, result, rt.images, limit=limit or None)
    finally:
        rt.close()
    auditing.print_summary(console, result, rows=rows)
    console.print(f"CSV:  {csv_path}\nHTML: {html_path}")


shared_cli.register(app, shared_cli.models_app)
training_cli.register(app, shared_cli.models_app)
demo_cli.register(app, shared_cli.models_app)
app.command()(bench)


def main() -> None:
    """Run the command line; a failure is one line and a non-zero status (click's own usage errors: 2)."""
    try:
        app()
    except Exception as exc:
        raise SystemExit(report(exc, debug=options.debug)) from None


if __name__ == "__main__":
    main()
