"""Generated pictures with known multi-label ground truth, for the demo, tests and benchmarks.

Each picture has a background texture and one to three coloured shapes; its tags name the
shapes, their colours and the texture, so a small model can learn them from few examples.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
TEXTURES = ("stripes", "dots")  # a plain background has no texture tag
VOCAB = tuple(sorted((*SHAPES, *COLOURS, *TEXTURES)))


@dataclass(frozen=True)
class Picture:
    image_id: int
    tags: tuple[str, ...]
    image: Image.Image

    def jpeg(self, quality: int = 90) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _background(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], texture: str | None) -> None:
    w, h = size
    shade = rng.randint(150, 200)
    draw.rectangle((0, 0, w, h), fill=(shade, shade, shade))
    step = max(4, min(w, h) // 12)
    dark = (shade - 90,) * 3
    if texture == "stripes":
        for x in range(-h, w, step * 2):
            draw.line((x, 0, x + h, h), fill=dark, width=max(1, step // 2))
    elif texture == "dots":
        r = max(1, step // 4)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=dark)


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], shape: str, colour) -> None:
    w, h = size
    s = rng.randint(min(w, h) // 4, min(w, h) // 2)
    x = rng.randint(0, w - s)
    y = rng.randint(0, h - s)
    if shape == "circle":
        draw.ellipse((x, y, x + s, y + s), fill=colour)
    elif shape == "square":
        draw.rectangle((x, y, x + s, y + s), fill=colour)
    else:
        draw.polygon(((x + s // 2, y), (x, y + s), (x + s, y + s)), fill=colour)


def make_picture(image_id: int, *, seed: int = 0, size: tuple[int, int] = (96, 96)) -> Picture:
    """The same ``(image_id, seed, size)`` always gives the same picture and tags."""
    rng = random.Random(seed * 1_000_003 + image_id)
    texture = rng.choice((*TEXTURES, None))
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    _background(draw, rng, size, texture)
    tags = {texture} if texture else set()
    for _ in range(rng.randint(1, 3)):
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        _shape(draw, rng, size, shape, COLOURS[colour])
        tags |= {shape, colour}
    return Picture(image_id=image_id, tags=tuple(sorted(tags)), image=image)


def make_pictures(image_ids, *, seed: int = 0, size: tuple[int, int] = (96, 96)) -> list[Picture]:
    return [make_picture(i, seed=seed, size=size) for i in image_ids]


def picture_dataloaders(folder: Path, image_ids, *, size: int, bs: int, seed: int = 0,
                        picture_size: tuple[int, int] = (96, 96), augment: bool = False):
    """Generated pictures saved under ``folder`` as fastai DataLoaders the way the seed project
    built them: squish-resize to ``size``, ImageNet stats, a quarter held out for validation."""
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
    )

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for pic in make_pictures(image_ids, seed=seed, size=picture_size):
        path = folder / f"{pic.image_id}.jpg"
        path.write_bytes(pic.jpeg())
        rows.append({"path": str(path), "tags": " ".join(pic.tags)})
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=list(VOCAB))), get_x=ColReader("path"),
        get_y=ColReader("tags", label_delim=" "), splitter=RandomSplitter(valid_pct=0.25, seed=seed),
        item_tfms=Resize(size, method="squish"),
        batch_tfms=[*(aug_transforms() if augment else []), Normalize.from_stats(*imagenet_stats)],
    )
    return block.dataloaders(pd.DataFrame(rows), bs=bs, num_workers=0)
