"""The settings registry: every ``LMX_*`` environment variable lmx reads, in one table.

Each :class:`Setting` has a name, a type, a default and one line of doc (vLLM's ``envs.py`` is the
model). :meth:`Setting.get` reads ``os.environ`` at call time, so a test that sets a variable sees it;
an empty value counts as unset; a value that does not parse is an :class:`InvalidOptionError` naming
the variable and the values it takes. No module outside ``lmx.runtime`` reads ``os.environ``: code asks
this registry. The README's settings table is :func:`markdown_table` (``python -m lmx.runtime.settings``
prints it; a test holds the README to it).

This module must not import mlx: :mod:`lmx.runtime.blas` reads it before ``mlx.core`` is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from lmx.errors import InvalidOptionError

T = TypeVar("T")

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: what it is, what it takes, and its value now.

    Attributes:
        name: the variable, e.g. ``LMX_DEVICE``.
        type: the values it takes, in words (the README's "type" column).
        default: the value when it is unset or empty (None: decided elsewhere, see ``default_doc``).
        doc: one line saying what it does.
        parse: turns the variable's text into the value; raises ValueError when it cannot.
        default_doc: the default in words, where ``default`` alone does not say it.
        default_factory: computes the default at call time (it may read other variables).
        secret: its value is never shown (``lmx info`` says only whether it is set).
    """

    name: str
    type: str
    default: T
    doc: str
    parse: Callable[[str], T]
    default_doc: str | None = None
    default_factory: Callable[[], T] | None = None
    secret: bool = False

    def raw(self) -> str | None:
        """The variable's text, or None when it is unset or empty."""
        value = os.environ.get(self.name, "").strip()
        return value or None

    def is_set(self) -> bool:
        """Whether the variable holds a non-empty value."""
        return self.raw() is not None

    def get(self) -> T:
        """The value in force now: the parsed variable, else the default.

        Raises:
            InvalidOptionError: the variable holds a value this setting does not take.
        """
        text = self.raw()
        if text is None:
            return self.default_factory() if self.default_factory is not None else self.default
        try:
            return self.parse(text)
        except ValueError as e:
            raise InvalidOptionError(f"{self.name} must be {self.type}, got {text!r}") from e

    def shown(self) -> Any:
        """The value for display: secrets become ``"(set)"`` / None."""
        if self.secret:
            return "(set)" if self.is_set() else None
        value = self.get()
        return str(value) if isinstance(value, Path) else value


def _bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(text)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        low = text.lower()
        if low not in choices:
            raise ValueError(text)
        return low

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError(text)
    return value


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _str(text: str) -> str:
    return text


def _cache_home() -> Path:
    # XDG_CACHE_HOME is not lmx's, but it decides LMX_HOME's default, so it is read here too.
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "lmx"


BOOL = "one of 1/true/on/yes, 0/false/off/no"

