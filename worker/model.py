"""Predict: the exported fastai learner, loaded once per process, run on batches of pixels.

Only the learner's model, vocabulary, activation and validation transforms are used at tag
time: preprocessing is read from the learner (size, resize method, normalisation), never
hard-coded, so the worker gives the same probabilities as ``learn.predict``.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np

from shared.learner_pickle import arch_name, resolve_device  # noqa: F401 (resolve_device: worker API)
from worker.preprocess import Preprocessing

log = logging.getLogger(__name__)


def _load(path: Path, device: str):
    # The caller has checked the sha256 already. load_learner finds names that moved since export.
    from shared.learner_pickle import load_learner

    return load_learner(path, cpu=device == "cpu")


def preprocessing_of(learn) -> tuple[Preprocessing, tuple[list[float], list[float]] | None, float]:
    """The learner's validation pipeline: resize, and (mean, std) and divisor of its batch transforms."""
    from fastai.data.transforms import IntToFloatTensor, Normalize
    from fastai.vision.augment import AffineCoordTfm, Resize, ResizeMethod
    from fastai.vision.core import ToTensor

    prep = None
    for tfm in learn.dls.after_item.fs:
        if isinstance(tfm, Resize):
            h, w = tfm.size
            method = {ResizeMethod.Squish: "squish", ResizeMethod.Crop: "crop"}.get(tfm.method)
            if method is None:
                raise ValueError(f"the learner resizes with method {tfm.method!r}; the worker supports squish and crop")
            prep = Preprocessing(height=int(h), width=int(w), method=method, resample=int(tfm.mode))
        elif not isinstance(tfm, ToTensor):
            raise ValueError(f"the learner's item transform {tfm!r} is not supported by the tagging worker")
    if prep is None:
        raise ValueError("the learner has no Resize item transform, so images would reach it at any size")
    stats, div = None, 1.0
    for tfm in learn.dls.after_batch.fs:
        if getattr(tfm, "split_idx", None) == 0:  # training-only augmentation (lighting)
            continue
        if isinstance(tfm, AffineCoordTfm) and getattr(tfm, "size", None) is None:
            continue  # aug_transforms' flips/rotations/zooms: the identity at validation
        if isinstance(tfm, IntToFloatTensor):
            div = float(tfm.div)
        elif isinstance(tfm, Normalize):
            stats = (tfm.mean.flatten().tolist(), tfm.std.flatten().tolist())
        else:
            raise ValueError(f"the learner's batch transform {tfm!r} is not supported by the tagging worker")
    return prep, stats, div


class TaggingModel:
    """One loaded learner: call ``predict(pixels)`` with a ``(n, h, w, 3)`` uint8 array."""

    def __init__(self, learn, *, version: str, device: str):
        import torch

        self.version = version
        self.device = torch.device(device)
        self.vocab = [str(t) for t in learn.dls.vocab]
        self.arch = arch_name(learn)
        self.prep, stats, self.div = preprocessing_of(learn)
        self.activation = getattr(learn.loss_func, "activation", torch.sigmoid)
        self.model = learn.model.eval().to(self.device).to(memory_format=torch.channels_last)
        if stats is None:
            self.mean = self.std = None
        else:
            self.mean = torch.tensor(stats[0], device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(stats[1], device=self.device).view(1, -1, 1, 1)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = (
            (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if self.cuda else None
        )

    @classmethod
    def load(cls, path: Path, *, version: str, device: str) -> TaggingModel:
        return cls(_load(path, device), version=version, device=device)

    def to_input(self, pixels: np.ndarray):
        """uint8 NHWC → normalised float NCHW (channels-last memory) on the model's device."""
        import torch

        x = torch.from_numpy(pixels)
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(self.div)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x):
        """The bare model on a prepared input: probabilities as a float tensor."""
        import torch

        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast("cuda", dtype=self.amp_dtype):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            return self.activation(logits.float())

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities, one row per image, one column per tag of ``vocab``."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.vocab)), dtype=np.float32)
        return self.forward(self.to_input(pixels)).cpu().numpy()

    def release(self) -> None:
        """Free the model's memory (host and GPU) before the next one is used."""
        import torch

        self.model = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS falls after a switch."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass
