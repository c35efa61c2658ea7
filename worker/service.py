"""The tagging service inside one worker process: the champion model and the four stages.

fetch → decode (``prepare``, in a thread pool, per image) → predict (one forward pass per
batch) → persist (one transaction) → publish. ``Tagger`` is made once per process, after any
fork; the consumer (worker/consumer.py) feeds it batches.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shared import registry
from shared.config import Settings, get_settings
from shared.db import transaction
from shared.runtime import Runtime
from worker import metrics
from worker.model import TaggingModel, resolve_device
from worker.preprocess import ImageRejected, Preprocessing, decode_image
from worker.results import ImageResult, failed, persist_batch, publish_events, select_tags, tagged

log = logging.getLogger(__name__)

NO_CHAMPION_POLL_S = 2.0  # how often a worker with no model looks for one
FAILED_MODEL_RETRY_S = 300.0  # a champion that failed to load (an S3 blip?) is tried again after this


class NoChampion(RuntimeError):
    pass


@dataclass
class Prepared:
    """One image after fetch + decode: pixels for ``prep``, or the reason it cannot be tagged."""

    image_id: int
    prep: Preprocessing
    pixels: np.ndarray | None = None
    error: str | None = None


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
        workers = settings.fetch_concurrency + (settings.decode_workers or os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")

    # --- model ----------------------------------------------------------------------------
    def load_champion(self) -> TaggingModel:
        """Load the champion (sha256-checked) and make it current."""
        with self.runtime.sessions() as session:
            record = registry.champion(session=session)
        if record is None:
            raise NoChampion("no champion model; register one with `stilltag models register PATH --promote`")
        path = registry.fetch_artifact(store=self.runtime.model_store, record=record, cache_dir=self.runtime.model_cache_dir)
        t0 = time.perf_counter()
        model = TaggingModel.load(path, version=record.version, device=self.device)
        log.info("loaded model %s (%s, %d tags) on %s in %.1f s", record.version, model.arch, len(model.vocab),
                 self.device, time.perf_counter() - t0)
        self._cutoffs = (model.version, self.cutoffs_for(record, model.vocab))
        old, self.model = self.model, model
        metrics.set_model(model.version, model.arch, str(self.device))
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
        """Between batches: follow the registry's champion. A model that fails to load is not used."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.settings.model_poll_s:
            return
        self._last_poll = now
        try:
            with self.runtime.sessions() as session:
                version = registry.champion_version(session=session)
        except Exception:
            log.exception("could not read the champion from the database; keeping %s", self.model and self.model.version)
            return
        if version is None or (self.model and version == self.model.version):
            return
        if version == self._failed_version and now - self._failed_at < FAILED_MODEL_RETRY_S:
            return
        old = self.model.version if self.model else None
        try:
            self.load_champion()
            metrics.MODEL_SWITCHES.inc()
            log.info("switched model %s → %s", old, version)
        except Exception as exc:
            log.error("new champion %s failed to load, keeping %s (trying again in %.0f s): %s", version, old,
                      FAILED_MODEL_RETRY_S, exc)
            self._failed_version, self._failed_at = version, now

    # --- stages ---------------------------------------------------------------------------
    def prepare(self, image_id: int, prep: Preprocessing) -> Prepared:
        """Fetch + decode one image; never raises (a bad image is a result, not an error)."""
        try:
            with metrics.DECODE.time():
                data = self.runtime.images.fetch(image_id)
                pixels = decode_image(data, prep, max_pixels=self.settings.max_image_pixels)
            return Prepared(image_id, prep, pixels=pixels)
        except ImageRejected as exc:
            return Prepared(image_id, prep, error=str(exc))
        except Exception as exc:  # missing object, store down, ...: this image fails, not the batch
            return Prepared(image_id, prep, error=f"{type(exc).__name__}: {exc}")

    @property
    def loaded(self) -> TaggingModel:
        """The current model; tagging before one is loaded is a bug."""
        if self.model is None:
            raise NoChampion("no model loaded yet")
        return self.model

    def submit(self, image_id: int) -> Future:
        return self.pool.submit(self.prepare, image_id, self.loaded.prep)

    def predict(self, prepared: list[Prepared]) -> list[ImageResult]:
        """One forward pass for the images that decoded; the others fail with their reason."""
        model = self.loaded
        prepared = [p if p.prep == model.prep else self.prepare(p.image_id, model.prep) for p in prepared]
        ok = [p for p in prepared if p.pixels is not None]
        if ok:
            with metrics.INFERENCE.time():
                probs = model.predict(np.stack([p.pixels for p in ok if p.pixels is not None]))
        cut = self._cutoffs[1] if self._cutoffs and self._cutoffs[0] == model.version else self.settings.threshold
        by_id = {}
        for i, p in enumerate(ok):
            by_id[p.image_id] = tagged(
                p.image_id, select_tags(probs[i], model.vocab, threshold=cut, top_k=self.settings.top_k)
            )
        for p in prepared:
            if p.pixels is None:
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

    def run_batch(self, prepared: list[Prepared]) -> list[ImageResult]:
        unique = list({p.image_id: p for p in reversed(prepared)}.values())[::-1]  # a duplicate is tagged once
        results = self.predict(unique)
        self.persist(results)
        return results

    def tag_ids(self, image_ids: list[int]) -> list[ImageResult]:
        """All stages for a list of IDs, synchronously (the stock Celery task and tests use it)."""
        futures = [self.submit(i) for i in image_ids]
        return self.run_batch([f.result() for f in futures])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.model is not None:
            self.model.release()
        self.runtime.close()


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
