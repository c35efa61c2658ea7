"""The seed project's recipe in fastai 2.8 terms.

Multi-label DataLoaders over the exported rows, each picture read through the image store;
``Resize(size, method='squish')``, ``aug_transforms()`` and ImageNet normalisation;
``vision_learner`` with the configured architecture; ``lr_find`` picks the rate; one cycle with
the body frozen, then ``unfreeze()`` and one cycle with discriminative rates; the best epoch by
validation loss is kept and training stops early when it stops improving; mixed precision on a
GPU; ``export()``.

The exported learner is a pickle that the tagging worker loads in another process, so every
function and class it references (``ImageFromStore``, ``example_tags``, ``Example``) lives in
``shared.learner_parts``, a small module that refactors here cannot move. fastai and torch are
imported inside functions, never when this module is imported.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.errors import UserError, one_line
from shared.learner_parts import ImageFromStore, example_tags
from shared.learner_pickle import resolve_device
from training.dataset import Dataset

log = logging.getLogger(__name__)

Progress = Callable[[str, dict], None]  # progress(event, fields); see training.service

LR_FALLBACK = 1e-3  # used when lr_find cannot suggest a finite rate
LR_BOUNDS = (1e-6, 1e-1)
LR_FIND_MAX_IT = 100  # fastai's default
LR_FIND_MIN_IT = 20
UNFROZEN_LR_DIVISOR = 5  # the seed's slice(lo, lr / 5) after unfreeze()
LR_MULT = 100  # fastai's fine_tune spread between the first and last layer groups
BEST_MODEL_NAME = "best"
METRIC_NAMES = {"fbeta_score": "f2"}  # fastai names the F2 metric after sklearn's function


def resolve_arch(name: str):
    """An architecture by name: fastai's own list (torchvision's models), then torchvision's registry."""
    from fastai.vision import models as fastai_models
    from torchvision import models as tv_models

    builder = getattr(fastai_models, name, None)
    if callable(builder) and not isinstance(builder, type):
        return builder
    try:
        return tv_models.get_model_builder(name)
    except ValueError:
        raise ValueError(
            f"unknown architecture {name!r} (STILLTAG_TRAIN_ARCH); use a torchvision name such as "
            "resnet18, resnet50, resnet152, densenet121"
        ) from None


def clamp_lr(lr: float | None) -> float:
    if lr is None or not math.isfinite(lr) or lr <= 0:
        return LR_FALLBACK
    return min(max(lr, LR_BOUNDS[0]), LR_BOUNDS[1])


@dataclass
class TrainingRun:
    """What a run leaves behind: the learner (best epoch loaded), its export and its history."""

    learn: Any  # a fastai Learner (fastai ships no type information)
    export_path: Path
    lr: float
    lr_find: dict  # {"lrs": [...], "losses": [...]}
    epochs: list[dict] = field(default_factory=list)  # one dict per epoch: phase, losses, metrics, seconds
    batch_losses: list[dict] = field(default_factory=list)  # {"phase", "losses": [...]} per fit
    seconds: float = 0.0
    device: str = "cpu"


def make_monitor(progress: Progress | None, epochs: list[dict], batch_losses: list[dict]):
    """A fastai callback reporting batches and epochs; passed to ``fit`` only, so never exported."""
    from fastai.callback.core import Callback
    from fastai.learner import Recorder

    class TrainingMonitor(Callback):
        order = Recorder.order + 1  # after the Recorder has filled this epoch's log
        phase = "frozen"

        def before_fit(self):
            self.fit_started = time.monotonic()

        def before_epoch(self):
            self.epoch_started = time.monotonic()
            if progress:
                progress("epoch_start", {"phase": self.phase, "epoch": self.epoch + 1, "n_epochs": self.n_epoch,
                                         "n_batches": len(self.dls.train)})

        def after_batch(self):
            if self.training and progress:
                progress("batch", {"phase": self.phase, "epoch": self.epoch + 1, "batch": self.iter + 1,
                                   "n_batches": self.n_iter, "loss": float(self.smooth_loss)})

        def after_epoch(self):
            row = {"phase": self.phase, "epoch": len(epochs) + 1,
                   "seconds": round(time.monotonic() - self.epoch_started, 2)}
            for name, value in zip(self.recorder.metric_names[1:], self.recorder.log[1:], strict=False):
                if name != "time":
                    row[METRIC_NAMES.get(name, name)] = float(value) if value is not None else None
            epochs.append(row)
            log.info("epoch %d (%s): %s", row["epoch"], self.phase,
                     ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)))
            if progress:
                progress("epoch", row)

        def after_fit(self):
            batch_losses.append({"phase": self.phase, "losses": [float(v) for v in self.recorder.losses]})

    return TrainingMonitor()


