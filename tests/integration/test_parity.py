"""The worker's probabilities are fastai's: same preprocessing, same model, same activation."""

import numpy as np
import pytest

from demo.synthetic import make_picture
from worker.model import TaggingModel
from worker.preprocess import decode_image
from worker.results import select_tags

pytestmark = pytest.mark.integration

THRESHOLD = 0.2
# Small generated pictures and large JPEGs at movie sizes.
SIZES = [(96, 96), (320, 200), (1280, 720), (1920, 800), (1024, 768), (1440, 1080)]


@pytest.mark.parametrize(("jpeg_decoder", "cpu_streams"), [("torchvision", 2), ("pil", 1)])
def test_worker_probabilities_match_learn_predict(tiny_learner, jpeg_decoder, cpu_streams):
    import warnings

    from fastai.learner import load_learner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = load_learner(tiny_learner, cpu=True)
    # Two streams (the worker's default) run the 12 images as four sub-batches of three; one, whole.
    model = TaggingModel.load(tiny_learner, version="v1", device="cpu", cpu_streams=cpu_streams, cpu_sub_batch=3)
    assert (model.streams is None) == (cpu_streams == 1)
    assert (model.prep.height, model.prep.width, model.prep.method) == (64, 64, "squish")  # read from the learner

    pictures = [make_picture(1000 + i, seed=7, size=size) for i, size in enumerate(SIZES * 2)]
    data = [p.jpeg(quality=92) for p in pictures]
    ours = model.predict(np.stack([decode_image(d, model.prep, max_pixels=100_000_000, jpeg_decoder=jpeg_decoder)
                                    for d in data]))
    with learn.no_bar(), learn.no_logging():
        theirs = np.stack([learn.predict(d)[2].numpy() for d in data])

    assert theirs.std() > 0.02, "the learner must give varied probabilities for this test to mean anything"
    max_diff = float(np.abs(ours - theirs).max())
    print(f"parity: max |worker - learn.predict| = {max_diff:.6f} over {len(data)} images x {len(model.vocab)} tags")
    assert max_diff <= 0.01
    for a, b in zip(ours, theirs, strict=True):
        ours_tags = {t for t, _ in select_tags(a, model.vocab, threshold=THRESHOLD, top_k=len(model.vocab))}
        fastai_tags = {model.vocab[i] for i in np.flatnonzero(b >= THRESHOLD)}
        assert ours_tags == fastai_tags


def test_the_model_input_is_fastais_batch_transforms_output(tiny_learner):
    """``stage`` (uint8 NHWC → normalised float, channels-last) against the learner's own
    validation batch transforms (IntToFloatTensor, Normalize) on the same pixels."""
    import warnings

    import torch
    from fastai.learner import load_learner
    from fastai.torch_core import TensorImage
    from fasttransform.transform import compose_tfms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = load_learner(tiny_learner, cpu=True)
    model = TaggingModel.load(tiny_learner, version="v1", device="cpu")
    pixels = np.random.default_rng(3).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    ours = model.stage(pixels).x
    batch = TensorImage(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    theirs = compose_tfms(batch, learn.dls.after_batch.fs, split_idx=1)  # as in validation: no augmentation
    assert ours.dtype == torch.float32 and ours.is_contiguous(memory_format=torch.channels_last)
    assert float(theirs.std()) > 0.5, "Normalize must have run for the comparison to mean anything"
    # float32 rounding only: 3.05e-5 at most here (the four-pass normalisation before: 3.06e-5).
    assert float((ours - torch.as_tensor(theirs)).abs().max()) <= 1e-4
