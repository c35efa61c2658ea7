"""Retraining as a service: export → train → evaluate → report → register → gate.

``retrain()`` is the one entry point (``stilltag train --now`` calls it directly, the
``stilltag.retrain`` task through ``retrain_from_task``); ``run_training_worker`` runs the Celery
worker that consumes the ``training`` queue and nothing else.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from shared import parity, registry
from shared.config import Settings, get_settings
from shared.constants import TRAINING_QUEUE
from shared.db import transaction
from shared.errors import SettingsError, UserError, one_line
from shared.registry import ModelVersion
from shared.runtime import Runtime
from training.dataset import DatasetError
from training.lock import RetrainBusy, retrain_lock

if TYPE_CHECKING:
    import numpy as np

    from training.evaluate import Evaluation
    from training.gate import Decision
    from training.thresholds import Thresholds

log = logging.getLogger(__name__)

Progress = Callable[[str, dict], None]
"""``progress(event, fields)``. Events: ``stage`` {name, detail}; ``epoch_start`` {phase, epoch,
n_epochs, n_batches}; ``batch`` {phase, epoch, batch, n_batches, loss}; ``epoch`` {phase, epoch,
train_loss, valid_loss, accuracy_multi, f2, seconds}; ``done`` {version, status, reason, f2}."""

# Settings a retrain request may change (``stilltag train --arch ...`` or the task's kwargs).
OVERRIDABLE_PREFIX = "train_"

_worker_settings: Settings | None = None  # set by run_training_worker for the tasks it runs


def with_overrides(settings: Settings, overrides: dict | None) -> Settings:
    """``settings`` with ``train_*`` fields replaced, validated like the environment is.

    Raises:
        SettingsError: an option that is not a ``train_*`` setting.
        pydantic.ValidationError: a value the setting refuses.
    """
    if not overrides:
        return settings
    unknown = sorted(k for k in overrides if not k.startswith(OVERRIDABLE_PREFIX) or k not in Settings.model_fields)
    if unknown:
        allowed = ", ".join(sorted(k for k in Settings.model_fields if k.startswith(OVERRIDABLE_PREFIX)))
        raise SettingsError(f"unknown retrain option(s) {', '.join(unknown)}; allowed: {allowed}")
    return type(settings)(**{**settings.model_dump(), **overrides})


def _emit(progress: Progress | None, event: str, **fields) -> None:
    if progress is not None:
        progress(event, fields)


def retrain(source: Settings | Runtime, progress: Progress | None = None) -> ModelVersion:
    """Train a model from the website's tags, register it and put it through the gate.

    Args:
        source: settings (a runtime is made and closed here) or a runtime to use.
        progress: called with progress events (see ``Progress``), e.g. to draw progress bars.

    Returns:
        The registered version, as the gate left it (champion or candidate with a reason).

    Raises:
        RetrainBusy: another retrain is running.
        DatasetError: the query gives too little data.
    """
    from training import recipe
    from training.dataset import export_dataset
    from training.gate import apply as apply_gate
    from training.report import write_report

    rt = source if isinstance(source, Runtime) else Runtime(source)
    settings = rt.settings
    try:
        with retrain_lock(settings):
            _emit(progress, "stage", name="dataset", detail="running STILLTAG_DATASET_QUERY")
            with rt.sessions() as session:
                dataset = export_dataset(session=session, settings=settings)
            log.info("dataset: %d images (%d train, %d valid, %d holdout), %d tags, %d rare tags left out%s",
                     dataset.size, len(dataset.train), len(dataset.valid), len(dataset.holdout),
                     len(dataset.vocab), len(dataset.dropped_tags),
                     f", split by {dataset.groups} groups" if dataset.groups else "")
            _emit(progress, "stage", name="dataset",
                  detail=f"{dataset.size} images, {len(dataset.vocab)} tags, holdout {len(dataset.holdout)}")
            with tempfile.TemporaryDirectory(prefix="stilltag-train-") as tmp:
                run = recipe.train(dataset, settings, workdir=Path(tmp) / "work", progress=progress)
                _emit(progress, "stage", name="evaluate", detail=f"{len(dataset.holdout)} holdout images")
                judged = _evaluate_and_judge(rt, dataset, run)
                evaluation, per_tag_eval = judged.evaluation, judged.per_tag_evaluation
                thresholds, decision = judged.thresholds, judged.decision
                log.info("holdout F2 %.4f at threshold %g, %.4f with per-tag thresholds, on %d images",
                         evaluation.f2, settings.threshold, per_tag_eval.f2, evaluation.n_images)
                records = judged.parity_records
                parity_lines = {p: _verdict(p, records[p]) if records else
                                "not measured (STILLTAG_TRAIN_PARITY_IMAGES=0): served in fp32 under auto"
                                for p in parity.REDUCED}
                for reduced, line in parity_lines.items():
                    log.info("%s against fp32: %s", reduced, line)
                summary = {
                    "arch": settings.train_arch, "pretrained": settings.train_pretrained,
                    "weights": settings.train_weights or ("ImageNet" if settings.train_pretrained else "none"),
                    "image_size": settings.train_image_size, "device": run.device,
                    "holdout_f2": round(evaluation.f2, 4),
                    "holdout_f2_per_tag_thresholds": round(per_tag_eval.f2, 4),
                    "holdout_accuracy_multi": round(evaluation.accuracy, 4),
                    "threshold": settings.threshold, "thresholds served": settings.thresholds, "lr": f"{run.lr:.3e}",
                    "images": dataset.size, "train / valid / holdout":
                        f"{len(dataset.train)} / {len(dataset.valid)} / {len(dataset.holdout)}",
                    "split by": f"group_id ({dataset.groups} groups)" if dataset.groups else "image_id",
                    "tags": len(dataset.vocab), "rare tags left out": len(dataset.dropped_tags),
                    "images without a kept tag": dataset.dropped_images,
                    "snapshot_at": dataset.snapshot_at.isoformat(timespec="seconds"),
                    "training time (s)": round(run.seconds, 1),
                    "gate": decision.reason,
                    **{f"{p} against fp32": line for p, line in parity_lines.items()},
                }
                files = write_report(Path(tmp) / "report", summary=summary, evaluation=evaluation,
                                     epochs=run.epochs, batch_losses=run.batch_losses, lr_find=run.lr_find, lr=run.lr,
                                     per_tag_evaluation=per_tag_eval, thresholds=thresholds,
                                     holdout_probs=judged.holdout_probs, holdout=dataset.holdout,
                                     read=judged.read, mode=settings.thresholds)
                metrics = {
                    **evaluation.metrics(), "lr": run.lr, "epochs": run.epochs, "train_seconds": round(run.seconds, 1),
                    "train_size": len(dataset.train), "valid_size": len(dataset.valid), "device": run.device,
                    "image_size": settings.train_image_size, "pretrained": settings.train_pretrained,
                    "dropped_tags": dataset.dropped_tags, "groups": dataset.groups,
                    "f2_per_tag_thresholds": per_tag_eval.f2, **thresholds.record(), "gate": decision.record(),
                    **({parity.METRICS_KEY: records} if records else {}),
                }
                _emit(progress, "stage", name="register", detail=str(settings.model_store))
                with transaction(rt.sessions) as session:
                    record = registry.register(
                        session=session, store=rt.model_store, artifact=run.export_path, arch=settings.train_arch,
                        vocab=list(run.learn.dls.vocab), metrics=metrics, dataset_size=dataset.size,
                        snapshot_at=dataset.snapshot_at, extra_files=files,
                    )
                    record = apply_gate(session=session, record=record, decision=decision)
            log.info("registered %s as %s: %s", record.version, record.status, record.reason)
            if decision.promote:  # committed: the training worker may start the re-tag now
                from shared.backfill import request_retag

                request_retag(settings, version=record.version, reason="promoted by the gate")
            _emit(progress, "done", version=record.version, status=record.status, reason=record.reason,
                  f2=evaluation.f2)
            return record
    finally:
        if rt is not source:
            rt.close()


class Judged(NamedTuple):
    evaluation: Evaluation  # holdout, global threshold
    per_tag_evaluation: Evaluation  # holdout, per-tag thresholds
    thresholds: Thresholds  # chosen on the validation split
    decision: Decision
    holdout_probs: np.ndarray
    read: Callable  # reads a picture, as both models were scored with
    parity_records: dict[str, dict]  # bf16 and fp16 against fp32 on validation and holdout pictures
    # (shared.parity), by precision; {}: not measured (STILLTAG_TRAIN_PARITY_IMAGES=0)


def _evaluate_and_judge(rt: Runtime, dataset, run) -> Judged:
    """Thresholds from the validation split; the holdout scored both ways; the gate's decision
    against the champion scored on the same holdout pictures."""
    import numpy as np

    from shared.learner_parts import ImageFromStore
    from training import gate, thresholds
    from training.evaluate import cutoffs, parity_records, predict, score, targets

    settings = rt.settings
    vocab = [str(t) for t in run.learn.dls.vocab]
    read = ImageFromStore(settings.image_url, endpoint_url=settings.s3_endpoint_url,
                          max_bytes=settings.max_image_bytes)
    valid_probs = predict(run.learn, dataset.valid, read=read)
    chosen = thresholds.choose(valid_probs, targets(dataset.valid, vocab), vocab, default=settings.threshold,
                               floor=settings.threshold_floor, ceiling=settings.threshold_ceiling,
                               min_positives=settings.threshold_min_positives)
    holdout_probs = predict(run.learn, dataset.holdout, read=read)
    truth = targets(dataset.holdout, vocab)
    evaluation = score(holdout_probs, truth, vocab, threshold=settings.threshold)
    per_tag_eval = score(holdout_probs, truth, vocab, threshold=settings.threshold,
                         per_tag_thresholds=chosen.as_dict())
    served = per_tag_eval if settings.thresholds == "per_tag" else evaluation
    # Whether this model may be served in bf16 or fp16 (a tagging worker's "auto": bf16 on a CPU with
    # native bf16, fp16 then bf16 on a GPU):
    # decisions counted at the cutoffs the website will get.
    records = {} if not settings.train_parity_images else parity_records(
        run.learn, [*dataset.valid, *dataset.holdout], np.concatenate([valid_probs, holdout_probs]),
        cut=cutoffs(vocab, threshold=settings.threshold,
                    per_tag=chosen.as_dict() if settings.thresholds == "per_tag" else None),
        images=settings.train_parity_images, device=run.device, read=read)
    with rt.sessions() as session:
        champion = registry.champion(session=session)
    decision = gate.judge(
        f2=served.f2, new_probs=holdout_probs, vocab=vocab, holdout=dataset.holdout, champion=champion,
        mode=settings.thresholds, threshold=settings.threshold, new_thresholds=chosen.as_dict(),
        tolerance=settings.gate_tolerance,
        champion_probs=lambda record: gate.champion_probabilities(
            record, store=rt.model_store, cache_dir=rt.model_cache_dir, holdout=dataset.holdout, read=read,
            cpu=run.device != "cuda"),
    )
    return Judged(evaluation, per_tag_eval, chosen, decision, holdout_probs, read, records)


def measure_parity(rt: Runtime, version: str) -> dict[str, dict]:
    """bf16 and fp16 against fp32 for a registered version (one registered by hand has no record,
    and ``auto`` serves it in fp32), measured as a retrain measures it: on up to
    ``STILLTAG_TRAIN_PARITY_IMAGES`` of the website's validation and holdout pictures, at the cutoffs
    the version is served with, on this machine's CPU. Stored with the version; running tagging
    workers follow it at their next poll (``Tagger.maybe_switch``).

    Raises:
        UserError: the measure is off, the version is unknown, or the website has too few tagged pictures.
    """
    from shared.learner_parts import ImageFromStore
    from shared.learner_pickle import load_learner
    from training.dataset import export_dataset
    from training.evaluate import cutoffs, parity_records, predict

    settings = rt.settings
    if not settings.train_parity_images:
        raise UserError("STILLTAG_TRAIN_PARITY_IMAGES is 0, which turns the parity measure off; set it to a "
                        "number of pictures (256 by default)")
    with rt.sessions() as session:
        record = registry.get_version(session=session, version=version)
        dataset = export_dataset(session=session, settings=settings)
    examples = [*dataset.valid, *dataset.holdout][: settings.train_parity_images]
    learn = load_learner(registry.fetch_artifact(store=rt.model_store, record=record, cache_dir=rt.model_cache_dir),
                         cpu=True)
    vocab = [str(t) for t in learn.dls.vocab]
    read = ImageFromStore(settings.image_url, endpoint_url=settings.s3_endpoint_url, max_bytes=settings.max_image_bytes)
    per_tag = registry.tag_thresholds(record) if settings.thresholds == "per_tag" else None
    result = parity_records(learn, examples, predict(learn, examples, read=read),
                         cut=cutoffs(vocab, threshold=settings.threshold, per_tag=per_tag),
                         images=len(examples), device="cpu", read=read)
    with transaction(rt.sessions) as session:
        registry.add_metrics(session=session, version=version, **{parity.METRICS_KEY: result})
    for reduced, figures in result.items():
        log.info("%s: %s against fp32: %s", version, reduced, _verdict(reduced, figures))
    return result


def _verdict(precision: str, record: dict) -> str:
    """``max 0.0059, p99 0.0043, 0 of 729 decisions flipped on 81 images: within the limits for serving in bf16``"""
    return (f"{parity.describe(record)} on {record['images']} images: "
            f"{'within' if record['within_limits'] else 'outside'} the limits for serving in {precision}")


def _log_progress(event: str, fields: dict) -> None:
    if event == "stage":
        log.info("retrain: %s — %s", fields.get("name"), fields.get("detail", ""))


def worker_settings() -> Settings:
    """The settings of the training worker running this task (the process's, outside one)."""
    return _worker_settings or get_settings()


def retrain_from_task(run_id: str | None = None, /, **options) -> str:  # run_id: the task's, names its retrain_runs row
    """The ``stilltag.retrain`` task's body. ``options`` are ``train_*`` settings to override.

    A retrain refused by the lock is skipped (logged, not retried): the running one is as fresh.
    One that fails for a reason the admin must fix (a ``UserError``: the dataset, the weights) is
    logged as one line and returned as ``failed: ...``, not raised: a traceback would bury the line.
    """
    from training import metrics, runs

    base = worker_settings()
    outcome = "failed"
    try:
        with metrics.RETRAIN_DURATION.time(), runs.tracked(base, run_id, options, forward=_log_progress) as progress:
            record = retrain(with_overrides(base, options), progress=progress)
        outcome = record.status if record.status in metrics.OUTCOMES else "candidate"
        metrics.RETRAIN_LAST_SUCCESS.set_to_current_time()
    except (RetrainBusy, DatasetError) as exc:  # the retrain_runs row says skipped too (training/runs.py)
        outcome = "skipped"
        log.warning("retrain skipped: %s", one_line(str(exc)))
        return f"skipped: {one_line(str(exc))}"
    except UserError as exc:  # e.g. no ImageNet weights offline: one line says what to change, no traceback
        log.error("retrain failed: %s", one_line(str(exc)))
        return f"failed: {one_line(str(exc))}"
    finally:
        metrics.RETRAIN_RUNS.labels(outcome).inc()
    return f"{record.version} {record.status}: {record.reason}"


def run_training_worker(settings: Settings, loglevel: str = "INFO", hostname: str | None = None) -> int:
    """Run a Celery worker that consumes only the ``training`` queue, one task at a time.

    The solo pool runs the retrain in this process (no fork after CUDA starts); a second
    training worker would only wait on the lock, so one per deployment is enough.
    """
    global _worker_settings
    from celery.utils.nodenames import host_format

    from shared.celery_app import create_app

    _worker_settings = settings
    if not logging.getLogger().handlers:  # run outside the CLI (which configures logging itself)
        logging.basicConfig(level=loglevel.upper(),
                            format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    app = create_app(settings)
    worker = app.Worker(
        pool="solo", concurrency=1, queues=[TRAINING_QUEUE], loglevel=loglevel,
        hostname=host_format(hostname or f"training.{os.getpid()}@%h"), without_mingle=True, without_gossip=True,
    )
    from training.runs import OrphanSweep, recover_orphans

    recover_orphans(settings)  # runs a killed worker left "running" end as "failed", with the reason
    stop_sweep = threading.Event()  # and those a worker on another host left, once its lock expires
    threading.Thread(target=OrphanSweep(settings).run, args=(stop_sweep,), name="orphan-sweep", daemon=True).start()
    server = _health_server(settings)
    if server is not None:
        server.start()
    try:
        worker.start()
    finally:
        stop_sweep.set()
        if server is not None:
            server.stop()
    return worker.exitcode or 0


def _restore_last_success(rt: Runtime) -> None:
    """Start ``stilltag_retrain_last_success_timestamp_seconds`` at the newest retrained version in
    the registry, so a restarted training worker does not report "never" (the 40-day alert)."""
    from training import metrics

    try:
        with rt.sessions() as session:
            trained = [v.created_at for v in registry.list_versions(session=session)
                       if v.dataset_size is not None and v.created_at is not None]
    except Exception as exc:  # no schema yet, database away: /readyz says so; the gauge stays 0
        log.warning("could not read the last retrain from the registry: %s", exc)
        return
    if trained:
        newest = max(trained)
        if newest.tzinfo is None:  # SQLite returns naive datetimes; the registry writes UTC
            newest = newest.replace(tzinfo=dt.UTC)
        metrics.RETRAIN_LAST_SUCCESS.set(newest.timestamp())


def _health_server(settings: Settings):
    """/livez (the process answers), /readyz (database and broker answer) and /metrics."""
    from shared.health import all_of, bind, database_check, redis_check, redis_client, register_queue_lengths
    from training import metrics  # noqa: F401  (registers the retrain metrics before the first scrape)

    rt = Runtime(settings)
    _restore_last_success(rt)
    checks = [database_check(rt.engine)]
    if settings.broker_is_redis:
        client = redis_client(settings.broker_url)
        register_queue_lengths(client)
        checks.append(redis_check(client, "the broker (STILLTAG_BROKER_URL)"))
    return bind(settings.metrics_port, ready=all_of(*checks))
