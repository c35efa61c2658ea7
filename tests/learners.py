"""Small real fastai learners for tests: generated pictures, resnet18, no pretrained weights."""

from __future__ import annotations

from pathlib import Path

from demo.synthetic import picture_dataloaders


def train_tiny_learner(
    workdir: Path, *, n_images: int = 64, size: int = 64, epochs: int = 2, seed: int = 0, lr: float = 1e-3
) -> Path:
    """Train a tiny multi-label learner the way the seed project did and ``export()`` it."""
    from fastai.vision.all import resnet18, vision_learner

    dls = picture_dataloaders(workdir / "images", range(1, n_images + 1), size=size, bs=16, seed=seed,
                              augment=True)  # as training/recipe.py
    learn = vision_learner(dls, resnet18, pretrained=False)
    learn.fit_one_cycle(epochs, lr)
    learn.path = workdir
    learn.export("export.pkl")
    return workdir / "export.pkl"
