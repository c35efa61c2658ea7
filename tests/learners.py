"""Small real fastai learners for tests: generated pictures, resnet18, no pretrained weights."""

from __future__ import annotations

from pathlib import Path

from demo.synthetic import VOCAB, make_pictures


def train_tiny_learner(
    workdir: Path, *, n_images: int = 64, size: int = 64, epochs: int = 2, seed: int = 0, lr: float = 1e-3
) -> Path:
    """Train a tiny multi-label learner the way the seed project did and ``export()`` it."""
    import pandas as pd
    from fastai.vision.all import (
        ColReader,
        DataBlock,
        ImageBlock,
        MultiCategoryBlock,
        Normalize,
        RandomSplitter,
        Resize,
        aug_transforms,
        imagenet_stats,
        resnet18,
        vision_learner,
    )

    image_dir = workdir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for pic in make_pictures(range(1, n_images + 1), seed=seed):
        path = image_dir / f"{pic.image_id}.jpg"
        pic.image.save(path, quality=90)
        rows.append({"path": str(path), "tags": " ".join(pic.tags)})
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=list(VOCAB))),
        get_x=ColReader("path"),
        get_y=ColReader("tags", label_delim=" "),
        splitter=RandomSplitter(valid_pct=0.25, seed=seed),
        item_tfms=Resize(size, method="squish"),
        batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)],  # as training/recipe.py
    )
    dls = block.dataloaders(pd.DataFrame(rows), bs=16, num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False)
    learn.fit_one_cycle(epochs, lr)
    learn.path = workdir
    learn.export("export.pkl")
    return workdir / "export.pkl"
