"""Decode: image bytes → the model's input pixels, exactly as the learner's validation pipeline.

A plain function per image, safe to call from many threads (PIL releases the GIL while it
decodes and resizes). Every way an image can be bad ends in ``ImageRejected`` with a reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# JPEGs much larger than the model input are decoded at half size (libjpeg's DCT scaling),
# keeping at least this many times the target size before the resize: the probabilities stay
# within the parity test's tolerance and decoding is about twice as fast.
DRAFT_OVERSAMPLE = 2
# Never below this fraction of the stored size: libjpeg's 1/4 and 1/8 scales average whole 8x8
# blocks, and with the resize left to do small they moved probabilities by up to 0.013 against
# learn.predict on a 64 px model (1/2 at most: 0.005). A smaller oversample fails the same way at
# 224 px (0.025), so the reduction is capped rather than the oversample lowered.
DRAFT_MAX_REDUCTION = 2

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageRejected(ValueError):
    """This image cannot be tagged; the message is stored as its ``tagging_status.error``."""


@dataclass(frozen=True)
class Preprocessing:
    """What the learner's validation pipeline does to one image, read from the learner."""

    height: int
    width: int
    method: str = "squish"  # fastai ResizeMethod: squish, crop or pad
    resample: int = Image.Resampling.BILINEAR
    draft: bool = True


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (what ``PILImage.create`` gives fastai)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 → RGB conversion clips at 255; scale the full range down instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _resize(img: Image.Image, prep: Preprocessing) -> Image.Image:
    size = (prep.width, prep.height)  # PIL wants (w, h); fastai stores (h, w)
    if prep.method == "squish":
        return img.resize(size, prep.resample)
    if prep.method == "crop":  # fastai's validation crop: the centred largest crop of the target ratio
        w, h = img.size
        ratio = min(w / prep.width, h / prep.height)
        cw, ch = round(prep.width * ratio), round(prep.height * ratio)
        left, top = (w - cw) // 2, (h - ch) // 2
        return img.resize(size, prep.resample, box=(left, top, left + cw, top + ch))
    raise ImageRejected(f"resize method {prep.method!r} is not supported by the tagging worker")


def decode_image(data: bytes, prep: Preprocessing, *, max_pixels: int) -> np.ndarray:
    """Bytes → ``(height, width, 3)`` uint8 pixels ready for the model.

    EXIF orientation is applied; grayscale, CMYK, palette, alpha and 16-bit images are converted.

    Raises:
        ImageRejected: empty, not an image, truncated or corrupt, or over ``max_pixels``.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap is below
            img: Image.Image = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageRejected(f"image is {w}x{h} = {w * h} pixels, over the cap of {max_pixels} (decompression bomb?)")
        if prep.draft and img.format == "JPEG":
            img.draft("RGB", (max(prep.width * DRAFT_OVERSAMPLE, -(-w // DRAFT_MAX_REDUCTION)),
                              max(prep.height * DRAFT_OVERSAMPLE, -(-h // DRAFT_MAX_REDUCTION))))
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        out = _resize(img, prep)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from None
    return np.asarray(out, dtype=np.uint8)


def is_jpeg(data: bytes, *, max_pixels: int) -> bool:
    """A JPEG within the pixel cap, by its header only (``gpu_decode`` sends these to the device)."""
    if not data.startswith(b"\xff\xd8"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header, decodes nothing
        return img.format == "JPEG" and img.width * img.height <= max_pixels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return False
