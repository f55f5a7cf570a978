"""Images: decoding (Pillow) under limits, and the SigLIP-style preprocessing of an HF
``preprocessor_config.json`` (Gemma 3's image processor: resize, rescale, normalize, pan and scan).

Every step is the one transformers' Pillow image processor takes, in the same order and dtypes
(``Gemma3ImageProcessorPil``): RGB conversion with alpha composited over white, crops taken from
the 8-bit image, a Pillow resize of the 8-bit image, ``x * (1/255)`` in float64 cast to float32,
then ``(x - mean) / std`` in float32. Pixel values therefore agree with transformers' bit for bit.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmx.errors import ConfigError, ImageError

# An image this many pixels or more is refused before it is decoded (a decompression bomb: a
# small file that expands to gigabytes). 40 megapixels is a 7,000 x 5,700 photo.
MAX_IMAGE_PIXELS = 40_000_000
# The largest encoded image accepted (bytes).
MAX_IMAGE_BYTES = 32 << 20


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # a dependency of lmx; missing only in a broken install
        raise ImageError("reading images needs Pillow: pip install pillow") from e
    return Image


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, WebP, GIF's first frame...) to RGB (H, W, 3) uint8.

    A transparent image is composited over white (as transformers' ``convert_to_rgb`` does).

    Args:
        data: the file's bytes.
        max_pixels: images of this many pixels or more are refused before decoding.
        max_bytes: the largest encoded size accepted.

    Raises:
        ImageError: not an image, truncated, zero-sized, too large in bytes or pixels.
    """
    Image = _pil()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"an image must be given as bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; at most {max_bytes} are accepted")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"the image is too large (a decompression bomb: {e}); fewer than {max_pixels} pixels allowed"
        ) from e
    except (Image.UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"not an image Pillow can read ({len(data)} bytes): {e}") from e
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image is zero-sized ({width}x{height})")
    if width * height >= max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height} pixels; fewer than {max_pixels} allowed")
    try:
        img.load()
        has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt image data
        raise ImageError(f"the image data is truncated or corrupt: {e}") from e
    return np.asarray(rgb, dtype=np.uint8)


def read_image_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """:func:`decode_image` of a file's bytes.

    Raises:
        ImageError: the file cannot be read or is not a usable image.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(f"cannot read the image file {path!r}: {e.strerror or e}") from e
    return decode_image(data, max_pixels, max_bytes)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """A SigLIP-style image processor (the keys of an HF ``preprocessor_config.json``).

    Defaults are transformers' ``Gemma3ImageProcessor`` defaults; published Gemma 3 checkpoints
    set ``size`` to 896 x 896 and leave pan and scan off.
    """

    height: int = 224
    width: int = 224
    resample: int = 2  # PIL.Image.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    @classmethod
    def from_config(cls, config: dict[str, Any], image_size: int | None = None) -> ImageProcessor:
        """Build from ``preprocessor_config.json`` (``image_size``: the vision tower's, when the
        file is absent or names no size)."""
        try:
            return cls._from_config(config, image_size)
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"preprocessor_config.json holds a value of the wrong type: {e}") from e

    @classmethod
    def _from_config(cls, config: dict[str, Any], image_size: int | None) -> ImageProcessor:
        size = config.get("size") or {}
        side = image_size or cls.height
        kw: dict[str, Any] = {
            "height": int(size.get("height", side)),
            "width": int(size.get("width", side)),
        }
        for key in ("do_resize", "do_rescale", "do_normalize", "do_pan_and_scan"):
            if config.get(key) is not None:
                kw[key] = bool(config[key])
        for key in ("resample", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops"):
            if config.get(key) is not None:
                kw[key] = int(config[key])
        for key in ("rescale_factor", "pan_and_scan_min_ratio_to_activate"):
            if config.get(key) is not None:
                kw[key] = float(config[key])
        for key in ("image_mean", "image_std"):
            value = config.get(key)
            if value is not None:
                kw[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        return cls(**kw)

    def crops(self, image: np.ndarray) -> list[np.ndarray]:
        """Pan and scan: crops (H', W', 3) of a long image, or [] (transformers' ``pan_and_scan``)."""
        height, width = image.shape[:2]
        ratio_min, min_crop, max_crops = (
            self.pan_and_scan_min_ratio_to_activate,
            self.pan_and_scan_min_crop_size,
            self.pan_and_scan_max_num_crops,
        )
        if width >= height:
            if width / height < ratio_min:
                return []
            n_w = min(math.floor(width / min_crop), math.floor(width / height + 0.5))
            n_w, n_h = min(max_crops, max(2, n_w)), 1
        else:
            if height / width < ratio_min:
                return []
            n_h = min(math.floor(height / min_crop), math.floor(height / width + 0.5))
            n_w, n_h = 1, min(max_crops, max(2, n_h))
        crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
        if min(crop_w, crop_h) < min_crop:
            return []
        return [
            image[top : top + crop_h, left : left + crop_w]
            for top, left in itertools.product(range(0, crop_h * n_h, crop_h), range(0, crop_w * n_w, crop_w))
        ]

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """One RGB uint8 image (H, W, 3) to the vision tower's input (3, height, width) float32."""
        Image = _pil()
        if self.do_resize:
            resized = Image.fromarray(np.ascontiguousarray(image)).resize((self.width, self.height), self.resample)
            image = np.asarray(resized, dtype=np.uint8)
        x: np.ndarray = image
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean = np.array(self.image_mean, dtype=x.dtype)
            std = np.array(self.image_std, dtype=x.dtype)
            x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32)  # (3, H, W)

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """Images (each RGB uint8 (H, W, 3)) to pixel values (N, 3, height, width), each image
        followed by its pan-and-scan crops, and the number of crops of each image."""
        out, n_crops = [], []
        for image in images:
            crops = self.crops(image) if self.do_pan_and_scan else []
            n_crops.append(len(crops))
            out.extend(self.pixels(x) for x in [image, *crops])
        return np.stack(out) if out else np.zeros((0, 3, self.height, self.width), np.float32), n_crops
