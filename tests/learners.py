"""Small real fastai learners for tests: generated pictures, resnet18, no pretrained weights."""

from __future__ import annotations

from pathlib import Path

from demo.synthetic import picture_dataloaders


def train_tiny_learner(
    workdir: Path, *, n_images: int = 64, size: int = 64, epochs: int = 2, seed: int = 0, lr: float = 1e-3
) -> Path:
    """Train a tiny multi-label learner the way the seed project did and ``export()`` it. ``seed``
    decides the pictures, their order and the initial weights: on one machine, the same arguments
    (and torch thread count) give the same learner in every run, so a test on its figures passes or
    fails for good, not by the draw."""
    from fastai.torch_core import set_seed
    from fastai.vision.all import resnet18, vision_learner

    set_seed(seed)

    dls = picture_dataloaders(workdir / "images", range(1, n_images + 1), size=size, bs=16, seed=seed,
                              augment=True)  # as training/recipe.py
    learn = vision_learner(dls, resnet18, pretrained=False)
    learn.fit_one_cycle(epochs, lr)
    learn.path = workdir
    learn.export("export.pkl")
    return workdir / "export.pkl"


def seed_website(settings, n: int, *, size: tuple[int, int] = (64, 64)) -> None:
    """The website's state a retrain reads: the schema, ``n`` generated pictures in the image
    store, their tags in ``image_tags``."""
    import sqlalchemy as sa

    from demo.synthetic import make_pictures
    from shared.db import image_tags, transaction
    from shared.migrate import upgrade
    from shared.runtime import Runtime

    upgrade(settings.database_url)
    rt = Runtime(settings)
    try:
        rows = []
        for pic in make_pictures(range(1, n + 1), size=size):
            rt.images.put(pic.image_id, pic.jpeg())
            rows += [{"image_id": pic.image_id, "tag": t} for t in pic.tags]
        with transaction(rt.sessions) as session:
            session.execute(sa.insert(image_tags), rows)
    finally:
        rt.close()
