"""Loading exported learners: a pickle module that finds names which have moved since export.

fastai's ``load_learner`` (and ``torch.load``) take a ``pickle_module``; this module is one. Its
``Unpickler`` maps the names an older export recorded to where they live now, so a model in
the registry keeps loading after a refactor, in any process (a tagging worker need not be
able to import ``training``). Add a line to ``MOVED`` whenever something a learner pickles
moves; never remove one while such models may still be stored.
"""

from __future__ import annotations

import io
import pickle as _pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from pickle import *  # noqa: F403 - the rest of the pickle module's API, as torch.load expects

# (module, name) recorded by an older export -> (module, name) today
MOVED: dict[tuple[str, str], tuple[str, str]] = {
    ("training.recipe", "ImageFromStore"): ("shared.learner_parts", "ImageFromStore"),
    ("training.recipe", "example_tags"): ("shared.learner_parts", "example_tags"),
    ("training.dataset", "Example"): ("shared.learner_parts", "Example"),
}


class Unpickler(_pickle.Unpickler):  # type: ignore[no-redef]  # replaces the star-imported one
    def find_class(self, module: str, name: str):
        module, name = MOVED.get((module, name), (module, name))
        return super().find_class(module, name)


def load(file, **kwargs):  # type: ignore[no-redef]
    return Unpickler(file, **kwargs).load()


def loads(data, /, **kwargs):  # type: ignore[no-redef]
    return Unpickler(io.BytesIO(data), **kwargs).load()


def load_learner(path: Path | str, *, cpu: bool = True):
    """fastai's ``load_learner`` through this module. Unpickles: trusted (sha256-checked) files only."""
    import sys

    from fastai.learner import load_learner as fastai_load_learner

    with warnings.catch_warnings():
        # fastai warns that unpickling is unsafe; callers load only files whose sha256 they checked.
        warnings.simplefilter("ignore")
        return fastai_load_learner(path, cpu=cpu, pickle_module=sys.modules[__name__])


@dataclass(frozen=True)
class LearnerInfo:
    arch: str
    vocab: list[str]


def arch_name(learn) -> str:
    """The architecture's name as the learner records it (``resnet152``), or the model's class."""
    arch = getattr(learn, "arch", None)
    if isinstance(arch, str):
        return arch
    return getattr(arch, "__name__", None) or type(learn.model).__name__


def describe_learner(path: Path) -> LearnerInfo:
    """Architecture and tag vocabulary of an exported learner (unpickles it: trusted files only)."""
    learn = load_learner(path, cpu=True)
    return LearnerInfo(arch=arch_name(learn), vocab=[str(t) for t in learn.dls.vocab])


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is an error.
    Both workers pick their device with it."""
    import torch

    from shared.errors import SettingsError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"STILLTAG_DEVICE={name} but no CUDA device is visible; use auto or cpu")
    return name
