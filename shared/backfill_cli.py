"""``stilltag backfill``: the command, its progress display and its handling of Ctrl-C and SIGTERM.

The work itself is ``shared.backfill``; this module chooses the selection from the options,
draws progress (a rich bar on a terminal, a plain line every few seconds otherwise) and turns a
signal into a clean stop: the chunk being sent is finished, the cursor kept, one line says how
to carry on, and the exit status is 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from shared.backfill import (
    INTERRUPTED,
    PLAIN_EVERY_S,
    BackfillError,
    Counts,
    IdSelection,
    PlainProgress,
    Selection,
    parse_ids,
    rate_eta,
)
from shared.config import BACKFILL_PENDING_BATCHES, Settings, get_settings


class BarProgress:
    """A rich progress bar: done/total, rate, ETA, and the enqueued, skipped and tagged counts."""

    def __init__(self, console: Console, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.bars = Progress(
            TextColumn("backfill"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:,.0f}/s ETA {task.fields[eta]}  enqueued {task.fields[enqueued]:,} "
                       "skipped {task.fields[skipped]:,} tagged {task.fields[tagged]:,}"),
            console=console,
        )
        self.task = self.bars.add_task("backfill", total=None, rate=0.0, eta="-", enqueued=0, skipped=0, tagged=0)
        self.bars.start()

    def __call__(self, counts: Counts) -> None:
        rate, eta = rate_eta(counts, self.clock() - self.started)
        self.bars.update(self.task, total=counts.total, completed=counts.seen, rate=rate, eta=eta,
                         enqueued=counts.enqueued, skipped=counts.skipped, tagged=counts.tagged)

    def close(self, counts: Counts) -> None:
        self(counts)
        self.bars.stop()


class StopOnSignal:
    """SIGINT and SIGTERM set ``event`` (the loop stops between chunks); a second one ends at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: int | None = None
        self._old: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signum
        self.event.set()
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self) -> StopOnSignal:
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *_exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def choose_selection(settings: Settings, *, query: str, ids: Path | None, stale: bool,
                     stdin: TextIO = sys.stdin) -> Selection:
    """The selection the options name (see ``backfill``'s help)."""
    from shared.backfill import QuerySelection, stale_selection

    if ids is not None:
        if query or stale:
            raise BackfillError("--ids selects the images itself: leave out --query and --stale")
        if str(ids) == "-":
            return IdSelection(parse_ids(stdin))
        with open(ids, encoding="utf-8") as fh:
            return IdSelection(parse_ids(fh, source=str(ids)))
    if stale:
        return stale_selection(settings, query)
    if query:
        return QuerySelection(query, name="--query")
    if settings.backfill_query:
        return QuerySelection(settings.backfill_query, name="STILLTAG_BACKFILL_QUERY")
    raise BackfillError("say what to backfill: --query 'SELECT id AS image_id FROM ...', --ids FILE (- for standard "
                        "input), or --stale with STILLTAG_BACKFILL_QUERY set")


def backfill(
    query: Annotated[str, typer.Option(help="SQL on the website's database returning one column image_id "
                                            "(default STILLTAG_BACKFILL_QUERY).")] = "",
    ids: Annotated[Path | None, typer.Option(help="A file of image IDs, one per line; - reads standard input.")]
    = None,
    stale: Annotated[bool, typer.Option("--stale", help="What the champion has not tagged yet, among the IDs of "
                                                        "--query or STILLTAG_BACKFILL_QUERY.")] = False,
    max_pending: Annotated[int, typer.Option(
        help=f"Wait while the backfill queue holds more than this; 0 = STILLTAG_BACKFILL_MAX_PENDING, or "
             f"{BACKFILL_PENDING_BATCHES} x STILLTAG_MAX_BATCH.", min=0)] = 0,
    restart: Annotated[bool, typer.Option("--restart", help="Forget where an interrupted run stopped.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Send again what failed with the champion.")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print how many images would be enqueued, only.")]
    = False,
    progress_every: Annotated[float, typer.Option(help="Seconds between plain progress lines (not a terminal).",
                                                  min=0)] = PLAIN_EVERY_S,
) -> None:
    """Tag the archive: enqueue images on the backfill queue in bounded chunks, resumably."""
    from shared import backfill as bf

    settings = get_settings()
    selection = choose_selection(settings, query=query, ids=ids, stale=stale)
    pending = max_pending or settings.max_pending
    if dry_run:
        outcome = bf.backfill(settings, selection, max_pending=pending, dry_run=True, restart=restart,
                              retry_failed=retry_failed)
        print(outcome.counts.enqueued)
        return
    console = Console()
    report: BarProgress | PlainProgress
    if console.is_terminal:
        report = BarProgress(console)
    else:
        report = PlainProgress(lambda line: print(line, flush=True), every_s=progress_every)
    counts = Counts()

    def on_progress(now: Counts) -> None:
        nonlocal counts
        counts = now
        report(now)

    try:
        with StopOnSignal() as stopper:
            outcome = bf.backfill(settings, selection, max_pending=pending, stop=stopper.event, report=on_progress,
                                  restart=restart, retry_failed=retry_failed)
    finally:
        report.close(counts)
    resumed = f" (resumed after image {outcome.counts.resumed_after})" if outcome.counts.resumed_after is not None \
        else ""
    if outcome.state == INTERRUPTED:
        name = signal.Signals(stopper.received).name if stopper.received else "a stop request"
        print(f"backfill interrupted by {name}: {outcome.counts.summary()}{resumed}; run the same command again to "
              "carry on", file=sys.stderr, flush=True)
        raise typer.Exit(128 + stopper.received if stopper.received else 1)
    print(f"backfill done for {outcome.champion}: {outcome.counts.summary()}{resumed}; max pending {pending:,}")
