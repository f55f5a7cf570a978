"""lmx: run, serve and fine-tune Gemma 3 and Qwen 3 on MLX."""

from __future__ import annotations

# Must come first: on Linux it loads OpenBLAS globally before anything imports mlx.core.
from lmx import runtime  # noqa: I001

__version__ = "0.1.0"
