"""A tagging worker's ``auto`` precision follows each champion's own bf16 parity record (on a CPU
with native bf16), switching with the champion, and operators see it in ``stilltag_model_info``."""

import numpy as np
import pytest
from prometheus_client import REGISTRY

from shared import registry
from shared.config import Settings
from shared.db import transaction
from shared.migrate import upgrade
from worker import model as model_module
from worker.service import Tagger

pytestmark = pytest.mark.integration

WITHIN = {"max_diff": 0.0079, "p99_diff": 0.0041, "flip_share": 0.0, "decisions": 729, "flips": 0,
          "within_limits": True, "images": 81, "device": "cpu"}
OUTSIDE = {**WITHIN, "p99_diff": 0.0107, "within_limits": False}


def served_precision() -> str:
    samples = [s for m in REGISTRY.collect() if m.name == "stilltag_model_info" for s in m.samples]
    assert len(samples) == 1, samples
    return samples[0].labels["precision"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_serves_each_champion_at_the_precision_its_record_allows(tmp_path, tiny_learner, monkeypatch, native):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: native)  # either CPU, on whatever CI has
    settings = Settings(data_dir=tmp_path, model_poll_s=0.01)  # STILLTAG_INFERENCE_PRECISION: auto (the default)
    assert settings.inference_precision == "auto"
    upgrade(settings.database_url)
    tagger = Tagger(settings)
    try:
        with transaction(tagger.runtime.sessions) as s:
            for parity_record in (WITHIN, OUTSIDE, None):
                registry.register(session=s, store=tagger.runtime.model_store, artifact=tiny_learner, arch="resnet18",
                                  vocab=["unused"], metrics={"precision_parity": {"bf16": parity_record}}
                                  if parity_record else {})
            registry.promote(session=s, version="v1")
        tagger.load_champion()
        expected = "bf16" if native else "fp32"
        assert (tagger.loaded.precision, served_precision()) == (expected, expected)
        probs = tagger.loaded.predict(np.zeros((2, 64, 64, 3), dtype=np.uint8))
        assert probs.dtype == np.float32 and probs.shape[0] == 2

        for version in ("v2", "v3"):  # outside the limits; never measured
            with transaction(tagger.runtime.sessions) as s:
                registry.promote(session=s, version=version)
            tagger.maybe_switch(force=True)
            assert tagger.loaded.version == version
            assert (tagger.loaded.precision, served_precision()) == ("fp32", "fp32")
    finally:
        tagger.close()


def test_an_explicit_precision_is_served_whatever_the_record(tmp_path, tiny_learner, monkeypatch):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    settings = Settings(data_dir=tmp_path, inference_precision="bf16")
    upgrade(settings.database_url)
    tagger = Tagger(settings)
    try:
        with transaction(tagger.runtime.sessions) as s:
            registry.register(session=s, store=tagger.runtime.model_store, artifact=tiny_learner, arch="resnet18",
                              vocab=["unused"], metrics={"precision_parity": {"bf16": OUTSIDE}})
            registry.promote(session=s, version="v1")
        tagger.load_champion()
        assert (tagger.loaded.precision, tagger.loaded.precision_reason, served_precision()) == ("bf16", "set", "bf16")
    finally:
        tagger.close()


@pytest.mark.parametrize("native", [True, False])
def test_a_record_measured_for_the_serving_champion_changes_its_precision_without_a_restart(
        tmp_path, tiny_learner, monkeypatch, native):
    """``stilltag models measure`` on the champion (registered by hand: no record, so fp32): the
    worker serves it at bf16 from its next poll, where the record allows and the CPU has native bf16;
    a record outside the limits brings it back to fp32. The same version throughout: no switch."""
    from worker import metrics

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: native)
    settings = Settings(data_dir=tmp_path, model_poll_s=0.01)
    upgrade(settings.database_url)
    tagger = Tagger(settings)

    def measured(record: dict) -> None:  # what `stilltag models measure v1` stores
        with transaction(tagger.runtime.sessions) as s:
            registry.add_metrics(session=s, version="v1", precision_parity={"bf16": record})

    try:
        with transaction(tagger.runtime.sessions) as s:
            registry.register(session=s, store=tagger.runtime.model_store, artifact=tiny_learner, arch="resnet18",
                              vocab=["unused"], metrics={"f2": 0.5})
            registry.promote(session=s, version="v1")
        first = tagger.load_champion()
        assert (first.precision, served_precision()) == ("fp32", "fp32")
        assert "models measure" in first.precision_reason or not native
        switches = metrics.MODEL_SWITCHES._value.get()

        tagger.maybe_switch(force=True)
        assert tagger.loaded is first, "reloaded with nothing changed"
        measured(WITHIN)
        tagger.maybe_switch(force=True)
        expected = "bf16" if native else "fp32"
        assert (tagger.loaded.version, tagger.loaded.precision, served_precision()) == ("v1", expected, expected)
        assert (tagger.loaded is first) is not native, "loaded again only where the precision changes"
        second = tagger.loaded
        tagger.maybe_switch(force=True)
        assert tagger.loaded is second

        measured(OUTSIDE)
        tagger.maybe_switch(force=True)
        assert (tagger.loaded.version, tagger.loaded.precision, served_precision()) == ("v1", "fp32", "fp32")
        assert (tagger.loaded is second) is not native
        assert metrics.MODEL_SWITCHES._value.get() == switches, "the same champion: not a switch"
        with transaction(tagger.runtime.sessions) as s:
            assert registry.get_version(session=s, version="v1").metrics["f2"] == 0.5
    finally:
        tagger.close()
