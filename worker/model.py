"""Predict: the exported fastai learner, loaded once per process, run on batches of pixels.

Only the learner's model, vocabulary, activation and validation transforms are used at tag
time: preprocessing is read from the learner (size, resize method, normalisation), never
hard-coded, so the worker gives the same probabilities as ``learn.predict``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared import parity
from shared.learner_pickle import arch_name, resolve_device  # noqa: F401 (resolve_device: worker API)
from worker.preprocess import Preprocessing, decode_jpegs, squish_tensor

log = logging.getLogger(__name__)


def _load(path: Path, device: str):
    # The caller has checked the sha256 already. load_learner finds names that moved since export.
    from shared.learner_pickle import load_learner

    # Loaded on the CPU whatever the device, then moved there (TaggingModel): with cpu=False fastai
    # loads onto its default device, cuda:0, which costs a context and memory there for cuda:N.
    return load_learner(path, cpu=True)


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


PRECISIONS = ("fp32", "bf16", "fp16")  # what "auto" resolves to, one of these
# Flags of a CPU that computes bf16 natively (AVX512-BF16, AMX); without them oneDNN emulates
# bf16 and autocast is slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU advertises native bf16 (Linux ``/proc/cpuinfo`` flags; elsewhere: no)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def gpu_has_bf16() -> bool:
    """Whether this machine's GPU computes bf16 (Ampere and later)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: str, *, parity_records: dict[str, dict] | None = None,
                      native_bf16: bool | None = None) -> tuple[str, str]:
    """``STILLTAG_INFERENCE_PRECISION`` for this model on this device, and why, in a few words.

    ``auto`` serves a reduced precision only where the model's own parity record for it
    (``parity_records``, by precision, measured by the retrain that made it: ``shared.parity``) is
    within the limits, and fp32 otherwise:
    - on a GPU, fp16 (against fp32 it was ten times closer than bf16 in every parity run: README,
      "Precision"), else bf16 where the GPU computes it;
    - on a CPU, bf16 where the CPU computes it natively (without, oneDNN emulates it, slower than fp32).
    Whether a precision is close enough to fp32 depends on the model: on one CPU bf16 held for the
    demo's learner and failed for the benchmark's. ``native_bf16``: given by tests; read from the
    device when None.
    """
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"inference precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
        return precision, "set"
    records = parity_records or {}
    gpu = device.startswith("cuda")
    native = (gpu_has_bf16() if gpu else cpu_has_native_bf16()) if native_bf16 is None else native_bf16
    if gpu:
        candidates = ["fp16", "bf16"] if native else ["fp16"]
    elif native:
        candidates = ["bf16"]
    else:
        return "fp32", "auto: this CPU has no native bf16"
    where = "a GPU" if gpu else "native bf16"
    for reduced in candidates:
        if parity.within_limits(records.get(reduced)):
            figures = parity.describe(records[reduced])
            return reduced, f"auto: {where}, and the model's {reduced} parity is within the limits ({figures})"
    if not any(c in records for c in candidates):
        return "fp32", (f"auto: the model has no {' or '.join(candidates)} parity record (registered by hand?"
                        " `stilltag models measure VERSION` measures it)")
    outside = [c for c in candidates if c in records]
    detail = ("; ".join(f"{c}: {parity.describe(records[c])}" for c in outside) if len(outside) > 1
              else parity.describe(records[outside[0]]))
    return "fp32", f"auto: the model's {' and '.join(outside)} parity is outside the limits ({detail})"


@dataclass
class Staged:
    """A batch on its way to the model: normalised input on the model's device, and (CUDA) the
    event that marks the end of its copy on the side stream."""

    x: Any
    ready: Any = None  # torch.cuda.Event, or None when the input is ready as it is


