"""Reduced precision against fp32 on a trained learner, and the staging paths, on a CPU.

The figures that decide whether a precision may be a device's default come from ``stilltag bench``
(README, "Benchmarks"); here each mode must run, really reduce the precision, and stay close.
"""

import numpy as np
import pytest

from demo.synthetic import make_picture
from worker.model import TaggingModel
from worker.preprocess import decode_image

pytestmark = pytest.mark.integration

THRESHOLD = 0.2
SIZES = [(96, 96), (320, 200), (1280, 720), (1920, 800), (1024, 768), (1440, 1080)]
CLOSE = 0.05  # a sanity bound: a broken autocast (wrong dtype, no normalisation) is far beyond it


@pytest.fixture(scope="module")
def jpegs():
    return _pictures(SIZES * 2)


def _pictures(sizes):
    return [make_picture(2000 + i, seed=11, size=size).jpeg(quality=92) for i, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def parity_jpegs():
    """Enough pictures for a parity record's tail to be a tail: the p99 of 48 pictures' 432
    decisions lies between the sixth and the fifth largest differences; of 12 pictures' 108 it lay
    between the third and the second, and one picture could move it by half."""
    return _pictures(SIZES * 8)


@pytest.fixture(scope="module")
def fp32(tiny_learner):
    return TaggingModel.load(tiny_learner, version="v1", device="cpu", precision="fp32")


def _pixels(model, jpegs):
    return np.stack([decode_image(d, model.prep, max_pixels=100_000_000) for d in jpegs])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_stays_close_to_fp32(tiny_learner, fp32, jpegs, precision):
    reduced = TaggingModel.load(tiny_learner, version="v1", device="cpu", precision=precision)
    assert reduced.precision == precision
    pixels = _pixels(fp32, jpegs)
    base, ours = fp32.predict(pixels), reduced.predict(pixels)
    diff = np.abs(ours - base)
    flips = ((ours >= THRESHOLD) != (base >= THRESHOLD)).mean()
    print(f"{precision} vs fp32: max {diff.max():.5f}, p99 {np.percentile(diff, 99):.5f}, flips {flips:.2%} "
          f"of {base.size}")
    assert base.std() > 0.02, "the learner must give varied probabilities for this test to mean anything"
    assert diff.max() > 0, f"{precision} gave fp32's exact probabilities: autocast did not take effect"
    assert diff.max() <= CLOSE


def test_staged_input_gives_predicts_probabilities(fp32, jpegs):
    pixels = _pixels(fp32, jpegs)
    staged = fp32.stage(pixels)
    assert fp32.copy_stream is None and staged.ready is None  # on a CPU the side stream is a no-op
    np.testing.assert_array_equal(fp32.forward(staged).numpy(), fp32.predict(pixels))
    np.testing.assert_array_equal(fp32.predict(staged), fp32.predict(pixels))


def test_device_decode_path_runs_on_cpu_and_stays_close(fp32, jpegs):
    """``gpu_decode``'s code on the CPU: torchvision decodes and resizes; mixed with PIL pixels."""
    decoded = fp32.decode_jpegs(jpegs[:6])
    assert all(tuple(t.shape) == (fp32.prep.height, fp32.prep.width, 3) for t in decoded)
    pil = _pixels(fp32, jpegs)
    mixed = fp32.predict(fp32.stage_mixed([*decoded, *pil[6:]]))
    np.testing.assert_allclose(mixed[6:], fp32.predict(pil[6:]), atol=1e-5)
    assert np.abs(mixed[:6] - fp32.predict(pil[:6])).max() <= CLOSE


def test_a_bad_jpeg_in_a_device_decoded_batch_fails_alone(make_settings, fp32, jpegs, monkeypatch):
    """``gpu_decode``'s batch on the CPU: the batched decode gives nothing when one JPEG is corrupt.
    The others are decoded one by one on the device and tagged; only the bad one goes to the CPU
    decoder, which says why it cannot be tagged."""
    from worker.results import select_tags
    from worker.service import Prepared, Tagger

    tagger = Tagger(make_settings())
    tagger.model = fp32
    good = jpegs[:3]
    prepared = [Prepared(i, fp32.prep, jpeg=j) for i, j in enumerate(good)]
    prepared.insert(1, Prepared(9, fp32.prep, jpeg=good[0][: len(good[0]) // 2]))  # truncated
    on_cpu = []
    decode_on_cpu = tagger._decode_on_cpu
    monkeypatch.setattr(tagger, "_decode_on_cpu", lambda p: on_cpu.append(p.image_id) or decode_on_cpu(p))
    try:
        results = tagger.predict(prepared)
    finally:
        tagger.model = None  # the module's learner: not released with this tagger
        tagger.close()
    assert on_cpu == [9]
    assert [(r.image_id, r.state) for r in results] == [(0, "tagged"), (9, "failed"), (1, "tagged"), (2, "tagged")]
    assert "corrupt or truncated" in results[1].error
    probs = fp32.predict(fp32.stage_mixed(fp32.decode_jpegs(good)))
    for r, row in zip([results[0], *results[2:]], probs, strict=True):  # as the whole batch on the device
        expected = select_tags(row, fp32.vocab, threshold=tagger.settings.threshold, top_k=tagger.settings.top_k)
        assert [t for t, _ in r.tags] == [t for t, _ in expected]


def test_a_batch_staged_for_the_model_before_a_switch_is_decoded_again(make_settings, tiny_learner, fp32, jpegs):
    """``gpu_decode`` with the look-ahead: a batch staged (its JPEGs decoded on the device) for the
    champion of a moment ago is staged again, JPEGs included, for the model now serving."""
    from worker.results import select_tags
    from worker.service import Prepared, Tagger

    tagger = Tagger(make_settings())
    tagger.model = fp32
    prepared = [Prepared(i, fp32.prep, jpeg=j) for i, j in enumerate(jpegs[:3])]
    ahead = tagger.stage_batch(prepared)
    tagger.model = TaggingModel.load(tiny_learner, version="v2", device="cpu", precision="fp32")  # a switch
    try:
        results = tagger.predict(prepared, ahead)
    finally:
        tagger.close()  # releases v2 only
    expected = fp32.predict(fp32.stage_mixed(fp32.decode_jpegs(jpegs[:3])))  # the same weights
    assert [r.state for r in results] == ["tagged"] * 3
    for r, row in zip(results, expected, strict=True):
        cut = select_tags(row, fp32.vocab, threshold=tagger.settings.threshold, top_k=tagger.settings.top_k)
        assert [t for t, _ in r.tags] == [t for t, _ in cut]


def test_failed_compile_leaves_the_eager_model_serving(tiny_learner, jpegs, monkeypatch):
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    model = TaggingModel.load(tiny_learner, version="v1", device="cpu", precision="fp32", compile_mode="default",
                              compile_batch=2)
    assert model.compiled.wait(timeout=60)
    assert model.runner is model.model
    assert model.predict(_pixels(model, jpegs[:2])).shape == (2, len(model.vocab))


def test_compiled_model_runs_full_batches_and_other_sizes_run_eagerly(tiny_learner, fp32, jpegs):
    """torch.compile for real: a full batch and an upload's batch go through the compiled graph (no
    recompilation after the warm-up), any other size through the eager model, so a batch of an odd
    size never waits for a compilation; all within fp32's parity."""
    from torch._dynamo.utils import counters

    model = TaggingModel.load(tiny_learner, version="v1", device="cpu", precision="fp32", compile_mode="default",
                              compile_batch=(4, 2))  # a full batch and an upload's
    assert model.compiled.wait(timeout=600)
    assert model.runner is not model.model, "torch.compile failed here; the worker log says why"
    pixels = _pixels(model, jpegs)
    compiled_frames = counters["stats"]["unique_graphs"]
    calls = []
    handle = model.model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        full, upload, small = model.predict(pixels[:4]), model.predict(pixels[7:9]), model.predict(pixels[4:7])
    finally:
        handle.remove()
    assert counters["stats"]["unique_graphs"] == compiled_frames, "a batch recompiled the model"
    assert calls == [3], "the odd-sized batch runs eagerly, the full and the upload's in the compiled graph"
    np.testing.assert_allclose(full, fp32.predict(pixels[:4]), atol=1e-4)
    np.testing.assert_allclose(upload, fp32.predict(pixels[7:9]), atol=1e-4)
    np.testing.assert_allclose(small, fp32.predict(pixels[4:7]), atol=1e-6)


@pytest.mark.parametrize("reduced", ["bf16", "fp16"])
def test_the_retrains_record_measures_what_the_worker_would_serve(tiny_learner, fp32, parity_jpegs, reduced):
    """``training.evaluate.reduced_parity`` (fastai's pipeline under autocast, as the retrain runs it)
    against the tagging worker's own reduced precision and fp32 on the same pictures: the record that
    decides ``auto`` describes what serving in that precision would change."""
    import warnings

    from fastai.learner import load_learner
    from fastai.vision.all import PILImage

    from shared import parity
    from shared.learner_parts import Example
    from training.evaluate import predict, reduced_parity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = load_learner(tiny_learner, cpu=True)
    jpegs = parity_jpegs
    examples = [Example(i, ()) for i in range(len(jpegs))]

    def read(example):
        return PILImage.create(jpegs[example.image_id])

    record = reduced_parity(learn, examples, predict(learn, examples, read=read), precision=reduced, cut=THRESHOLD,
                            images=len(jpegs), read=read)
    assert (record["images"], record["decisions"], record["device"]) == (len(jpegs), len(jpegs) * len(fp32.vocab), "cpu")
    assert record["within_limits"] == parity.within_limits(record)

    model = TaggingModel.load(tiny_learner, version="v1", device="cpu", precision=reduced)
    pixels = np.stack([decode_image(d, fp32.prep, max_pixels=100_000_000, jpeg_decoder="pil") for d in jpegs])
    served = parity.figures(fp32.predict(pixels), model.predict(pixels), THRESHOLD)
    print(f"retrain's record: {parity.describe(record)}; worker's {reduced}: {parity.describe(served)}")
    assert record["max_diff"] > 0, f"{reduced} gave fp32's exact probabilities: autocast did not take effect"
    # Two paths (fastai's NCHW batches, the worker's channels-last ones) round differently, so the
    # figures agree in size, not to the digit. Over 14 freshly trained learners (bf16 and fp16) the
    # record's p99 was 0.84-1.23 of the worker's and its max 0.72-1.23; on 12 pictures one max was
    # 1.52. With the batch transforms under autocast too, the record was three times the worker's.
    for key in ("max_diff", "p99_diff"):
        assert served[key] / 1.5 <= record[key] <= served[key] * 1.5, key
