"""The tagging service inside one worker process: the champion model and the four stages.

fetch → decode (``fetch`` and the decode it gives, per image, in the threads of
worker/prepare_pool.py) → predict (one forward pass per batch) → persist (one transaction) →
publish. ``Tagger`` is made once per process, after any fork; the consumer (worker/consumer.py)
feeds it batches.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared import parity, registry
from shared.config import Settings, get_settings
from shared.db import transaction
from shared.runtime import Runtime
from shared.stores import is_local
from worker import metrics
from worker.model import Staged, TaggingModel, resolve_device, resolve_precision
from worker.prepare_pool import Fetched, PreparePool, finish
from worker.preprocess import ImageRejected, Preprocessing, decode_image, is_jpeg
from worker.results import ImageResult, failed, persist_batch, publish_events, select_tags, tagged

log = logging.getLogger(__name__)

NO_CHAMPION_POLL_S = 2.0  # how often a worker with no model looks for one
FAILED_MODEL_RETRY_S = 300.0  # a champion that failed to load (an S3 blip?) is tried again after this


def upload_fill(settings: Settings, *, gpu: bool) -> int:
    """``STILLTAG_UPLOAD_FILL``: how far a batch carrying uploads is topped up with backfill.

    0 (the default) picks by device. On a GPU a forward pass at max_batch takes about as long as
    a small one, so backfill fills the batch. On a CPU the forward pass grows with every image: an
    upload's batch holds at most a quarter of max_batch, so an upload behind backfill waits for
    the batch in the forward pass and a short one of its own, and backfill loses only a batch's
    fixed cost per upload batch.
    """
    if settings.upload_fill:
        return min(settings.upload_fill, settings.max_batch)
    return settings.max_batch if gpu else max(1, settings.max_batch // 4)


class NoChampion(RuntimeError):
    pass


@dataclass
class Prepared:
    """One image after fetch + decode: pixels for ``prep``, or the reason it cannot be tagged."""

    image_id: int
    prep: Preprocessing
    pixels: np.ndarray | None = None
    error: str | None = None
    jpeg: bytes | None = None  # gpu_decode: the JPEG's bytes, decoded with its batch on the device


@dataclass
class StagedBatch:
    """A batch's input already on its way to the device, made by ``Tagger.stage_batch``."""

    model: TaggingModel
    image_ids: list[int]
    staged: Staged


