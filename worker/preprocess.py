"""Decode: image bytes → the model's input pixels, as the learner's validation pipeline makes them
(exactly with the ``pil`` JPEG decoder, within one grey level with ``torchvision``).

A plain function per image, safe to call from many threads (PIL, libjpeg-turbo and torchvision's
resize release the GIL while they work). Every way an image can be bad ends in ``ImageRejected`` with a reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The decoders of an RGB (YCbCr) JPEG, STILLTAG_JPEG_DECODER. "torchvision" decodes with libjpeg-turbo
# straight into a tensor and squishes with torchvision's antialiased uint8 resize, which computes
# PIL's filter (within one grey level of it) in a sixth of PIL's time: about half the CPU per
# image of the "pil" path, which is exactly learn.predict's (PIL decode, PIL resize). Other
# formats and modes, and learners that crop or resize with another filter, take the PIL path.
TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """This image cannot be tagged; the message is stored as its ``tagging_status.error``."""


@dataclass(frozen=True)
class Preprocessing:
    """What the learner's validation pipeline does to one image, read from the learner."""

    height: int
    width: int
    method: str = "squish"  # fastai ResizeMethod: squish, crop or pad
    resample: int = Image.Resampling.BILINEAR


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


def _box(size: tuple[int, int], prep: Preprocessing) -> tuple[int, int, int, int] | None:
    """The part of a ``(w, h)`` image the resize reads: all of it (squish), or fastai's validation
    crop, the centred largest crop of the target ratio, as ``(left, top, right, bottom)``."""
    if prep.method == "squish":
        return None
    if prep.method == "crop":
        w, h = size
        ratio = min(w / prep.width, h / prep.height)
        cw, ch = round(prep.width * ratio), round(prep.height * ratio)
        left, top = (w - cw) // 2, (h - ch) // 2
        return left, top, left + cw, top + ch
    raise ImageRejected(f"resize method {prep.method!r} is not supported by the tagging worker")


def decode_jpegs(jpegs: list[bytes], *, device: str = "cpu") -> list:
    """JPEGs → ``(3, h, w)`` uint8 RGB tensors on ``device`` (libjpeg-turbo on a CPU, batched nvjpeg
    on CUDA), EXIF orientation applied. Raises ``RuntimeError`` for a corrupt or truncated one."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec's; TorchCodec is not a dependency
        # yet, and decode_jpeg is libjpeg-turbo on a CPU and the batched nvjpeg path on a GPU.
        warnings.filterwarnings("ignore", TORCHVISION_DEPRECATION, DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True, device=device)


def squish_tensor(x, prep: Preprocessing):
    """A ``(3, h, w)`` uint8 tensor squished to ``(height, width, 3)`` with PIL's bilinear filter
    (antialiased). Only a squish: PIL's crop reads past the crop's edge, and a cropped tensor cannot."""
    from torchvision.transforms.v2.functional import resize

    return resize(x, [prep.height, prep.width], antialias=True).permute(1, 2, 0)


def _decode_torchvision(data: bytes, prep: Preprocessing) -> np.ndarray:
    try:
        (x,) = decode_jpegs([data])
    except RuntimeError as exc:  # "decode_jpeg, <source file>:<line>, Image is incomplete or truncated"
        raise ImageRejected(f"corrupt or truncated image: {str(exc).rsplit(', ', 1)[-1]}") from None
    return np.ascontiguousarray(squish_tensor(x, prep).numpy())


def _decode_pil(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    img.load()
    img = _to_rgb(ImageOps.exif_transpose(img))
    box = _box(img.size, prep)
    return np.asarray(img.resize((prep.width, prep.height), prep.resample, box=box), dtype=np.uint8)


def decode_image(data: bytes, prep: Preprocessing, *, max_pixels: int, jpeg_decoder: str = "torchvision") -> np.ndarray:
    """Bytes → ``(height, width, 3)`` uint8 pixels ready for the model.

    EXIF orientation is applied; grayscale, CMYK, palette, alpha and 16-bit images are converted.
    ``jpeg_decoder`` (``torchvision`` or ``pil``) picks the decoder of RGB JPEGs when the learner squishes
    with the bilinear filter (fastai's filter, and the squish of stilltag's training recipe).

    Raises:
        ImageRejected: empty, not an image, truncated or corrupt, or over ``max_pixels``.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap is below
            img: Image.Image = Image.open(io.BytesIO(data))  # the header only
        w, h = img.size
        if w * h > max_pixels:
            raise ImageRejected(f"image is {w}x{h} = {w * h} pixels, over the cap of {max_pixels} (decompression bomb?)")
        if (jpeg_decoder == "torchvision" and img.format == "JPEG" and img.mode == "RGB"
                and prep.method == "squish" and prep.resample == Image.Resampling.BILINEAR):
            return _decode_torchvision(data, prep)
        return _decode_pil(img, prep)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from None


def is_jpeg(data: bytes, *, max_pixels: int) -> bool:
    """A JPEG the device decodes as the CPU would, by its header only (``gpu_decode`` sends these to
    the device): RGB or greyscale, upright, within the pixel cap. nvjpeg ignores EXIF orientation
    (torchvision applies it on the CPU only), and CMYK is the CPU's to convert."""
    if not data.startswith(b"\xff\xd8"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header, decodes nothing
        upright = img.getexif().get(EXIF_ORIENTATION, 1) == 1
        return (img.format == "JPEG" and img.mode in ("RGB", "L") and upright
                and img.width * img.height <= max_pixels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return False
