"""Image decoding and preprocessing against transformers' Gemma 3 image processor (Pillow backend)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lmx.errors import ImageError
from lmx.io.image import ImageProcessor, decode_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.randint(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def reference(img: Image.Image, **kw) -> tuple[np.ndarray, list[int]]:
    from transformers import Gemma3ImageProcessor

    proc = Gemma3ImageProcessor(size={"height": 64, "width": 64}, **kw)
    out = proc(images=[img], return_tensors="np")
    return np.asarray(out["pixel_values"]), list(np.asarray(out["num_crops"]).reshape(-1))


CASES = {
    "rgb-png": lambda: encode(random_image(50, 37)),
    "rgba-png": lambda: encode(random_image(40, 90, "RGBA", 1)),
    "gray-png": lambda: encode(random_image(33, 33, "L", 2)),
    "palette-transparent": lambda: encode(random_image(30, 20, seed=3).convert("P"), transparency=5),
    "jpeg": lambda: encode(random_image(120, 80, seed=4), "JPEG", quality=80),
    "upscale": lambda: encode(random_image(7, 5, seed=5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_equal_transformers(case):
    data = CASES[case]()
    ours, crops = ImageProcessor(height=64, width=64)([decode_image(data)])
    ref, ref_crops = reference(Image.open(io.BytesIO(data)))
    assert ours.shape == ref.shape == (1, 3, 64, 64)
    assert crops == ref_crops == [0]
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("size", [(900, 300), (300, 1000), (600, 560), (300, 100)])
def test_pan_and_scan_equals_transformers(size):
    data = encode(random_image(*size, seed=7))
    pas = dict(
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=128,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    ours, crops = ImageProcessor(height=64, width=64, **pas)([decode_image(data)])
    ref, ref_crops = reference(Image.open(io.BytesIO(data)), **pas)
    assert crops == ref_crops
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    expected = {(900, 300): 3, (300, 1000): 3, (600, 560): 0, (300, 100): 0}[size]  # 300x100: crops 100 high
    assert crops == [expected]


def test_config_keys_are_read():
    proc = ImageProcessor.from_config(
        {"size": {"height": 896, "width": 896}, "image_mean": [0.1, 0.2, 0.3], "do_pan_and_scan": None}
    )
    assert (proc.height, proc.width, proc.image_mean, proc.do_pan_and_scan) == (896, 896, (0.1, 0.2, 0.3), False)
    assert ImageProcessor.from_config({}, image_size=32).height == 32


def test_bad_images_are_typed_errors():
    good = encode(random_image(64, 64))
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"hello, this is text and not a picture")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="truncated|corrupt|not an image"):
        decode_image(encode(random_image(64, 64), "JPEG")[:300])
    with pytest.raises(ImageError, match="truncated|corrupt|not an image"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(ImageError, match="bytes"):
        decode_image(good, max_bytes=100)
    with pytest.raises(ImageError, match="must be given as bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_decompression_bomb_is_refused_before_decoding():
    # 8000 x 8000 of one colour compresses to some 64 KB but would decode to 192 MB of RGB
    bomb = encode(Image.new("L", (8000, 8000)), optimize=True)
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="8000x8000"):
        decode_image(bomb)
    with pytest.raises(ImageError, match="pixels"):
        decode_image(encode(random_image(64, 64)), max_pixels=64 * 64)
    assert decode_image(encode(random_image(64, 64)), max_pixels=64 * 64 + 1).shape == (64, 64, 3)
