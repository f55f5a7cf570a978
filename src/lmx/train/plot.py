"""A loss-curve PNG drawn with numpy and zlib (no plotting library needed).

Train loss is a blue line, validation loss orange dots joined by a line; axes carry tick
values in a built-in 5x7 pixel font.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TRAIN_COLOR = (31, 119, 180)
VAL_COLOR = (255, 127, 14)
_AXIS = (0, 0, 0)
_GRID = (225, 225, 225)
_TEXT = (40, 40, 40)

# 5x7 glyphs: one 5-bit row per line, top to bottom.
_GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C),
    "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "e": (0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E),
    "a": (0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F),
    "i": (0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E),
    "l": (0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "n": (0, 0, 0x16, 0x19, 0x11, 0x11, 0x11),
    "o": (0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E),
    "p": (0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10),
    "r": (0, 0, 0x16, 0x19, 0x10, 0x10, 0x10),
    "s": (0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E),
    "t": (0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06),
    "v": (0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04),
    " ": (0, 0, 0, 0, 0, 0, 0),
}


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.px = np.full((height, width, 3), 255, dtype=np.uint8)

    def dot(self, x: int, y: int, color: tuple[int, int, int], r: int = 0) -> None:
        h, w, _ = self.px.shape
        self.px[max(0, y - r) : min(h, y + r + 1), max(0, x - r) : min(w, x + r + 1)] = color

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], r: int = 0) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), color, r)

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int] = _TEXT) -> None:
        for k, ch in enumerate(s):
            rows = _GLYPHS.get(ch, _GLYPHS[" "])
            for dy, bits in enumerate(rows):
                for dx in range(5):
                    if bits & (0x10 >> dx):
                        self.dot(x + 6 * k + dx, y + dy, color)

    def png(self) -> bytes:
        h, w, _ = self.px.shape
        raw = b"".join(b"\x00" + self.px[row].tobytes() for row in range(h))  # filter 0 per row

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


def _fmt(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-")


def render_loss_curve(
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]] = (),
    *,
    width: int = 640,
    height: int = 400,
) -> bytes:
    """PNG bytes of the loss curves; points are ``(step, loss)``. Non-finite losses are skipped."""
    train = [(s, v) for s, v in train if math.isfinite(v)]
    val = [(s, v) for s, v in val if math.isfinite(v)]
    canvas = _Canvas(width, height)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    points = train + val
    steps = [s for s, _ in points] or [0, 1]
    losses = [v for _, v in points] or [0.0, 1.0]
    x_lo, x_hi = min(steps), max(steps)
    y_lo, y_hi = min(losses), max(losses)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.05, 0.05)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(step: float, loss: float) -> tuple[int, int]:
        x = left + (step - x_lo) / (x_hi - x_lo) * (right - left)
        y = bottom - (loss - y_lo) / (y_hi - y_lo) * (bottom - top)
        return round(x), round(y)

    for i in range(5):
        frac = i / 4
        y = round(bottom - frac * (bottom - top))
        canvas.line(left, y, right, y, _GRID)
        canvas.text(4, y - 3, _fmt(y_lo + frac * (y_hi - y_lo))[:9])
        x = round(left + frac * (right - left))
        canvas.line(x, top, x, bottom, _GRID)
        label = str(round(x_lo + frac * (x_hi - x_lo)))
        canvas.text(x - 3 * len(label), bottom + 8, label)
    canvas.line(left, top, left, bottom, _AXIS)
    canvas.line(left, bottom, right, bottom, _AXIS)
    canvas.text((left + right) // 2 - 12, bottom + 24, "step")
    canvas.text(left, 10, "loss")
    canvas.text(right - 100, 10, "train", TRAIN_COLOR)
    canvas.text(right - 50, 10, "val", VAL_COLOR)
    for series, color, dots in ((train, TRAIN_COLOR, len(train) == 1), (val, VAL_COLOR, True)):
        coords = [px(s, v) for s, v in series]
        for (x0, y0), (x1, y1) in itertools.pairwise(coords):
            canvas.line(x0, y0, x1, y1, color, r=1)
        if dots:
            for x, y in coords:
                canvas.dot(x, y, color, r=3)
    return canvas.png()


def write_loss_curve(
    path: str | os.PathLike, train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]] = ()
) -> Path:
    """Write :func:`render_loss_curve` to ``path`` atomically; return the path."""
    from lmx.runtime.files import write_bytes

    out = Path(path)
    write_bytes(out, render_loss_curve(train, val))
    return out
