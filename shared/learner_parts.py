"""What an exported learner pickles: the training examples' type and the recipe's get_x / get_y.

``learn.export()`` pickles these by module and name, and every tagging worker unpickles them,
so this module is a contract with every stored model: keep it small, keep the names, keep it
free of imports above ``shared`` (it is loaded wherever a learner is, the training worker's
code may not be). fastai and PIL are imported inside functions, never when this module is
imported. Models exported before these moved here name ``training.recipe`` and
``training.dataset``; ``shared.learner_pickle`` maps those names here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PLACEHOLDER_SIZE_PX = 32  # the blank that stands in for an unreadable picture


@dataclass(frozen=True)
class Example:
    """One training (or holdout) image and its tags."""

    image_id: int
    tags: tuple[str, ...]


class ImageFromStore:
    """``get_x``: a training example (or an image ID) → its picture, read through the image store.

    It is pickled with the exported learner, so it keeps only the store's configuration; the
    store itself (threads, S3 client) is made on first use in whichever process uses it.
    """

    def __init__(self, image_url: str, *, endpoint_url: str = "", max_bytes: int | None = None):
        self.image_url = image_url
        self.endpoint_url = endpoint_url
        self.max_bytes = max_bytes
        self._source = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def __call__(self, item):
        from fastai.vision.all import PILImage
        from PIL import Image

        image_id = item.image_id if isinstance(item, Example) else int(item)
        try:
            if self._source is None:
                from shared.stores import ImageSource

                self._source = ImageSource(self.image_url, endpoint_url=self.endpoint_url, concurrency=1,
                                           max_bytes=self.max_bytes)
            img = PILImage.create(self._source.fetch(image_id))
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img
        except Exception as exc:
            # One unreadable picture must not fail hours of training: a blank stands in for it.
            log.warning("image %s cannot be read (%s); a blank picture stands in for it", image_id, exc)
            return PILImage(Image.new("RGB", (PLACEHOLDER_SIZE_PX, PLACEHOLDER_SIZE_PX), (128, 128, 128)))


def example_tags(item):
    """``get_y``: the example's tags (no annotations: fastai would dispatch and cast on them)."""
    return list(item.tags)
