"""Exported learners pickle only shared.learner_parts, and models exported before the move still load."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from shared import learner_parts, learner_pickle
from shared.learner_parts import Example

SIZE_PX = 32  # the model's input
PICTURE_PX = 48  # the stored pictures (not the 32 px blank that stands in for an unreadable one)
OLD_MODULES = {"ImageFromStore": "training.recipe", "example_tags": "training.recipe", "Example": "training.dataset"}
LAYERS_ABOVE_SHARED = ("training", "worker", "demo")


@contextmanager
def pickled_under_old_names():
    """Export as the code did before the move: the pickle records ``training.recipe.ImageFromStore`` etc.

    training.recipe and training.dataset import these objects, so pickle finds the same object
    under the old name and records that name.
    """
    saved = {name: getattr(learner_parts, name).__module__ for name in OLD_MODULES}
    for name, module in OLD_MODULES.items():
        getattr(learner_parts, name).__module__ = module
    try:
        yield
    finally:
        for name, module in saved.items():
            getattr(learner_parts, name).__module__ = module


def export_recipe_learner(workdir: Path, settings) -> Path:
    """The training worker's DataBlock and learner (untrained, resnet18, no download), exported."""
    import torch

    from demo.synthetic import VOCAB, make_pictures

    workdir.mkdir(parents=True)
    from training import recipe
    from training.dataset import Dataset

    pictures = make_pictures(range(1, 9), size=(PICTURE_PX, PICTURE_PX))
    examples = [Example(p.image_id, p.tags) for p in pictures]
    dataset = Dataset(train=examples[:6], valid=examples[6:], holdout=[], vocab=sorted(VOCAB),
                      snapshot_at=dt.datetime.now(dt.UTC))
    dls = recipe.build_dataloaders(dataset, settings, device=torch.device("cpu"))
    learn = recipe.build_learner(dls, settings, workdir=workdir)
    learn.export(workdir / "export.pkl")
    return workdir / "export.pkl"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """``{"old": ..., "new": ...}``: one learner exported before the move, one after."""
    from demo.synthetic import make_pictures
    from shared.config import Settings

    root = tmp_path_factory.mktemp("learner-parts")
    images = root / "images"
    images.mkdir()
    for pic in make_pictures(range(1, 9), size=(PICTURE_PX, PICTURE_PX)):
        pic.image.save(images / f"{pic.image_id}.jpg")
    settings = Settings(data_dir=root / "data", image_url=f"file://{images}/{{image_id}}.jpg", train_arch="resnet18",
                        train_pretrained=False, train_image_size=SIZE_PX, train_batch_size=4, device="cpu")
    paths = {}
    for kind in ("old", "new"):
        workdir = root / kind
        if kind == "old":
            with pickled_under_old_names():
                paths[kind] = export_recipe_learner(workdir, settings)
        else:
            paths[kind] = export_recipe_learner(workdir, settings)
    return paths


def pickled_names(path: Path) -> set[tuple[str, str]]:
    """Every (module, name) the learner's pickle refers to, read without importing any of them."""
    import pickletools

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    names = set()
    for opcode, arg, _pos in pickletools.genops(data):
        # torch.save pickles with protocol 2, where every reference is a GLOBAL "module name".
        assert opcode.name != "STACK_GLOBAL", "protocol 4 pickle: read its names another way"
        if opcode.name == "GLOBAL":
            names.add(tuple(arg.split(" ", 1)))
    return names


def ours(names: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(m, n) for m, n in names if m.split(".")[0] in ("shared", *LAYERS_ABOVE_SHARED)}


def test_a_new_export_pickles_only_shared_learner_parts(exports):
    names = ours(pickled_names(exports["new"]))
    assert names == {("shared.learner_parts", "ImageFromStore"), ("shared.learner_parts", "example_tags"),
                     ("shared.learner_parts", "Example")}


def test_the_old_export_names_the_training_modules(exports):
    # The fixture is what it claims to be: a learner as exported before the move.
    assert ours(pickled_names(exports["old"])) == {(m, n) for n, m in OLD_MODULES.items()}


@pytest.fixture
def training_not_importable(monkeypatch):
    """This process as a tagging worker that ships without the training package."""
    for name in [m for m in sys.modules if m.split(".")[0] == "training"] + ["training"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_an_old_export_loads_where_training_cannot_be_imported(exports, training_not_importable):
    import warnings

    import torch

    from shared.learner_pickle import describe_learner
    from worker.model import TaggingModel

    with warnings.catch_warnings(), pytest.raises(ImportError, match="training"):
        warnings.simplefilter("ignore")
        torch.load(exports["old"], weights_only=False)  # plain pickle cannot find training.recipe
    learn = learner_pickle.load_learner(exports["old"])
    image = learn.dls.tls[0].tfms(Example(1, ("red",)))  # get_x and the image block, as unpickled
    assert image.size == (PICTURE_PX, PICTURE_PX) and image.mode == "RGB"
    info = describe_learner(exports["old"])
    assert info.arch == "resnet18" and len(info.vocab) > 0
    model = TaggingModel.load(exports["old"], version="old", device="cpu")
    probs = model.predict(np.zeros((2, SIZE_PX, SIZE_PX, 3), dtype=np.uint8))
    assert probs.shape == (2, len(info.vocab))


def test_a_new_export_loads_where_training_cannot_be_imported(exports, training_not_importable):
    from worker.model import TaggingModel

    model = TaggingModel.load(exports["new"], version="new", device="cpu")
    assert model.predict(np.zeros((1, SIZE_PX, SIZE_PX, 3), dtype=np.uint8)).shape == (1, len(model.vocab))


def test_the_learner_modules_import_nothing_above_shared():
    code = ("import sys, shared.learner_parts, shared.learner_pickle; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {LAYERS_ABOVE_SHARED!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
