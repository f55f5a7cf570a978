"""A few rows times an MLX affine-quantized matrix (a decode step's products) as one CUDA kernel.

On MLX 0.32.4's CUDA backend a one-row product by 4-bit weights (``mx.quantized_matmul``, what
``nn.QuantizedLinear`` runs) reads its weights far below the card's bandwidth: Qwen 3 8B in
4-bit (4.3 GiB of weights, 1.7 ms a token at an H100's copy bandwidth) decoded at 7.5 ms a token,
slower than in bf16 (benchmarks/RESULTS.md, "Fused projections on the GPU").

:func:`decode_product` computes ``x @ dequantize(w).T`` for up to :data:`MAX_ROWS` rows of ``x``:

- each warp takes ``R`` output rows (weight rows), its lanes each a 16-byte chunk of every one
  of them per step (32 weights at 4 bits, 16 at 8): a warp reads 512 contiguous bytes of a
  row at a time, and each lane's share of ``x`` is read once for its ``R`` rows;
- each weight is shifted and masked into the mantissa of 2^23 and 2^23 subtracted (no
  integer-to-float conversion instruction), and the sums are float32: per chunk (which lies in
  one quantization group, scale ``s``, bias ``b``) ``s * sum(x * q) + b * sum(x)``;
- the warp's lanes are summed with shuffles; lane 0 writes the row.

Its values are the float32 product of the dequantized weights up to float32 summation order
(MLX's own kernel, as its source reads, sums 4-bit products in the inputs' dtype), rounded
once to the output dtype. On an H100 its largest error against the float32 product was within
2 units in the last place of the largest output in all 20 cases of
``benchmarks/cuda_quantized_check.py``, and at most MLX's own error in 9 of its 17 comparable
cases (Qwen 3 8B's down: 0.011 against MLX's 0.024; its head: 0.009 against 0.013).
The kernel has no gradient: :class:`lmx.runtime.ops.CudaOps` runs it inside
:func:`lmx.kernels.cuda_attention.inference` only (a decode step), and MLX's product elsewhere.

The kernel is built on first use per shape (it needs a CUDA build of MLX; importing this module
does not). It is on by default on a CUDA GPU (``LMX_CUDA_QUANTIZED=0`` turns it off) since the step
thread: on an H100, Qwen 3 8B in 4 bits decoded 1.10x and 1.21x faster with it than with MLX's
products, faster in 4 of 5 interleaved rounds (before the thread: +14%, +3%, -6% and -3%, within the
host's noise; benchmarks/RESULTS.md). Only matrices of :data:`MIN_WEIGHT_BYTES` or more take it
(:func:`wanted`). The GPU check is ``benchmarks/cuda_quantized_check.py`` (this machine's tests
cannot run CUDA).
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx

from lmx.kernels.cuda_attention import FLOAT_HEADER, LOAD8_HEADER, kernel_name

MAX_ROWS = 8  # rows of x: a decode step's batch; more go to MLX's matrix-matrix kernels
# Packed weights from which a decode step takes the kernel (:func:`wanted`). Alone it reads large
# matrices 1.2-2.1x faster than MLX (Qwen 3 8B's gate/up, 54 MiB: 41 vs 63 us; its head, 334 MiB:
# 166 vs 346 us), but a step is bound by the host's work per op, and each of these ops costs the
# host more than MLX's own: with every product on it, Gemma 3 270M and 1B decoded 8-23% slower, and
# with the step thread Qwen 3 8B decoded slower from 16 MiB (its down too) than from 32 MiB
# (benchmarks/RESULTS.md). Large matrices only: Qwen 3 8B's gate/up and head, a model's head.
MIN_WEIGHT_BYTES = 32 << 20
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = (mx.bfloat16, mx.float16, mx.float32)
WARPS = 4  # warps per thread block

_HEADER = FLOAT_HEADER + LOAD8_HEADER

# The rows-per-warp product kernels' common parts (cuda_dense's too): each warp's first weight row
# (``first``, ``R`` rows from it) and its lane, float32 sums of R weight rows by M rows of x, and the
# sums' warp reduction and store. Template constants M, N, R, WARPS.
WARP_ROWS_START = """\
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * WARPS + threadIdx.x / 32) * R;
    if (first >= N) {
        return;
    }
"""
WARP_ROWS_SUMS = """\
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            acc[r][m] = 0.0f;
        }
    }
"""
WARP_ROWS_END = """\
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[r][m];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                v += __shfl_xor_sync(0xffffffffu, v, off);
            }
            if (lane == 0 && first + r < N) {
                lmx_store(out + static_cast<int64_t>(m) * N + first + r, v);
            }
        }
    }
"""

# Template constants: M (rows of x), K (inner size), N (weight rows), BITS (4 or 8), GS (group
# size), R (weight rows per warp), WARPS (warps per block).
_SOURCE = (
    """
    constexpr int PER_WORD = 32 / BITS;        // weights in one uint32
    constexpr int PER_CHUNK = 4 * PER_WORD;    // weights in one lane's 16-byte chunk
    constexpr int CHUNKS = K / PER_CHUNK;      // chunks in a weight row
    constexpr int STEPS = (CHUNKS + 31) / 32;  // chunks a lane takes in a row
    constexpr int GROUPS = K / GS;
    constexpr uint32_t MASK = (1u << BITS) - 1u;

"""
    + WARP_ROWS_START
    + """    const uint4* wq = reinterpret_cast<const uint4*>(w);

