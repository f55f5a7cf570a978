"""The two OpenBLAS builds lmx loads on Linux x86_64, one sgemm at a time, one thread.

cmeel-openblas (MLX's products) is built for ZEN (AVX2) only; scipy-openblas32 (the CPU kernels'
prompt products) picks its kernel set when it loads. The shapes are a Gemma 3 270M prompt chunk's
products: (rows of x) x k times k x n, as the kernels call them (row-major x, W transposed).

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_sgemm_libs.py --repeat 30
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import numpy as np

from lmx.runtime import BLAS  # importing lmx loads both OpenBLAS builds

SHAPES = [(128, 640, 2048), (128, 2048, 640), (128, 640, 320), (512, 640, 2048), (512, 2048, 640)]


def sgemm_of(name: str):  # a ctypes function
    f = getattr(ctypes.CDLL(None), name)
    f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    f.argtypes += [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return f


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if BLAS.kernels_path is None or BLAS.path is None:
        print(f"both builds are needed: {BLAS}", file=sys.stderr)
        return 1
    libs = {
        f"cmeel {BLAS.core}": sgemm_of("cblas_sgemm"),
        f"scipy-openblas32 {BLAS.kernels_core}": sgemm_of("scipy_cblas_sgemm"),
    }
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        y = {name: np.zeros((m, n), np.float32) for name in libs}
        rates: dict[str, list[float]] = {name: [] for name in libs}
        for _ in range(args.rounds):  # alternating
            for name, f in libs.items():
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    f(101, 111, 112, m, n, k, 1.0, x.ctypes.data, k, w.ctypes.data, k, 0.0, y[name].ctypes.data, n)
                    times.append(time.perf_counter() - start)
                rates[name].append(2 * m * n * k / statistics.median(times) / 1e9)
        a, b = y.values()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
        line = "  ".join(f"{name} {statistics.median(r):6.1f}" for name, r in rates.items())
        print(f"{m:4} x {k:4} x {n:4}: GFLOP/s  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
