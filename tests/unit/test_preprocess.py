import io

import numpy as np
import pytest
from PIL import Image

from tests.images import encode, png_bomb, sixteen_bit_png, with_exif_orientation
from worker.preprocess import ImageRejected, Preprocessing, decode_image, is_jpeg

PREP = Preprocessing(height=32, width=48)
CAP = 10_000_000


def _half_red(width=120, height=60) -> Image.Image:
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))  # left half red, right half blue
    return img


def test_output_is_model_sized_rgb_uint8():
    out = decode_image(encode(_half_red(), "PNG"), PREP, max_pixels=CAP)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert out[16, 2].tolist() == [255, 0, 0] and out[16, 45].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied():
    # Orientation 6: the stored pixels must be turned 90° clockwise to be seen upright.
    out = decode_image(with_exif_orientation(_half_red(), 6), Preprocessing(height=40, width=40), max_pixels=CAP)
    top, bottom = out[2, 20], out[37, 20]
    assert top[0] > 200 and top[2] < 60  # red is on top after the turn
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(_half_red().convert("L"), "PNG"), id="grayscale"),
        pytest.param(encode(_half_red().convert("CMYK"), "JPEG"), id="cmyk-jpeg"),
        pytest.param(encode(_half_red().convert("P"), "PNG"), id="palette"),
        pytest.param(encode(_half_red().convert("RGBA"), "PNG"), id="alpha"),
        pytest.param(encode(_half_red().convert("LA"), "PNG"), id="gray-alpha"),
        pytest.param(encode(_half_red().convert("1"), "PNG"), id="one-bit"),
        pytest.param(sixteen_bit_png(), id="16-bit"),
        pytest.param(encode(_half_red(), "WEBP"), id="webp"),
        pytest.param(encode(_half_red(), "GIF"), id="gif"),
    ],
)
def test_unusual_modes_are_converted_not_refused(data):
    out = decode_image(data, PREP, max_pixels=CAP)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8


def test_sixteen_bit_keeps_its_range():
    out = decode_image(sixteen_bit_png(), PREP, max_pixels=CAP)
    assert out.min() < 20 and out.max() > 235  # scaled down, not clipped to white


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "empty file", id="zero-bytes"),
        pytest.param(b"GIF89a this is a text file pretending", "not an image|corrupt", id="garbage-gif-magic"),
        pytest.param(b"hello, I am text\n" * 20, "not an image", id="text"),
        pytest.param(encode(_half_red(), "JPEG")[:300], "corrupt or truncated", id="truncated-jpeg"),
        pytest.param(encode(_half_red(), "PNG")[:-40], "corrupt or truncated", id="truncated-png"),
        pytest.param(png_bomb(), "decompression bomb", id="decompression-bomb-huge"),
        pytest.param(png_bomb(12_000, 1_000), "over the cap of 10000000", id="decompression-bomb-over-cap"),
    ],
)
@pytest.mark.parametrize("jpeg_decoder", ["torchvision", "pil"])
def test_bad_images_are_rejected_with_a_reason(data, reason, jpeg_decoder):
    with pytest.raises(ImageRejected, match=reason):
        decode_image(data, PREP, max_pixels=CAP, jpeg_decoder=jpeg_decoder)


def test_pixel_cap_is_the_setting():
    data = encode(_half_red(200, 100), "PNG")
    with pytest.raises(ImageRejected, match="20000 pixels, over the cap of 19999"):
        decode_image(data, PREP, max_pixels=19_999)
    assert decode_image(data, PREP, max_pixels=20_000).shape == (32, 48, 3)


def _movie_still(width=1280, height=720) -> Image.Image:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 12, width // 12, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)


def _as_fastai_does(data: bytes, prep: Preprocessing) -> np.ndarray:
    """learn.predict's pipeline: PILImage.create (PIL decode, RGB), then Resize with PIL's filter."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = None
    if prep.method == "crop":
        ratio = min(img.width / prep.width, img.height / prep.height)
        cw, ch = round(prep.width * ratio), round(prep.height * ratio)
        box = ((img.width - cw) // 2, (img.height - ch) // 2, (img.width - cw) // 2 + cw, (img.height - ch) // 2 + ch)
    return np.asarray(img.resize((prep.width, prep.height), prep.resample, box=box)).astype(int)


@pytest.mark.parametrize("method", ["squish", "crop"])
@pytest.mark.parametrize("size", [(1280, 720), (1920, 800), (333, 517)])
def test_jpeg_decoders_match_learn_predicts_pipeline(method, size):
    """The torchvision decoder is within one grey level of PIL's decode and squish (a crop takes
    the PIL path); "pil" is PIL's."""
    data = encode(_movie_still(*size), "JPEG", quality=92)
    prep = Preprocessing(height=224, width=160, method=method)
    expected = _as_fastai_does(data, prep)
    fast = decode_image(data, prep, max_pixels=CAP).astype(int)
    assert fast.shape == expected.shape == (224, 160, 3)
    assert np.abs(fast - expected).max() <= 1
    # Rounding differs in a few pixels: a squish here went through torchvision, a crop through PIL.
    assert np.array_equal(fast, expected) == (method == "crop")
    assert np.array_equal(decode_image(data, prep, max_pixels=CAP, jpeg_decoder="pil"), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_both_jpeg_decoders_turn_every_exif_orientation_the_same_way(orientation):
    data = with_exif_orientation(_movie_still(300, 200), orientation)
    prep = Preprocessing(height=60, width=50)
    fast = decode_image(data, prep, max_pixels=CAP).astype(int)
    pil = decode_image(data, prep, max_pixels=CAP, jpeg_decoder="pil").astype(int)
    assert np.abs(fast - pil).max() <= 1


def test_a_truncated_large_jpeg_is_rejected_by_the_torchvision_decoder():
    data = encode(_movie_still(), "JPEG", quality=92)
    with pytest.raises(ImageRejected, match=r"^corrupt or truncated image: Image is incomplete or truncated$"):
        decode_image(data[: len(data) // 2], Preprocessing(height=224, width=224), max_pixels=CAP)


def test_only_jpegs_the_device_decodes_as_the_cpu_does_go_to_the_device():
    """``gpu_decode`` routing: nvjpeg ignores EXIF orientation (torchvision applies it on the CPU
    only) and CMYK is the CPU's to convert; RGB and greyscale upright JPEGs within the cap go."""
    img = _half_red()
    assert is_jpeg(encode(img, "JPEG"), max_pixels=CAP)
    assert is_jpeg(encode(img.convert("L"), "JPEG"), max_pixels=CAP)
    assert is_jpeg(with_exif_orientation(img, 1), max_pixels=CAP)
    assert not is_jpeg(with_exif_orientation(img, 6), max_pixels=CAP)  # a phone photo held upright
    assert not is_jpeg(encode(img.convert("CMYK"), "JPEG"), max_pixels=CAP)
    assert not is_jpeg(encode(img, "JPEG"), max_pixels=img.width * img.height - 1)
    assert not is_jpeg(encode(img, "PNG"), max_pixels=CAP)
    assert not is_jpeg(b"\xff\xd8 not a JPEG", max_pixels=CAP)