def build_dataloaders(dataset: Dataset, settings: Settings, *, device):
    from fastai.vision.all import (
        DataBlock,
        ImageBlock,
        IndexSplitter,
        MultiCategoryBlock,
        Normalize,
        Resize,
        aug_transforms,
        imagenet_stats,
    )

    items = [*dataset.train, *dataset.valid]
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=list(dataset.vocab))),
        get_x=ImageFromStore(settings.image_url, endpoint_url=settings.s3_endpoint_url,
                             max_bytes=settings.max_image_bytes),
        get_y=example_tags,
        splitter=IndexSplitter(range(len(dataset.train), len(items))),
        item_tfms=Resize(settings.train_image_size, method="squish"),
        # Normalize is explicit: fastai adds it only for pretrained models, and the tagging
        # worker reads the statistics from the learner's pipeline.
        batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)],
    )
    # On a CPU the model uses every core; loading in the main process is simpler and as fast.
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    return block.dataloaders(items, bs=settings.train_batch_size, num_workers=workers, device=device)


class WeightsUnavailable(UserError):
    """The starting weights cannot be had: not downloadable here, or the local file does not fit."""


WAYS_OUT = ("set STILLTAG_TRAIN_PRETRAINED=false to train from scratch, or STILLTAG_TRAIN_WEIGHTS=/path/to/{arch}.pth "
            "(a torchvision state dict, e.g. that file downloaded on another machine)")


def weights_url(builder) -> str:
    """Where torchvision downloads ``builder``'s default ImageNet weights ("" when unknown)."""
    from torchvision.models import get_model_weights

    try:
        return str(get_model_weights(builder).DEFAULT.url)
    except (ValueError, AttributeError, KeyError):
        return ""


def load_state_dict(path: str, arch: str) -> dict:
    """A torchvision state dict from ``path`` (tensors only: ``weights_only``, nothing unpickled)."""
    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsUnavailable(f"STILLTAG_TRAIN_WEIGHTS={path}: no such file; it must be a torchvision state dict "
                                 f"(.pth) for {arch}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"STILLTAG_TRAIN_WEIGHTS={path} is not a torch state dict ({one_line(str(exc))[:200]})"
                                 ) from None
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"STILLTAG_TRAIN_WEIGHTS={path} holds a {type(state).__name__}, not a state dict "
                                 f"(save it with torch.save(model.state_dict(), path))")
    return state


def build_learner(dls, settings: Settings, *, workdir: Path):
    """``vision_learner`` on the architecture, starting from ImageNet (downloaded by torchvision),
    from a local torchvision state dict (``STILLTAG_TRAIN_WEIGHTS``) or from scratch.

    Raises:
        WeightsUnavailable: the ImageNet weights cannot be downloaded (one line with the two ways
            out), or the local file is not a state dict for this architecture.
    """
    from fastai.vision.all import FBetaMulti, accuracy_multi, vision_learner

    f2 = FBetaMulti(beta=2, average="samples", thresh=settings.threshold)
    # An image with no tag above the threshold has no precision; score it 0 as evaluate.py does
    # instead of sklearn warning on every such batch (FBetaMulti does not pass this through).
    f2.kwargs["zero_division"] = 0
    builder = resolve_arch(settings.train_arch)
    metrics = [partial(accuracy_multi, thresh=settings.threshold), f2]
    if settings.train_weights:
        return _learner_from_file(dls, builder, settings, metrics=metrics, workdir=workdir)
    try:
        return vision_learner(dls, builder, pretrained=settings.train_pretrained, metrics=metrics, path=workdir)
    except (OSError, RuntimeError) as exc:  # urllib's URLError/HTTPError are OSErrors
        if not settings.train_pretrained or not _is_download_failure(exc):
            raise
        url = weights_url(builder)
        what = url or f"torchvision's default weights for {settings.train_arch}"
        raise WeightsUnavailable(
            f"cannot download the ImageNet weights for {settings.train_arch} ({what}): {_reason(exc)}; "
            + WAYS_OUT.format(arch=settings.train_arch)
        ) from None


def _is_download_failure(exc: BaseException) -> bool:
    import urllib.error

    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)) or (
        isinstance(exc, RuntimeError) and "download" in str(exc).lower())


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return one_line(str(reason if reason is not None else exc)).strip("<>") or type(exc).__name__


