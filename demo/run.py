"""``stilltag demo``: the whole service on the embedded defaults, shown working.

Makes pictures with known tags, stores the website's tags for most of them, retrains a small
learner with the real training code, starts a real tagging worker process, enqueues the
held-out pictures the way the website does, waits for the database rows and prints them with
the F2 score. A second run reuses the pictures and the model the first one made.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from demo.synthetic import VOCAB, make_picture
from shared import registry
from shared.config import Settings
from shared.constants import TAGGING_QUEUE
from shared.db import image_tags, tag_suggestions, tagging_status, transaction
from shared.migrate import upgrade
from shared.runtime import Runtime
from worker.process import WorkerProcess

TRAIN_IDS = range(1, 481)  # the website's tagged pictures: the retrain's train / valid / holdout
HELD_OUT_IDS = range(10_001, 10_041)  # new uploads the model has never seen
PICTURE_SIZE = (160, 120)
# A small recipe that learns the demo's tags on a 2-core CPU in a couple of minutes.
DEMO_TRAINING = {
    "train_arch": "resnet18",
    "train_pretrained": False,
    "train_image_size": 64,
    "train_batch_size": 32,
    # Without pretrained weights nothing is frozen, so the first cycle trains the whole network at
    # the full rate; lr_find's conservative pick is too low for a network learning from scratch.
    "train_lr": 5e-3,
    "train_epochs_frozen": 8,
    "train_epochs_unfrozen": 1,
    "train_patience": 3,
    "train_min_tag_images": 5,
}
RESULTS_TIMEOUT_S = 300


@dataclass
class DemoResult:
    f2: float
    every_tag_f2: float
    base_rate_f2: float
    version: str
    seconds: float


def _pictures(rt: Runtime, ids, progress: Progress, label: str) -> dict[int, tuple[str, ...]]:
    task = progress.add_task(label, total=len(ids))
    tags = {}
    for image_id in ids:
        pic = make_picture(image_id, size=PICTURE_SIZE)
        if not rt.images.store.exists(rt.images.key(image_id)):
            rt.images.put(image_id, pic.jpeg())
        tags[image_id] = pic.tags
        progress.advance(task)
    return tags


def _store_website_tags(rt: Runtime, tags: dict[int, tuple[str, ...]]) -> None:
    with transaction(rt.sessions) as s:
        known = {r[0] for r in s.execute(sa.select(image_tags.c.image_id).distinct())}
        rows = [{"image_id": i, "tag": t} for i, ts in tags.items() if i not in known for t in ts]
        if rows:
            s.execute(sa.insert(image_tags), rows)


def _champion(rt: Runtime, settings: Settings, console: Console, progress: Progress) -> str:
    with rt.sessions() as s:
        existing = registry.champion(session=s)
    if existing is not None:
        console.print(f"reusing the champion model {existing.version} from an earlier run "
                      f"(holdout F2 {existing.metrics.get('f2', float('nan')):.3f})")
        return existing.version
    from training.cli import progress_bars
    from training.service import retrain, with_overrides

    on_progress, stage, batches = progress_bars(progress)
    record = retrain(with_overrides(settings, DEMO_TRAINING), progress=on_progress)
    progress.update(stage, total=1, completed=1, description=f"retrained: {record.version} is {record.status}")
    progress.update(batches, visible=False)
    return record.version


def _suggestions(rt: Runtime, ids, version: str) -> dict[int, list[tuple[str, float]]]:
    out: dict[int, list[tuple[str, float]]] = {i: [] for i in ids}
    with rt.sessions() as s:
        rows = s.execute(
            sa.select(tag_suggestions.c.image_id, tag_suggestions.c.tag, tag_suggestions.c.probability)
            .where(tag_suggestions.c.image_id.in_(list(ids)), tag_suggestions.c.model_version == version)
            .order_by(tag_suggestions.c.image_id, tag_suggestions.c.probability.desc())
        )
        for image_id, tag, p in rows:
            out[image_id].append((tag, p))
    return out


def _f2_scores(truth: dict, suggested: dict, threshold: float) -> tuple[float, float, float]:
    from training.evaluate import score

    vocab = list(VOCAB)
    ids = list(truth)
    t = np.array([[tag in truth[i] for tag in vocab] for i in ids], dtype=bool)
    probs = np.zeros(t.shape)
    for r, i in enumerate(ids):
        for tag, p in suggested[i]:
            probs[r, vocab.index(tag)] = p
    model = score(probs, t, vocab, threshold=threshold).f2
    every = score(np.ones(t.shape), t, vocab, threshold=threshold).f2  # suggest every tag
    rng = np.random.default_rng(0)
    base_rates = t.mean(axis=0)
    guesses = np.mean([score((rng.random(t.shape) < base_rates).astype(float), t, vocab, threshold=0.5).f2
                       for _ in range(50)])
    return model, every, float(guesses)


def run_demo(settings: Settings, console: Console | None = None) -> DemoResult:
    console = console or Console()
    t0 = time.monotonic()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]stilltag demo[/bold] — everything in {settings.data_dir} "
                  f"(database {settings.database_url.split(':')[0]}, broker {settings.broker_scheme})")
    upgrade(settings.database_url)
    rt = Runtime(settings)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            website_tags = _pictures(rt, TRAIN_IDS, progress, "pictures the website has tagged")
            truth = _pictures(rt, HELD_OUT_IDS, progress, "new uploads (held out)")
            _store_website_tags(rt, website_tags)
            version = _champion(rt, settings, console, progress)

            starting = progress.add_task("starting a tagging worker process", total=None)
            env = {**os.environ, "STILLTAG_DATA_DIR": str(settings.data_dir), "PYTHONUNBUFFERED": "1"}
            worker = WorkerProcess(env, settings.data_dir / "demo-worker.log").start().wait_ready()
            progress.update(starting, total=1, completed=1, description="tagging worker running")
            try:
                with transaction(rt.sessions) as s:  # a second run waits for fresh results
                    s.execute(sa.delete(tagging_status).where(tagging_status.c.image_id.in_(list(HELD_OUT_IDS))))
                from shared.celery_app import enqueue_tag_requests

                enqueue_tag_requests(settings, HELD_OUT_IDS, queue=TAGGING_QUEUE)
                waiting = progress.add_task("uploads tagged", total=len(HELD_OUT_IDS))
                deadline = time.monotonic() + RESULTS_TIMEOUT_S
                while True:
                    with rt.sessions() as s:
                        done = s.execute(sa.select(sa.func.count()).select_from(tagging_status)
                                         .where(tagging_status.c.image_id.in_(list(HELD_OUT_IDS)))).scalar_one()
                    progress.update(waiting, completed=done)
                    if done == len(HELD_OUT_IDS):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"only {done} of {len(HELD_OUT_IDS)} uploads tagged; see "
                                           f"{settings.data_dir / 'demo-worker.log'}")
                    time.sleep(0.1)
            finally:
                worker.stop()
        suggested = _suggestions(rt, HELD_OUT_IDS, version)
    finally:
        rt.close()

    table = Table("image", "true tags", f"suggested tags (probability ≥ {settings.threshold})", title="held-out uploads")
    for image_id in HELD_OUT_IDS:
        shown = ", ".join(f"{'[green]' if tag in truth[image_id] else '[red]'}{tag}[/] {p:.2f}"
                          for tag, p in suggested[image_id])
        table.add_row(str(image_id), ", ".join(truth[image_id]), shown or "-")
    console.print(table)
    f2, every, guess = _f2_scores(truth, suggested, settings.threshold)
    seconds = time.monotonic() - t0
    console.print(f"[bold]F2 (beta 2, averaged over images, threshold {settings.threshold}) on "
                  f"{len(HELD_OUT_IDS)} held-out uploads: {f2:.3f}[/bold] with model {version}")
    console.print(f"  for comparison: suggesting every tag scores {every:.3f}; guessing each tag at its "
                  f"base rate scores {guess:.3f}")
    console.print(f"  green: a true tag, red: a wrong one. Finished in {seconds:.0f} s.")
    return DemoResult(f2=f2, every_tag_f2=every, base_rate_f2=guess, version=version, seconds=seconds)
