"""A few rows times a float matrix (a decode step's products by bf16, f16 or f32 weights) as one CUDA kernel.

On MLX 0.32.4's CUDA backend a one-row product by a bf16 matrix costs the host 12.0 us to queue,
against 2.9 us for a 4-bit ``quantized_matmul`` and 5.2 us for an ``mx.fast.cuda_kernel``
(``benchmarks/gpu_op_costs.py``, H100, benchmarks/RESULTS.md). A bf16 decode step of Gemma 3 270M
queues 73 of them (four a layer with fused projections, and the head), and such a step is bound
by the host's work per op, not by the card.

:func:`decode_product` computes ``x @ w.T`` (``w`` (N, K), as a ``Linear`` holds it) for up to
:data:`MAX_ROWS` rows of ``x``, the layout of :mod:`lmx.kernels.cuda_quantized`'s kernel without
the unpacking:

- each warp takes ``R`` weight rows, its lanes a 16-byte chunk (8 values of a 16-bit type) of each
  of them per step: a warp reads 512 contiguous bytes of a row at a time, and each lane's chunk
  of ``x`` is read once for its ``R`` rows;
- the sums are float32 (``fmaf``), the warp's lanes summed with shuffles, the result rounded once
  to the output dtype.

Its values are the float32 product up to summation order, as MLX's (cuBLAS's) are: the two can
differ in the output's last place where the float32 sums round to different sides of it.

The kernel has no gradient: :class:`lmx.runtime.ops.CudaOps` runs it inside
:func:`lmx.kernels.cuda_attention.inference` only (a decode step), MLX's product elsewhere. It is
built on first use per shape (it needs a CUDA build of MLX; importing this module does not), and
the switch is ``LMX_CUDA_DENSE`` (off). The GPU check is ``benchmarks/cuda_dense_check.py`` (this
machine's tests cannot run CUDA). Not yet run on a GPU: the source compiles with nvcc 13 for sm_90
(checked on the development machine), but its values and speed are unmeasured (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx

from lmx.kernels.cuda_attention import FLOAT_HEADER, LOAD8_HEADER, kernel_name
from lmx.kernels.cuda_quantized import (
    MAX_ROWS,
    WARP_ROWS_END,
    WARP_ROWS_START,
    WARP_ROWS_SUMS,
    WARPS,
    rows_per_warp,
)

DTYPES = (mx.bfloat16, mx.float16, mx.float32)
PER_CHUNK = 8  # values a lane loads at a time: K must be a multiple
_HEADER = FLOAT_HEADER + LOAD8_HEADER

# Template constants: M (rows of x), K (inner size), N (weight rows), R (weight rows per warp),
# WARPS (warps per block).
_SOURCE = (
    """
    constexpr int CHUNKS = K / 8;              // 8-value chunks in a row
    constexpr int STEPS = (CHUNKS + 31) / 32;  // chunks a lane takes in a row

"""
    + WARP_ROWS_START
    + """
"""
    + WARP_ROWS_SUMS
    + """
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
        const int c = step * 32 + lane;
        if (CHUNKS % 32 == 0 || c < CHUNKS) {
            float wv[R][8];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int row = first + r < N ? first + r : N - 1;  // a short last warp repeats a row
                lmx_load8(w + static_cast<int64_t>(row) * K + c * 8, wv[r]);
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xv[8];
                lmx_load8(x + static_cast<int64_t>(m) * K + c * 8, xv);
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        acc[r][m] = fmaf(xv[i], wv[r][i], acc[r][m]);
                    }
                }
            }
        }
    }

"""
    + WARP_ROWS_END
)


def supported(x: mx.array, w: mx.array) -> bool:
    """Whether :func:`decode_product` takes these inputs: ``w`` (N, K) and ``x`` (..., K) of 1 to
    :data:`MAX_ROWS` rows, K a multiple of 8, one dtype of :data:`DTYPES` for both."""
    if w.ndim != 2 or x.ndim < 1 or x.dtype != w.dtype or x.dtype not in DTYPES:
        return False
    k = x.shape[-1]
    if k == 0 or k % PER_CHUNK or w.shape[1] != k or w.shape[0] == 0:
        return False
    return 1 <= x.size // k <= MAX_ROWS


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    return mx.fast.cuda_kernel(
        name=kernel_name("lmx_dense_product", _SOURCE, _HEADER),
        input_names=["x", "w"],
        output_names=["out"],
        source=_SOURCE,
        header=_HEADER,
        ensure_row_contiguous=True,  # one copy where an input is not (decode rows and weights are)
    )


def decode_product(x: mx.array, w: mx.array, rows: int | None = None) -> mx.array:
    """``x @ w.T`` for a few rows of ``x``.

    Args:
        x: (..., K), at most :data:`MAX_ROWS` rows.
        w: (N, K), ``x``'s dtype.
        rows: weight rows per warp (None: :func:`lmx.kernels.cuda_quantized.rows_per_warp`; for the benchmark).

    Returns:
        (..., N) in ``x``'s dtype.

    Raises:
        ValueError: inputs :func:`supported` does not take.
    """
    if not supported(x, w):
        raise ValueError(
            f"decode_product takes w (N, K) and x (..., K) of 1 to {MAX_ROWS} rows, K a multiple of {PER_CHUNK}, "
            f"both one of {[str(t) for t in DTYPES]}; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}"
        )
    k, n = x.shape[-1], w.shape[0]
    r = rows or rows_per_warp(n)
    blocks = -(-n // (r * WARPS))
    return _kernel()(
        inputs=[x, w],
        # T is unused by the source but names the kernel per dtype (see cuda_attention._run)
        template=[("T", x.dtype), ("M", x.size // k), ("K", k), ("N", n), ("R", r), ("WARPS", WARPS)],
        grid=(blocks * WARPS * 32, 1, 1),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(*x.shape[:-1], n)],  # written row after row: any leading shape, no reshape op
        output_dtypes=[x.dtype],
    )[0]