class Tagger:
    def __init__(self, settings: Settings, *, runtime: Runtime | None = None):
        self.settings = settings
        self.runtime = runtime or Runtime(settings)
        self.device = resolve_device(settings.device)
        self.model: TaggingModel | None = None
        self._cutoffs: tuple[str, np.ndarray | float] | None = None  # (model version, threshold(s) to keep tags at)
        self._last_poll = 0.0
        self._failed_version: str | None = None  # a champion that would not load, not retried until
        self._failed_at = 0.0  # ... FAILED_MODEL_RETRY_S after this (monotonic)
        self._parity_records: dict[str, dict] = {}  # the current model's parity records, as loaded
        fetch_ahead = not is_local(settings.image_url)  # S3: fetch threads; a local file: the decode thread reads it
        self.pool: PreparePool[Prepared] = PreparePool(settings, fetch_ahead=fetch_ahead)
        # Uploads fetch and decode in a pool of their own, so that one never waits behind the
        # backfill this worker holds: where decoding is the bottleneck (a GPU, or a CPU with a fast
        # forward pass) that queue is a whole batch or two of decodes long.
        self.upload_pool: PreparePool[Prepared] = PreparePool(settings, fetch_ahead=fetch_ahead, name="prepare-upload")
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # On a GPU a batch is staged (pinned memory, copy on a side stream) by this thread as soon as
        # it is decoded, while the batch before it is in the forward pass. On a CPU there is no copy
        # to overlap, and a second thread would only take cores from the forward pass: staged inline.
        self.stager = (ThreadPoolExecutor(1, thread_name_prefix="stage") if self.device.startswith("cuda")
                       else None)
        self.upload_fill = upload_fill(settings, gpu=self.device.startswith("cuda"))

    # --- model ----------------------------------------------------------------------------
    def load_champion(self) -> TaggingModel:
        """Load the champion (sha256-checked) and make it current."""
        with self.runtime.sessions() as session:
            record = registry.champion(session=session)
        if record is None:
            raise NoChampion("no champion model; register one with `stilltag models register PATH --promote`")
        path = registry.fetch_artifact(store=self.runtime.model_store, record=record, cache_dir=self.runtime.model_cache_dir)
        records = parity.recorded(record.metrics)
        t0 = time.perf_counter()
        model = TaggingModel.load(path, version=record.version, device=self.device,
                                  precision=self.settings.inference_precision,
                                  compile_mode=self.settings.inference_compile,
                                  compile_batch=(self.settings.max_batch, self.upload_fill),  # full, upload's
                                  parity_records=records,
                                  cpu_streams=self.settings.cpu_streams, cpu_sub_batch=self.settings.cpu_sub_batch)
        log.info("loaded model %s (%s, %d tags) on %s at %s (%s), %s, in %.1f s", record.version, model.arch,
                 len(model.vocab), self.device, model.precision, model.precision_reason, model.describe_forward(),
                 time.perf_counter() - t0)
        self._cutoffs = (model.version, self.cutoffs_for(record, model.vocab))
        self._parity_records = records  # what auto decided on (maybe_switch)
        old, self.model = self.model, model
        metrics.set_model(model.version, model.arch, str(self.device), model.precision)
        if old is not None:
            old.release()
        return model

    def cutoffs_for(self, record: registry.ModelVersion, vocab: list[str]) -> np.ndarray | float:
        """``STILLTAG_THRESHOLD``, or with ``STILLTAG_THRESHOLDS=per_tag`` the version's own threshold
        per tag (tags without one, or a version without any, at ``STILLTAG_THRESHOLD``)."""
        if self.settings.thresholds != "per_tag":
            return self.settings.threshold
        per_tag = registry.tag_thresholds(record)
        if per_tag is None:
            log.warning("model %s has no per-tag thresholds (registered by hand?); using STILLTAG_THRESHOLD=%g",
                        record.version, self.settings.threshold)
            return self.settings.threshold
        return np.array([per_tag.get(t, self.settings.threshold) for t in vocab], dtype=np.float32)

    def wait_for_champion(self, stop=lambda: False) -> TaggingModel | None:
        """Block until a champion exists (a fresh install has none yet) and load it."""
        warned = False
        while not stop():
            try:
                return self.load_champion()
            except NoChampion as exc:
                if not warned:
                    log.warning("%s; waiting for one", exc)
                    warned = True
                time.sleep(NO_CHAMPION_POLL_S)
        return None

    def maybe_switch(self, *, force: bool = False) -> None:
        """Between batches: follow the registry's champion, and the precision ``auto`` gives it when
        its parity records change (``stilltag models measure``). A model that fails to load is not used."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.settings.model_poll_s:
            return
        self._last_poll = now
        try:
            with self.runtime.sessions() as session:
                polled = registry.champion_parity(session=session)
        except Exception:
            log.exception("could not read the champion from the database; keeping %s", self.model and self.model.version)
            return
        if polled is None:
            return
        version, records = polled
        current = self.model
        same = current is not None and version == current.version
        wanted = self._new_precision(records) if same else None
        if same and wanted is None:
            return
        if version == self._failed_version and now - self._failed_at < FAILED_MODEL_RETRY_S:
            return
        old = f"{current.version} at {current.precision}" if current else None
        if wanted is not None:
            log.info("model %s's parity record changed: %s now (%s); loading it again", version, *wanted)
        try:
            model = self.load_champion()
            if not same:
                metrics.MODEL_SWITCHES.inc()
            log.info("%s model %s → %s at %s", "re-served" if same else "switched", old, version, model.precision)
        except Exception as exc:
            log.error("%s %s failed to load, keeping %s (trying again in %.0f s): %s",
                      "re-serving" if same else "new champion", version, old, FAILED_MODEL_RETRY_S, exc)
            self._failed_version, self._failed_at = version, now

    def _new_precision(self, records: dict[str, dict]) -> tuple[str, str] | None:
        """The precision ``auto`` now gives the current model, and why, where its parity records
        changed since it was loaded (``stilltag models measure``) and with them that precision; else None."""
        if records == self._parity_records:
            return None
        wanted = resolve_precision(self.settings.inference_precision, str(self.device), parity_records=records)
        if wanted[0] == self.loaded.precision:
            self._parity_records = records  # the same precision: nothing to do, and not asked again
            return None
        return wanted

    # --- stages ---------------------------------------------------------------------------
    def prepare(self, image_id: int, prep: Preprocessing) -> Prepared:
        """Fetch + decode one image in this thread; never raises (a bad image is a result, not an error)."""
        return finish(self.fetch(image_id, prep))

    def fetch(self, image_id: int, prep: Preprocessing) -> Fetched[Prepared]:
        """Fetch one image: its ``Prepared`` where nothing is left to decode on the CPU (the reason it
        cannot be tagged, or a JPEG for the device), else its decode, for a decode thread. Never raises."""
        t0 = time.perf_counter()
        try:
            data = self.runtime.images.fetch(image_id)
            if self._device_decode(prep) and is_jpeg(data, max_pixels=self.settings.max_image_pixels):
                metrics.DECODE.observe(time.perf_counter() - t0)
                return Prepared(image_id, prep, jpeg=data)
        except Exception as exc:  # missing object, store down, ...: this image fails, not the batch
            return _unprepared(image_id, prep, exc)
        fetched_s = time.perf_counter() - t0

        def decode_it() -> Prepared:  # the wait for a decode thread is queueing, not decoding: not timed
            t1 = time.perf_counter()
            try:
                pixels = decode(self.settings, data, prep)
            except Exception as exc:
                return _unprepared(image_id, prep, exc)
            metrics.DECODE.observe(fetched_s + time.perf_counter() - t1)
            return Prepared(image_id, prep, pixels=pixels)

        return decode_it

    @property
    def loaded(self) -> TaggingModel:
        """The current model; tagging before one is loaded is a bug."""
        if self.model is None:
            raise NoChampion("no model loaded yet")
        return self.model

    def _device_decode(self, prep: Preprocessing) -> bool:
        # The device squishes with the bilinear filter of the CPU path's torchvision decoder.
        return (self.settings.gpu_decode and self.device.startswith("cuda") and prep.method == "squish"
                and prep.resample == Image.Resampling.BILINEAR)

    def submit(self, image_id: int, *, upload: bool = False) -> Future:
        """Fetch and decode an image in the background; ``upload``: in the uploads' own pool."""
        prep = self.loaded.prep
        return (self.upload_pool if upload else self.pool).submit(lambda: self.fetch(image_id, prep))

    def stage_batch(self, prepared: list[Prepared]) -> StagedBatch | None:
        """The batch's input on its way to the device (JPEGs decoded there with ``gpu_decode``)."""
        model = self.loaded
        ok = [p for p in prepared if p.prep == model.prep and (p.pixels is not None or p.jpeg is not None)]
        if not ok:
            return None
        jpegs = [p for p in ok if p.jpeg is not None]
        if jpegs:  # batched on the device; pixels from the CPU decoder join them there
            on_device = self._decode_on_device(model, jpegs)
            ok = [p for p in ok if p.image_id in on_device or p.pixels is not None]
            if not ok:
                return None
            staged = model.stage_mixed([on_device.get(p.image_id, p.pixels) for p in ok])
        else:
            staged = model.stage(np.stack([p.pixels for p in ok if p.pixels is not None]))
        return StagedBatch(model, [p.image_id for p in ok], staged)

    def _decode_on_device(self, model: TaggingModel, jpegs: list[Prepared]) -> dict:
        """image id → its squished tensor on the device. The batched decode gives nothing when one
        JPEG in it fails; then each is decoded alone there, and one that fails alone is decoded on
        the CPU (in place: its pixels, or the reason it cannot be tagged)."""
        try:
            return dict(zip([p.image_id for p in jpegs], model.decode_jpegs([p.jpeg or b"" for p in jpegs]),
                            strict=True))
        except Exception as exc:
            log.warning("decoding %d JPEGs on the device failed (%s); decoding them one by one", len(jpegs), exc)
        on_device = {}
        for p in jpegs:
            try:
                (on_device[p.image_id],) = model.decode_jpegs([p.jpeg or b""])
            except Exception:
                cpu = self._decode_on_cpu(p)
                p.jpeg, p.pixels, p.error = None, cpu.pixels, cpu.error
        return on_device

    def stage_async(self, futures: list[Future]) -> Future | None:
        """``stage_batch`` once the batch's images are decoded, in the stage thread (GPU only)."""
        if self.stager is None:
            return None

        def stage() -> StagedBatch | None:
            try:
                return self.stage_batch([f.result() for f in futures])
            except Exception:  # the inference thread stages it again, and fails the batch if it must
                log.exception("staging a batch ahead failed")
                return None

        return self.stager.submit(stage)

    def predict(self, prepared: list[Prepared], staged: StagedBatch | None = None) -> list[ImageResult]:
        """One forward pass for the images that decoded; the others fail with their reason."""
        model = self.loaded
        prepared = [p if p.prep == model.prep else self.prepare(p.image_id, model.prep) for p in prepared]
        ok = [p for p in prepared if p.pixels is not None or p.jpeg is not None]
        if staged is not None and (staged.model is not model or staged.image_ids != [p.image_id for p in ok]):
            staged = None  # staged for another model (a switch in between): stage again
        if staged is None and any(p.jpeg is not None for p in ok):
            staged = self.stage_batch(prepared)  # a JPEG the device cannot decode is decoded on the CPU there
            ok = [p for p in prepared if p.pixels is not None or p.jpeg is not None]
        if ok:
            with metrics.INFERENCE.time():
                probs = model.predict(staged.staged if staged is not None
                                      else np.stack([p.pixels for p in ok if p.pixels is not None]))
        cut = self._cutoffs[1] if self._cutoffs and self._cutoffs[0] == model.version else self.settings.threshold
        by_id = {}
        for i, p in enumerate(ok):
            by_id[p.image_id] = tagged(
                p.image_id, select_tags(probs[i], model.vocab, threshold=cut, top_k=self.settings.top_k)
            )
        for p in prepared:
            if p.pixels is None and p.jpeg is None:
                by_id[p.image_id] = failed(p.image_id, p.error or "not decoded")
        return [by_id[p.image_id] for p in prepared]

    def persist(self, results: list[ImageResult]) -> None:
        """One transaction for the batch, then the events (after commit)."""
        version = self.loaded.version
        with metrics.PERSIST.time():
            with transaction(self.runtime.sessions) as session:
                persist_batch(session=session, model_version=version, results=results)
            publish_events(self.runtime.events, model_version=version, results=results)
        metrics.BATCHES.inc()
        metrics.BATCH_SIZE.observe(len(results))
        for result in results:
            metrics.IMAGES.labels(result.state).inc()

    def _decode_on_cpu(self, p: Prepared) -> Prepared:
        try:
            return Prepared(p.image_id, p.prep, pixels=decode(self.settings, p.jpeg or b"", p.prep))
        except ImageRejected as exc:
            return Prepared(p.image_id, p.prep, error=str(exc))

    def run_batch(self, prepared: list[Prepared], staged: StagedBatch | None = None) -> list[ImageResult]:
        unique = list({p.image_id: p for p in reversed(prepared)}.values())[::-1]  # a duplicate is tagged once
        if len(unique) != len(prepared):
            staged = None
        results = self.predict(unique, staged)
        self.persist(results)
        return results

    def tag_ids(self, image_ids: list[int]) -> list[ImageResult]:
        """All stages for a list of IDs, synchronously (the stock Celery task and tests use it)."""
        futures = [self.submit(i) for i in image_ids]
        return self.run_batch([f.result() for f in futures])

    def close(self) -> None:
        self.pool.shutdown()
        self.upload_pool.shutdown()
        if self.stager is not None:
            self.stager.shutdown(wait=False, cancel_futures=True)
        if self.model is not None:
            self.model.release()
        self.runtime.close()


def decode(settings: Settings, data: bytes, prep: Preprocessing) -> np.ndarray:
    """``decode_image`` with the worker's pixel cap and JPEG decoder."""
    return decode_image(data, prep, max_pixels=settings.max_image_pixels, jpeg_decoder=settings.jpeg_decoder)


def _unprepared(image_id: int, prep: Preprocessing, exc: Exception) -> Prepared:
    """The ``Prepared`` of an image that cannot be tagged, with the reason."""
    if isinstance(exc, ImageRejected):
        return Prepared(image_id, prep, error=str(exc))
    return Prepared(image_id, prep, error=f"{type(exc).__name__}: {exc}")


_process_tagger: Tagger | None = None


def tag_one(image_id: int) -> str:
    """``stilltag.tag`` under a stock Celery worker: one image, the process's preloaded Tagger."""
    global _process_tagger
    if _process_tagger is None:
        _process_tagger = Tagger(get_settings())
        _process_tagger.load_champion()
    _process_tagger.maybe_switch()
    (result,) = _process_tagger.tag_ids([image_id])
    return result.state