"""
    + WARP_ROWS_SUMS
    + """
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
        const int c = step * 32 + lane;
        if (CHUNKS % 32 == 0 || c < CHUNKS) {
            uint4 q[R];
            float s[R], b[R];
            const int g = (c * PER_CHUNK) / GS;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int row = first + r < N ? first + r : N - 1;  // a short last warp repeats a row
                q[r] = wq[static_cast<int64_t>(row) * CHUNKS + c];
                s[r] = lmx_f32(scales[static_cast<int64_t>(row) * GROUPS + g]);
                b[r] = lmx_f32(biases[static_cast<int64_t>(row) * GROUPS + g]);
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const auto* xm = x + static_cast<int64_t>(m) * K + c * PER_CHUNK;
                float dot[R];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    dot[r] = 0.0f;
                }
                float xsum = 0.0f;
#pragma unroll
                for (int o = 0; o < PER_CHUNK / 8; ++o) {
                    float xv[8];
                    lmx_load8(xm + 8 * o, xv);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        xsum += xv[i];
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const uint32_t words[4] = {q[r].x, q[r].y, q[r].z, q[r].w};
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            const int e = 8 * o + i;  // weight index in the chunk
                            const uint32_t v = (words[e / PER_WORD] >> (BITS * (e % PER_WORD))) & MASK;
                            // 2^23 + v as float bits, minus 2^23: v exactly, no conversion instruction
                            const float wv = __uint_as_float(0x4b000000u | v) - 8388608.0f;
                            dot[r] = fmaf(xv[i], wv, dot[r]);
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    acc[r][m] += s[r] * dot[r] + b[r] * xsum;
                }
            }
        }
    }

"""
    + WARP_ROWS_END
)


def supported(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str
) -> bool:
    """Whether :func:`decode_product` takes these inputs: MLX's affine layout (``mode="affine"``,
    with biases) of 4 or 8 bits in groups of 32, 64 or 128, ``x`` (..., K) of at most
    :data:`MAX_ROWS` rows, one float dtype for ``x``, ``scales`` and ``biases``."""
    if mode != "affine" or biases is None or bits not in BITS or group_size not in GROUP_SIZES:
        return False
    if w.ndim != 2 or scales.ndim != 2 or w.dtype != mx.uint32 or x.ndim < 1:
        return False
    k = x.shape[-1]
    n = w.shape[0]
    rows = x.size // k if k else 0
    return (
        1 <= rows <= MAX_ROWS
        and k % group_size == 0
        and w.shape[1] * 32 == k * bits
        and scales.shape == (n, k // group_size)
        and biases.shape == scales.shape
        and x.dtype in DTYPES
        and scales.dtype == x.dtype
        and biases.dtype == x.dtype
    )


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    return mx.fast.cuda_kernel(
        name=kernel_name("lmx_quantized_product", _SOURCE, _HEADER),
        input_names=["x", "w", "scales", "biases"],
        output_names=["out"],
        source=_SOURCE,
        header=_HEADER,
        ensure_row_contiguous=True,  # one copy of x where it is not (decode rows are)
    )


def wanted(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str
) -> bool:
    """:func:`supported`, for weights of at least :data:`MIN_WEIGHT_BYTES` (where the kernel pays)."""
    return w.nbytes >= MIN_WEIGHT_BYTES and supported(x, w, scales, biases, group_size, bits, mode)


def rows_per_warp(n: int) -> int:
    """Weight rows each warp takes: 4 where that still gives a block to each SM of a large card
    (132 SMs; 4 was as fast or faster than 1 or 2 on every shape timed), fewer for small matrices."""
    for r in (4, 2):
        if n // (r * WARPS) >= 132:
            return r
    return 1


def decode_product(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int, rows: int | None = None
) -> mx.array:
    """``x @ dequantize(w, scales, biases).T`` (``mx.quantized_matmul(..., transpose=True)``).

    Args:
        x: (..., K), at most :data:`MAX_ROWS` rows.
        w, scales, biases: ``mx.quantize``'s (N, K * bits / 32) uint32, (N, K / group_size) and
            (N, K / group_size), the last two in ``x``'s dtype.
        group_size, bits: the layout (32/64/128; 4 or 8).
        rows: weight rows per warp (None: :func:`rows_per_warp`; for the benchmark).

    Returns:
        (..., N) in ``x``'s dtype.

    Raises:
        ValueError: inputs :func:`supported` does not take.
    """
    if not supported(x, w, scales, biases, group_size, bits, "affine"):
        raise ValueError(
            f"decode_product takes x (..., K) of 1 to {MAX_ROWS} rows, affine weights of {BITS} bits in groups "
            f"of {GROUP_SIZES} with scales and biases in x's dtype ({[str(t) for t in DTYPES]}); got x {x.shape} "
            f"{x.dtype}, w {w.shape} {w.dtype}, scales {scales.shape} {scales.dtype}, biases "
            f"{None if biases is None else (biases.shape, biases.dtype)}, group_size {group_size}, bits {bits}"
        )
    k, n = x.shape[-1], w.shape[0]
    m = x.size // k
    r = rows or rows_per_warp(n)
    blocks = -(-n // (r * WARPS))
    out = _kernel()(
        inputs=[x, w, scales, biases],
        template=[
            ("T", x.dtype),  # unused by the source; names the kernel per dtype (see cuda_attention._run)
            ("M", m),
            ("K", k),
            ("N", n),
            ("BITS", bits),
            ("GS", group_size),
            ("R", r),
            ("WARPS", WARPS),
        ],
        grid=(blocks * WARPS * 32, 1, 1),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x.dtype],
    )[0]
    return out.reshape(*x.shape[:-1], n)