class TaggingModel:
    """One loaded learner: call ``predict(pixels)`` with a ``(n, h, w, 3)`` uint8 array."""

    def __init__(self, learn, *, version: str, device: str, precision: str = "fp32", compile_mode: str = "off",
                 compile_batch: int | tuple[int, ...] = 0, parity_records: dict[str, dict] | None = None,
                 cpu_streams: int = 1, cpu_sub_batch: int = 16):
        import torch

        self.version = version
        self.device = torch.device(device)
        self.vocab = [str(t) for t in learn.dls.vocab]
        self.arch = arch_name(learn)
        self.prep, stats, self.div = preprocessing_of(learn)
        self.activation = getattr(learn.loss_func, "activation", torch.sigmoid)
        self.model = learn.model.eval().to(self.device).to(memory_format=torch.channels_last)
        # fastai's (x / div - mean) / std as one multiply and one add per value, in place.
        mean = torch.tensor(stats[0] if stats else [0.0], device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(stats[1] if stats else [1.0], device=self.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1.0 / (self.div * std), -mean / std
        self.cuda = self.device.type == "cuda"
        self.precision, self.precision_reason = resolve_precision(precision, str(self.device), parity_records=parity_records)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # The host → device copy of the next batch runs on its own stream, so it overlaps the forward
        # pass of the one before it (worker/service.py stages a batch as soon as it is decoded).
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # gpu_decode's JPEG decodes and squishes run on a stream of their own (decode_jpegs).
        self.decode_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._lock = threading.Lock()  # release() against the compile thread's runner
        self._released = False
        self.runner = self.model  # the compiled model replaces it once compiled and warmed up
        # The batch sizes the compiled model runs (compiled and warmed up at each, in the background).
        sizes = compile_batch if isinstance(compile_batch, tuple) else (compile_batch,)
        self.compile_sizes = tuple(sorted({s for s in sizes if s > 0})) or (1,)
        self.compiled = threading.Event()
        self.compile_mode = compile_mode
        # On a CPU, sub-batches run side by side, each on torch's threads (README, "Benchmarks": the
        # same cores give more images a second than one pass over the whole batch, and a decode
        # beside them holds up one sub-batch, not every layer of the whole one). Not with
        # torch.compile: its runner specialises on the batch size and is called from one thread.
        self.cpu_streams, self.cpu_sub_batch = cpu_streams, cpu_sub_batch
        self.streams = None
        if not self.cuda and compile_mode == "off" and cpu_streams > 1:
            self.streams = ThreadPoolExecutor(cpu_streams, thread_name_prefix="forward")
        if compile_mode == "off":
            self.compiled.set()
        else:
            threading.Thread(target=self._compile, name="compile", daemon=True).start()

    @classmethod
    def load(cls, path: Path, *, version: str, device: str, **options) -> TaggingModel:
        return cls(_load(path, device), version=version, device=device, **options)

    def _compile(self) -> None:
        """torch.compile in a thread: the eager model serves until the compiled one has run once, so
        a slow (or failing) compilation never holds up readiness."""
        import torch

        t0 = time.perf_counter()
        try:
            compiled = torch.compile(self.model, mode=None if self.compile_mode == "default" else self.compile_mode,
                                     dynamic=False)
            for batch in self.compile_sizes:
                x = torch.zeros(batch, 3, self.prep.height, self.prep.width, device=self.device)
                for _ in range(2):  # reduce-overhead records its CUDA graph on a later call
                    self._run(compiled, x.contiguous(memory_format=torch.channels_last))
            with self._lock:
                if self._released:  # switched away from while compiling: keep nothing of it
                    return
                self.runner = compiled
            log.info("model compiled (%s) in %.0f s", self.compile_mode, time.perf_counter() - t0)
        except Exception as exc:
            log.warning("torch.compile (%s) failed, the model runs uncompiled: %s: %s", self.compile_mode,
                        type(exc).__name__, exc)
        finally:
            self.compiled.set()

    def stage(self, pixels: np.ndarray) -> Staged:
        """uint8 NHWC → normalised float NCHW (channels-last memory) on the model's device.

        On CUDA the pixels go through pinned memory and a non-blocking copy on ``copy_stream``;
        on a CPU the streams are no-ops and the input is ready at once.
        """
        import torch

        x = torch.from_numpy(pixels)
        if self.copy_stream is None:
            return Staged(self._normalise(x))
        x = x.pin_memory()
        with torch.cuda.stream(self.copy_stream):
            x = self._normalise(x.to(self.device, non_blocking=True))
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return Staged(x, ready)

    def decode_jpegs(self, jpegs: list[bytes]) -> list:
        """JPEGs decoded in one batch on the model's device and squished to the model's size:
        ``(h, w, 3)`` uint8 tensors there (the filter of the CPU path's torchvision decoder).

        On CUDA, on ``decode_stream``, once everything queued there has run: nvjpeg writes on a
        stream of its own, which waits for nothing, into memory this stream may just have freed.
        Memory the forward pass frees (on its own stream) is never handed to this stream.
        ``stage_mixed`` orders the copy stream after it."""
        import torch

        stream = self.decode_stream
        if stream is None:
            return [squish_tensor(img, self.prep) for img in decode_jpegs(jpegs, device=str(self.device))]
        with torch.cuda.stream(stream):
            stream.synchronize()
            return [squish_tensor(img, self.prep) for img in decode_jpegs(jpegs, device=str(self.device))]

    def stage_mixed(self, items: list) -> Staged:
        """``stage`` for a batch of device tensors (``decode_jpegs``) and host pixels (numpy)."""
        import torch

        stream = self.copy_stream
        if stream is not None and self.decode_stream is not None:
            stream.wait_stream(self.decode_stream)  # the squishes have run before the stack reads them
            for item in items:
                if isinstance(item, torch.Tensor) and item.device.type == "cuda":
                    item.record_stream(stream)  # made on the decode stream, read on the copy stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            x = torch.stack([torch.as_tensor(i).to(self.device, non_blocking=True) for i in items])
            x = self._normalise(x)
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return Staged(x, ready)

    def _normalise(self, x):
        import torch

        # NHWC uint8 is NCHW in channels-last memory: one conversion pass into a channels-last
        # float tensor, then the normalisation in place (half the time of four passes and a copy).
        x = x.to(self.device).permute(0, 3, 1, 2)
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device, memory_format=torch.channels_last)
        return out.copy_(x).mul_(self.scale).add_(self.shift)

    def _wait(self, staged: Staged):
        import torch

        if staged.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(staged.ready)
            staged.x.record_stream(stream)  # made on the copy stream, used on this one
        return staged.x

    def to_input(self, pixels: np.ndarray):
        """``stage`` and wait for the copy: an input the current stream can use."""
        return self._wait(self.stage(pixels))

    def _run(self, module, x):
        import torch

        with torch.inference_mode():
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    logits = module(x)
            else:
                logits = module(x)
            return self.activation(logits.float())

    def forward(self, x):
        """The model on a prepared input (a tensor or a ``Staged``): probabilities as a float tensor.

        The compiled model runs only the batch sizes it was compiled and warmed up at
        (``compile_batch``: a full batch, and an upload's batch); any other size runs eagerly.
        torch.compile specialises on the batch size, and a new one recompiles in the forward pass:
        10–50 s on a 2-core CPU, which an upload in a small batch would wait for.

        On a CPU with ``cpu_streams`` above 1 the batch runs as sub-batches side by side
        (``_sub_batches``), and the probabilities are put back together in the batch's order."""
        if isinstance(x, Staged):
            x = self._wait(x)
        parts = self._sub_batches(x)
        if len(parts) > 1:
            import torch

            model = self.model  # read once: every sub-batch runs the model the batch started on
            return torch.cat(list(self.streams.map(lambda part: self._run(model, part), parts)))
        return self._run(self.runner if x.shape[0] in self.compile_sizes else self.model, x)

    def _sub_batches(self, x) -> list:
        """``x`` cut into the sub-batches the CPU streams run side by side: as even as they can be,
        enough to give every stream one, at most ``cpu_sub_batch`` each. One part without streams."""
        n = x.shape[0]
        if self.streams is None or n < 2:
            return [x]
        per_stream = -(-n // self.cpu_streams)
        count = self.cpu_streams * -(-per_stream // self.cpu_sub_batch)  # a multiple of the streams
        return list(x.tensor_split(min(count, n)))  # sizes within one of each other

    def describe_forward(self) -> str:
        """How the forward pass runs, for the worker's log."""
        if self.streams is None:
            return "whole batches"
        return f"sub-batches of at most {self.cpu_sub_batch}, {self.cpu_streams} side by side"

    def predict(self, pixels: np.ndarray | Staged) -> np.ndarray:
        """Probabilities, one row per image, one column per tag of ``vocab``."""
        if isinstance(pixels, np.ndarray) and len(pixels) == 0:
            return np.zeros((0, len(self.vocab)), dtype=np.float32)
        staged = pixels if isinstance(pixels, Staged) else self.stage(pixels)
        return self.forward(staged).cpu().numpy()

    def release(self) -> None:
        """Free the model's memory (host and GPU) before the next one is used."""
        import torch

        with self._lock:
            self._released = True
            self.model = self.runner = None
        if self.streams is not None:
            self.streams.shutdown(wait=True)
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