LMX_HOME: Setting[Path] = Setting(
    "LMX_HOME",
    "a directory",
    Path("~/.cache/lmx"),
    "where lmx caches models (the bundled default's GGUF file and its conversion)",
    _path,
    default_doc="`$XDG_CACHE_HOME/lmx`, else `~/.cache/lmx`",
    default_factory=_cache_home,
)
LMX_DEVICE: Setting[str | None] = Setting(
    "LMX_DEVICE",
    "one of cpu, gpu",
    None,
    "the device to run on when none is passed (`--device`, `device=`)",
    _choice("cpu", "gpu"),
    default_doc="the GPU when MLX has one, else the CPU",
)
LMX_BLAS: Setting[str] = Setting(
    "LMX_BLAS",
    "one of auto, bundled",
    "auto",
    "`bundled` keeps MLX's own (reference) BLAS instead of loading OpenBLAS on Linux",
    _choice("auto", "bundled"),
)
LMX_OPENBLAS: Setting[Path | None] = Setting(
    "LMX_OPENBLAS",
    "a file",
    None,
    "the OpenBLAS library to load on Linux, tried before the one `cmeel-openblas` installs",
    _path,
    default_doc="`cmeel-openblas`'s `libopenblas.so`",
)
LMX_BLAS_THREADS: Setting[int] = Setting(
    "LMX_BLAS_THREADS",
    "an integer >= 1",
    1,
    "threads OpenBLAS runs MLX's float32 products on (and lmx's prefill products, when above 1); at 1 "
    "lmx's own pool shares prefill out instead, which degrades gently on a busy machine (RESULTS.md)",
    _positive_int,
)
LMX_CPU_KERNELS: Setting[bool] = Setting(
    "LMX_CPU_KERNELS",
    BOOL,
    True,
    "lmx's C++ CPU kernels (GGUF-block products, fused norms/RoPE/attention); off keeps MLX's float32 path",
    _bool,
)
LMX_CPU_THREADS: Setting[int | None] = Setting(
    "LMX_CPU_THREADS",
    "an integer >= 1",
    None,
    "threads the CPU kernels run on",
    _positive_int,
    default_doc="the physical cores this process may run on",
)
LMX_CPU_INT8: Setting[bool] = Setting(
    "LMX_CPU_INT8",
    BOOL,
    False,
    "opt-in: one-token CPU-kernel products quantize activations to int8 (faster; logits move a few percent)",
    _bool,
)
LMX_CPU_HUGE_PAGES: Setting[bool] = Setting(
    "LMX_CPU_HUGE_PAGES",
    BOOL,
    True,
    "back the CPU kernels' large GGUF matrices with transparent huge pages at load (Linux; the head read "
    "1.4-1.5x faster on an AVX-512 Xeon VM); off leaves them on 4 KiB pages",
    _bool,
)
LMX_GGUF_ON_DEVICE: Setting[str] = Setting(
    "LMX_GGUF_ON_DEVICE",
    "`auto`, `quantized` or `float`",
    "auto",
    "GGUF matrices where lmx's CPU kernels do not run them: MLX affine quantized layers, or dequantized to float; "
    "auto: float (quantized is opt-in until measured on a GPU)",
    _choice("auto", "quantized", "float"),
)
LMX_CUDA_ATTENTION: Setting[bool] = Setting(
    "LMX_CUDA_ATTENTION",
    BOOL,
    True,
    "lmx's one-query CUDA attention kernel for head dims MLX does not fuse (Gemma 3's 256)",
    _bool,
)
LMX_FUSED_PROJECTIONS: Setting[bool] = Setting(
    "LMX_FUSED_PROJECTIONS",
    BOOL,
    True,
    "on a GPU, each layer's query/key/value projections run as one product and its MLP's gate/up as another "
    "(the weights held once, as one array)",
    _bool,
)
LMX_ENCODE_THREAD: Setting[str] = Setting(
    "LMX_ENCODE_THREAD",
    "`auto`, `on` or `off`",
    "auto",
    "a thread of its own queues each decode step (MLX's encoding of its ops) while the next one is built; "
    "auto: on on a CUDA GPU (measured there), off on the CPU and Metal; on: on any device",
    _choice("auto", "on", "off"),
)
LMX_CUDA_QUANTIZED: Setting[bool] = Setting(
    "LMX_CUDA_QUANTIZED",
    BOOL,
    True,
    "on a CUDA GPU, lmx's kernel for a decode step's products by large MLX 4- and 8-bit (affine) matrices "
    "(32 MiB or more: a big model's gate/up and head); 0: MLX's products",
    _bool,
)
LMX_CUDA_DENSE: Setting[bool] = Setting(
    "LMX_CUDA_DENSE",
    BOOL,
    False,
    "lmx's CUDA kernel for a decode step's products by float (bf16, f16, f32) matrices: cheaper for the host to "
    "queue than MLX's, but slower end to end on an H100 (0.86-0.99x), so off",
    _bool,
)
LMX_CUDA_PADDED_ATTENTION: Setting[bool] = Setting(
    "LMX_CUDA_PADDED_ATTENTION",
    BOOL,
    False,
    "the same kernel for the left-padded rows of a batch, any head dim (off until measured on a GPU)",
    _bool,
)


def _kv_bits(text: str) -> int | None:
    low = text.lower()
    if low in ("off", "none", "float"):
        return None
    if low in ("8", "4"):
        return int(low)
    raise ValueError(text)


LMX_KV_BITS: Setting[int | None] = Setting(
    "LMX_KV_BITS",
    "one of 8, 4, off",
    None,
    "keep the KV cache quantized to this many bits when none is passed (`--kv-bits`, `kv_bits=`)",
    _kv_bits,
    default_doc="off (keys and values in the model's dtype)",
)
LMX_API_KEY: Setting[str | None] = Setting(
    "LMX_API_KEY",
    "a string",
    None,
    "`lmx serve` requires this key on every route but /health (`--api-key` overrides)",
    _str,
    default_doc="none: no key",
    secret=True,
)
LMX_TP_STEP_TIMEOUT: Setting[float] = Setting(
    "LMX_TP_STEP_TIMEOUT",
    "a number of seconds > 0",
    120.0,
    "tensor and pipeline parallel: a step that has not finished after this long means a rank is gone; the others stop "
    "with an error (a step waiting on a dead peer can hang inside MLX)",
    _positive_float,
)

SETTINGS: tuple[Setting[Any], ...] = (
    LMX_HOME,
    LMX_DEVICE,
    LMX_BLAS,
    LMX_OPENBLAS,
    LMX_BLAS_THREADS,
    LMX_CPU_KERNELS,
    LMX_CPU_THREADS,
    LMX_CPU_INT8,
    LMX_CPU_HUGE_PAGES,
    LMX_GGUF_ON_DEVICE,
    LMX_CUDA_ATTENTION,
    LMX_FUSED_PROJECTIONS,
    LMX_ENCODE_THREAD,
    LMX_CUDA_PADDED_ATTENTION,
    LMX_CUDA_QUANTIZED,
    LMX_CUDA_DENSE,
    LMX_KV_BITS,
    LMX_API_KEY,
    LMX_TP_STEP_TIMEOUT,
)
_BY_NAME = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting[Any]:
    """The registered setting of this name.

    Raises:
        InvalidOptionError: no setting has this name.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InvalidOptionError(f"no lmx setting is named {name!r}; settings: {', '.join(_BY_NAME)}") from None


def values() -> dict[str, Any]:
    """Every setting's value in force now, for display (``lmx info``); secrets are masked."""
    return {s.name: s.shown() for s in SETTINGS}


def markdown_table() -> str:
    """The README's table of settings, one row per setting, generated from the registry."""
    rows = ["| variable | takes | default | what it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = s.default_doc or (f"`{str(s.default).lower()}`" if isinstance(s.default, bool) else f"`{s.default}`")
        rows.append(f"| `{s.name}` | {s.type} | {default} | {s.doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