def _learner_from_file(dls, builder, settings: Settings, *, metrics, workdir: Path):
    """fastai's ``vision_learner`` with the body cut (``create_body``, fastai's own cut for the
    architecture) from a torchvision model holding the local state dict, frozen as a pretrained
    learner is. The learner keeps the architecture itself as ``arch``, so its export is like any other."""
    from fastai.vision.all import create_body, model_meta, vision_learner

    state = load_state_dict(settings.train_weights, settings.train_arch)
    source = builder(weights=None)
    try:
        source.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise WeightsUnavailable(
            f"STILLTAG_TRAIN_WEIGHTS={settings.train_weights} is not a state dict for {settings.train_arch}: "
            f"{one_line(first[0])[:200]}; use torchvision's {settings.train_arch} weights or change STILLTAG_TRAIN_ARCH"
        ) from None
    learn = vision_learner(dls, builder, pretrained=False, metrics=metrics, path=workdir)
    body = create_body(source, pretrained=True, cut=model_meta.get(builder, {}).get("cut"))
    learn.model[0].load_state_dict(body.state_dict())
    learn.freeze()  # as vision_learner does for pretrained weights: the head trains first
    learn.pretrained = True
    return learn


def lr_find_iterations(n_batches: int) -> int:
    """fastai's 100 steps, but never much more than two epochs of a small dataset."""
    return max(LR_FIND_MIN_IT, min(LR_FIND_MAX_IT, 2 * n_batches))


def find_lr(learn) -> tuple[float, dict]:
    from fastai.callback.schedule import valley

    with learn.no_bar(), learn.no_logging():
        suggestion = learn.lr_find(num_it=lr_find_iterations(len(learn.dls.train)), suggest_funcs=(valley,),
                                   show_plot=False)
    curve = {"lrs": [float(v) for v in learn.recorder.lrs], "losses": [float(v) for v in learn.recorder.losses]}
    return clamp_lr(getattr(suggestion, "valley", None)), curve


def train(dataset: Dataset, settings: Settings, *, workdir: Path, progress: Progress | None = None) -> TrainingRun:
    """Fit the recipe on ``dataset.train`` (``dataset.valid`` picks the epoch) and export it."""
    import torch
    from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback

    started = time.monotonic()
    device = torch.device(resolve_device(settings.device))
    workdir.mkdir(parents=True, exist_ok=True)
    dls = build_dataloaders(dataset, settings, device=device)
    learn = build_learner(dls, settings, workdir=workdir)
    if progress:
        progress("stage", {"name": "lr_find", "detail": f"{settings.train_arch} on {device.type}"})
    lr, curve = find_lr(learn)
    log.info("lr_find suggests %.2e%s", lr, f"; using STILLTAG_TRAIN_LR={settings.train_lr:g}" if settings.train_lr else "")
    lr = settings.train_lr or lr
    if device.type == "cuda":
        learn = learn.to_fp16()

    epochs: list[dict] = []
    batch_losses: list[dict] = []
    monitor = make_monitor(progress, epochs, batch_losses)
    # One SaveModelCallback across both cycles keeps the best epoch of the whole run, frozen or not.
    best = SaveModelCallback(monitor="valid_loss", fname=BEST_MODEL_NAME, reset_on_fit=False)
    patience = settings.train_patience
    with learn.no_bar(), learn.no_logging():
        if settings.train_epochs_frozen:
            monitor.phase = "frozen"
            if progress:
                progress("stage", {"name": "frozen", "detail": f"{settings.train_epochs_frozen} epoch(s) at {lr:.2e}"})
            learn.fit_one_cycle(settings.train_epochs_frozen, lr,
                                cbs=[monitor, best, EarlyStoppingCallback(monitor="valid_loss", patience=patience)])
        if settings.train_epochs_unfrozen:
            learn.unfreeze()
            hi = lr / UNFROZEN_LR_DIVISOR
            monitor.phase = "unfrozen"
            if progress:
                progress("stage", {"name": "unfrozen",
                                   "detail": f"{settings.train_epochs_unfrozen} epoch(s) at slice({hi / LR_MULT:.1e}, {hi:.1e})"})
            learn.fit_one_cycle(settings.train_epochs_unfrozen, slice(hi / LR_MULT, hi),
                                cbs=[monitor, best, EarlyStoppingCallback(monitor="valid_loss", patience=patience)])
    if device.type == "cuda":
        learn = learn.to_fp32()  # the artifact must load anywhere, CPU included
    export_path = workdir / "export.pkl"
    learn.export(export_path)
    return TrainingRun(learn=learn, export_path=export_path, lr=lr, lr_find=curve, epochs=epochs,
                       batch_losses=batch_losses, seconds=time.monotonic() - started, device=device.type)
