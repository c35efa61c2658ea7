"""``stilltag train``, ``stilltag beat`` and ``stilltag models show``, added to the command line by ``stilltag/cli.py``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # long paths (the report) stay whole, copy-pasteable


def _overrides(arch: str, image_size: int | None, epochs_frozen: int | None, epochs_unfrozen: int | None,
               pretrained: bool | None) -> dict:
    given = {"train_arch": arch or None, "train_image_size": image_size, "train_epochs_frozen": epochs_frozen,
             "train_epochs_unfrozen": epochs_unfrozen, "train_pretrained": pretrained}
    return {k: v for k, v in given.items() if v is not None}


def progress_bars(bars):
    """A retrain ``progress`` callback drawing on rich ``bars``: a stage line and a batch bar.

    Returns:
        ``(callback, stage_task, batch_task)``.
    """
    stage = bars.add_task("starting", total=None)
    batches = bars.add_task("batches", total=None, visible=False)

    def on_progress(event: str, fields: dict) -> None:
        if event == "stage":
            bars.update(stage, description=f"[bold]{fields['name']}[/bold] {fields.get('detail', '')}")
        elif event == "epoch_start":
            bars.reset(batches, total=fields["n_batches"], visible=True,
                       description=f"{fields['phase']} epoch {fields['epoch']}/{fields['n_epochs']}")
        elif event == "batch":
            bars.update(batches, completed=fields["batch"],
                        description=f"{fields['phase']} epoch {fields['epoch']} loss {fields['loss']:.4f}")
        elif event == "epoch":
            values = "  ".join(f"{k} {v:.4f}" for k, v in fields.items() if isinstance(v, float) and k != "seconds")
            bars.console.print(f"epoch {fields['epoch']} ({fields['phase']}, {fields['seconds']:.0f}s): {values}")

    return on_progress, stage, batches


def train_now(settings, overrides: dict) -> None:
    """Run a retrain in this process with live progress bars."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from training import runs
    from training.lock import RetrainBusy
    from training.service import retrain, with_overrides

    trained = with_overrides(settings, overrides)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bars:
        on_progress, stage, batches = progress_bars(bars)
        try:
            with runs.tracked(settings, None, overrides, forward=on_progress) as recorder:
                record = retrain(trained, progress=recorder)
        except RetrainBusy as exc:
            console.print(f"[yellow]not started:[/yellow] {exc}")
            raise typer.Exit(1) from None
        bars.update(stage, description="[bold]done[/bold]", total=1, completed=1)
        bars.update(batches, visible=False)
    show_version(record.version)


def show_version(version: str) -> None:
    from shared import parity, registry
    from shared.config import get_settings
    from shared.runtime import Runtime
    from training.report import INDEX, REPORT_DIR

    rt = Runtime(get_settings())
    try:
        with rt.sessions() as session:
            v = registry.get_version(session=session, version=version)
        m = v.metrics
        console.print(f"[bold]{v.version}[/bold] — {v.status}"
                      + (f" (promoted {v.promoted_at:%Y-%m-%d %H:%M})" if v.promoted_at else ""))
        if v.reason:
            console.print(f"  reason:   {v.reason}")
        console.print(f"  model:    {v.arch}, {len(v.vocab)} tags, sha256 {v.sha256}")
        console.print(f"  dataset:  {v.dataset_size or '-'} images"
                      + (f", snapshot {v.snapshot_at:%Y-%m-%d %H:%M:%S}" if v.snapshot_at else ""))
        if isinstance(m.get("f2"), (int, float)):
            console.print(f"  holdout:  F2 {m['f2']:.4f}, accuracy_multi {m.get('accuracy_multi', 0):.4f}, "
                          f"precision {m.get('precision', 0):.4f}, recall {m.get('recall', 0):.4f} "
                          f"at threshold {m.get('threshold', '-')} on {m.get('holdout_size', '-')} images")
        if isinstance(m.get("f2_per_tag_thresholds"), (int, float)):
            console.print(f"  holdout:  F2 {m['f2_per_tag_thresholds']:.4f} with per-tag thresholds "
                          f"(STILLTAG_THRESHOLDS=per_tag)")
        gate = m.get("gate") or {}
        if "champion_f2" in gate:
            console.print(f"  gate:     {gate['n_images']} holdout images ({gate['mode']} thresholds): this model "
                          f"{gate['new_f2']:.4f}, champion {gate['champion']} {gate['champion_f2']:.4f}, difference "
                          f"95% interval {gate['diff_low']:+.4f} to {gate['diff_high']:+.4f}")
        thresholds = registry.tag_thresholds(v)
        if thresholds:
            rule = m.get("thresholds_rule") or {}
            fallback = set(rule.get("fallback_tags", []))
            console.print(f"  thresholds per tag (best F2 on the validation split, within "
                          f"{rule.get('floor', '?')}–{rule.get('ceiling', '?')}; * = fewer than "
                          f"{rule.get('min_positives', '?')} positives, global threshold):")
            for tag, t in sorted(thresholds.items()):
                console.print(f"    {tag:<24} {t:.3f}{' *' if tag in fallback else ''}", markup=False)
        records = parity.recorded(m)
        for reduced, where in (("bf16", "on a CPU with native bf16, or a GPU where fp16 is not"), ("fp16", "on a GPU")):
            rec = records.get(reduced)
            console.print(f"  {reduced}:     {parity.describe(rec)}" + (
                f" on {rec.get('images', '?')} images against fp32: "
                f"{'may' if parity.within_limits(rec) else 'may not'} be served in {reduced} (auto, {where})"
                if rec is not None else f": not served in {reduced} under auto (`stilltag models measure "
                                        f"{v.version}` measures it)"), markup=False)
        if "train_seconds" in m:
            console.print(f"  training: {len(m.get('epochs', []))} epochs in {m['train_seconds']:.0f}s on "
                          f"{m.get('device', '?')}, lr {m.get('lr', 0):.2e}, image size {m.get('image_size', '-')}")
        key = f"{v.version}/{REPORT_DIR}/{INDEX}"
        if rt.model_store.exists(key):
            console.print(f"  report:   {rt.model_store.location(key)}")
        else:
            console.print("  report:   none (registered by hand, not trained by stilltag)")
    finally:
        rt.close()


