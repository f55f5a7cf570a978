"""CPU kernels (C++ MLX extension): matmul against GGUF-quantized weights, decoded in registers.

On the CPU, MLX's float32 matrix-vector product is bound by memory: Gemma 3 270M reads 1.07 GB of
float32 weights a token. These kernels keep a GGUF file's Q8_0/Q5_0/Q4_0/Q4_K/Q6_K blocks as they are
(about a quarter of the bytes) and decode each weight to exactly the float32 value the dequantized
model holds, so logits match the float32 path up to summation order. See benchmarks/RESULTS.md.

The module is built by ``python -m lmx.kernels.build`` (``make run``, ``make test`` and ``make kernels`` run it). Set
``LMX_CPU_KERNELS=0`` to keep MLX's float32 path, ``LMX_CPU_THREADS=n`` to pick the thread count
(default: the physical cores this process may run on).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from lmx.runtime import settings

logger = logging.getLogger(__name__)

# GGML type ids the kernels read (ggml.h).
GGML_TYPES = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
ENV_SWITCH = settings.LMX_CPU_KERNELS.name
ENV_THREADS = settings.LMX_CPU_THREADS.name
# Opt-in: one-token products with int8-quantized activations (llama.cpp's arithmetic; changes logits).
ENV_INT8 = settings.LMX_CPU_INT8.name


@dataclass(frozen=True)
class KernelStatus:
    """Whether the CPU kernels can be used, and if not, why.

    Attributes:
        available: the module is built for this MLX and imports.
        reason: why not, when not.
        threads: threads the kernels run on.
        simd: ``"avx2"`` or ``"scalar"``.
        int8_activations: ``LMX_CPU_INT8=1``: products of up to 8 rows quantize the activations
            to int8 (AVX2 only).
    """

    available: bool
    reason: str | None = None
    threads: int = 0
    simd: str = ""
    int8_activations: bool = False


def enabled_by_env() -> bool:
    """False when ``LMX_CPU_KERNELS`` is 0/false/off/no."""
    return settings.LMX_CPU_KERNELS.get()


def int8_by_env() -> bool:
    """True when ``LMX_CPU_INT8`` is 1/true/on/yes (default off: exact float32 products)."""
    return settings.LMX_CPU_INT8.get()


def huge_pages_by_env() -> bool:
    """False when ``LMX_CPU_HUGE_PAGES`` is 0/false/off/no (default on: see :func:`lmx.models.gguf_layers.use_huge_pages`)."""
    return settings.LMX_CPU_HUGE_PAGES.get()


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads share a core's memory path)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text()))
        except OSError:
            cores.add(("", str(cpu)))
    return max(1, len(cores))


def _threads() -> int:
    return settings.LMX_CPU_THREADS.get() or physical_cores()


@functools.lru_cache(maxsize=1)
def load_module() -> tuple[ModuleType | None, str | None]:
    """Import the built module once, if it was built for this MLX and these sources.

    Unlike :func:`kernels`, this ignores ``LMX_CPU_KERNELS``: a caller that requires the kernels
    (``lmx.load(..., cpu_kernels=True)``, a model holding GGUF-block layers) asks for them here.

    Returns:
        ``(module, None)``, or ``(None, why not)``.
    """
    from lmx.kernels import build

    if (why := build.supported_platform()) is not None:
        return None, why
    if not build.module_path().is_file():
        return None, "not built (run `python -m lmx.kernels.build` or `make kernels`)"
    try:
        stamp = json.loads(build.STAMP.read_text())
    except (OSError, ValueError):
        stamp = None
    expected = build.expected_stamp()
    if stamp != expected:
        return None, f"built for {stamp}, need {expected}: rebuild with `python -m lmx.kernels.build`"
    try:
        from lmx.kernels import _lmx_kernels as module
    except ImportError as e:
        return None, f"the built module does not import: {e}"
    if (why := _self_test(module)) is not None:
        return None, why
    module.set_num_threads(_threads())
    return module, None


def _self_test(module: ModuleType) -> str | None:
    """One tiny product: the module must take and return MLX arrays (same nanobind ABI as mlx.core)."""
    import mlx.core as mx
    import numpy as np

    block = np.zeros((1, 34), dtype=np.uint8)
    block[0, :2] = np.array([1.0], dtype="<f2").view(np.uint8)  # scale 1.0
    block[0, 2:] = np.arange(32, dtype=np.int8).view(np.uint8)
    try:
        y = module.qmatmul(mx.ones((1, 32), dtype=mx.float32), mx.array(block), GGML_TYPES["Q8_0"], 32, stream=mx.cpu)
        value = y.item()
    except (TypeError, RuntimeError, ValueError) as e:
        return f"the built module does not work with this MLX ({type(e).__name__}: {e}); rebuild it"
    if value != float(sum(range(32))):
        return f"the built module computes wrong values (self-test gave {value}, expected {sum(range(32))})"
    return None


def kernels() -> ModuleType | None:
    """The kernel module, or None when unavailable or switched off (``LMX_CPU_KERNELS=0``)."""
    if not enabled_by_env():
        return None
    return load_module()[0]


def status() -> KernelStatus:
    """What :func:`kernels` gives, and why (for ``lmx info``)."""
    if not enabled_by_env():
        return KernelStatus(False, f"{ENV_SWITCH}=0")
    module, reason = load_module()
    if module is None:
        return KernelStatus(False, reason)
    avx2 = module.has_avx2()
    return KernelStatus(True, None, module.num_threads(), "avx2" if avx2 else "scalar", avx2 and int8_by_env())


__all__ = [
    "ENV_INT8",
    "ENV_SWITCH",
    "ENV_THREADS",
    "GGML_TYPES",
    "KernelStatus",
    "enabled_by_env",
    "huge_pages_by_env",
    "int8_by_env",
    "kernels",
    "load_module",
    "status",
]