def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run Celery beat: enqueues `stilltag.retrain` on its schedule (STILLTAG_RETRAIN_SCHEDULE)."""
    from shared.celery_app import create_app
    from shared.config import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    app.Beat(loglevel=loglevel, schedule=str(settings.data_dir / "beat-schedule")).run()


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    app.command()(beat)
    @app.command()
    def train(
        now: Annotated[bool, typer.Option("--now", help="Train here, with live progress, instead of enqueuing.")] = False,
        arch: Annotated[str, typer.Option(help="Architecture (default STILLTAG_TRAIN_ARCH).")] = "",
        image_size: Annotated[int | None, typer.Option(help="Input size (default STILLTAG_TRAIN_IMAGE_SIZE).")] = None,
        epochs_frozen: Annotated[int | None, typer.Option(help="Epochs with the body frozen.")] = None,
        epochs_unfrozen: Annotated[int | None, typer.Option(help="Epochs after unfreeze().")] = None,
        pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained",
                                                           help="Start from ImageNet weights.")] = None,
    ) -> None:
        """Retrain the model from the website's tags: enqueue it for the training worker, or --now here."""
        from shared.config import get_settings
        from shared.constants import RETRAIN_TASK, TRAINING_QUEUE

        settings = get_settings()
        overrides = _overrides(arch, image_size, epochs_frozen, epochs_unfrozen, pretrained)
        if now:
            train_now(settings, overrides)
            return
        from training.service import with_overrides

        with_overrides(settings, overrides)  # refuse bad options here, not in the worker's log
        from shared.celery_app import create_app
        from shared.runtime import Runtime
        from training import runs

        run_id = runs.new_run_id()  # the task's id: the run's row is there before the message
        rt = Runtime(settings)
        try:
            runs.enqueued(rt, run_id=run_id, options=overrides)
        finally:
            rt.close()
        celery = create_app(settings)
        try:
            result = celery.send_task(RETRAIN_TASK, kwargs=overrides, queue=TRAINING_QUEUE, task_id=run_id)
        finally:
            celery.close()
        console.print(f"enqueued retrain {result.id} on {TRAINING_QUEUE!r}; a training worker "
                      "(`stilltag worker --queues training`) runs it; `stilltag models list` shows the result")

    @models_app.command("show")
    def models_show(version: str) -> None:
        """A version's summary: status, gate reason, holdout scores and where its report is."""
        show_version(version)

    @models_app.command("measure")
    def models_measure(version: str) -> None:
        """Measure a version's bf16 and fp16 against fp32 on the website's pictures (a retrain does it; a
        version registered by hand has none, and `auto` serves it in fp32). Running workers follow it at their next poll."""
        from shared.config import get_settings
        from shared.runtime import Runtime
        from training.service import measure_parity

        rt = Runtime(get_settings())
        try:
            measure_parity(rt, version)
        finally:
            rt.close()
        show_version(version)
