"""One-query (decode) attention as one CUDA kernel, where MLX's CUDA backend has no fused one.

On MLX 0.32.4's CUDA backend ``mx.fast.scaled_dot_product_attention`` is one op only for a head
dim its kernels take: the vector kernel (``sdpa_vector``: head_dim 64, 96 or 128, fewer than 4
queries, no mask array) or cuDNN (float16/bfloat16, head_dim a multiple of 8 up to 128; for one
query only over 256+ keys sliced from a cache whose storage is a multiple of 256). Any other head
dim falls back to separate ops built with the graph: the scale, the grouped-query reshapes and
broadcasts, matmul, softmax, matmul, reshape (12 ops, counted). Gemma 3 (head_dim 256) pays them
in every layer and step, and a GPU decode step is bound by host work per op
(benchmarks/RESULTS.md): 198 of the 714 ops of a Gemma 3 270M step, 286 of 1024 for the 1B.

:func:`decode_attention` computes the same thing as one op: a flash-decoding kernel with one
thread block per (batch row, query head), its lanes ``head_dim / 32`` elements each, an online
softmax in float32 (base 2), and the warps' partial results combined in shared memory. Its warps
take one key at a time (every ``WARPS``-th), or, over :data:`TILED_MIN_KEYS` keys or more whose
rows allow vector loads, 4-8 keys at once with every row's loads in flight before any is used (on
an H100 1.7-2.4x faster a call at 8,192 keys). With :data:`SPLIT_KEYS` (off until measured on a GPU)
a long key range is split over several blocks per (row, head), whose partial results a second
kernel combines (:func:`splits`). Keys and values are read through their strides, so the
cache views ``update_and_fetch`` returns (prefixes of the storage, the rotating window) are not
copied. Scores, softmax and sums stay in float32 (the fallback rounds the scores and the
probabilities to the inputs' dtype), so in bf16 the results differ from the fallback by bf16
rounding.

The kernel is built on first use (it needs a CUDA build of MLX; importing this module does not).
``LMX_CUDA_ATTENTION=0`` keeps MLX's own path. The GPU check is
``benchmarks/cuda_attention_check.py`` (this machine's tests cannot run CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import struct
import threading
from collections.abc import Iterator
from typing import Any

import mlx.core as mx

from lmx.runtime import settings

ENV_SWITCH = settings.LMX_CUDA_ATTENTION.name
# Head dims MLX 0.32.4's CUDA attention fuses for one query (sdpa_vector; cuDNN covers a subset).
FUSED_HEAD_DIMS = frozenset({64, 96, 128})
DTYPES = (mx.bfloat16, mx.float16, mx.float32)
MAX_HEAD_DIM = 1024  # the warps' partial outputs (WARPS x head_dim floats) stay at 32 KiB of shared memory
# Whether the kernel takes its tiled loop where a cache's rows allow it (see _SOURCE; False: the strided
# loop for every input, as before 2026-12-07, for benchmarks/gpu_vs_mlx_lm.py's A/B), from how many keys.
# On an H100 (benchmarks/RESULTS.md) a call over 8,192 keys took 125 us tiled against 210 strided (Gemma's
# 4/1 heads of 256) and 85 against 183 (Qwen 3 0.6B's 16/8 of 128); over 640 keys the tiled call was
# faster alone too (at most 22 against 34 us), but Gemma 3 270M and 1B decoded no faster with it end to end
# (0.92-0.98x). So short caches keep the strided loop; 2,048 lies between the two measured lengths.
TILED_KEYS = True
TILED_MIN_KEYS = 2048
# Whether long key ranges are split over several blocks per (row, head) (a second kernel combines their
# partial results; see :func:`splits`), from how many keys. Off until measured on a GPU: over 8,192 keys
# MLX's kernels, which split them, were still 1.7-2.9x faster a call than the tiled loop on an H100.
SPLIT_KEYS = False
SPLIT_MIN_KEYS = 2048


def kernel_name(base: str, source: str, header: str) -> str:
    """``base`` and a digest of the kernel's text, the name to give ``mx.fast.cuda_kernel``.

    MLX's CUDA backend keys a compiled custom kernel by its name and template arguments only: in
    the process, and on disk in its PTX cache (``MLX_PTX_CACHE_DIR``, by default under the temp
    directory, per MLX version). A kernel whose source changed under the same name (a new lmx on
    the same MLX) would run the binary compiled from the old source; with the digest in the name
    it compiles its own.
    """
    digest = hashlib.sha256(f"{header}\0{source}".encode()).hexdigest()[:16]
    return f"{base}_{digest}"


# float <-> the inputs' dtypes, for lmx's CUDA kernels (cuda_quantized's too)
FLOAT_HEADER = """
__device__ inline float lmx_f32(float x) { return x; }
__device__ inline float lmx_f32(__half x) { return __half2float(x); }
__device__ inline float lmx_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline void lmx_store(float* p, float x) { *p = x; }
__device__ inline void lmx_store(__half* p, float x) { *p = __float2half(x); }
__device__ inline void lmx_store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
"""

# Eight consecutive values as floats, in one or two vector loads (the product kernels' inner loop)
LOAD8_HEADER = """
// Eight consecutive values (16-byte aligned for 16-bit types, 32-byte for float) as floats.
__device__ inline void lmx_load8(const __nv_bfloat16* p, float* o) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ inline void lmx_load8(const __half* p, float* o) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}
__device__ inline void lmx_load8(const float* p, float* o) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
"""

# Raw 32-bit words of a row as floats (the tiled loop's loads: 16-bit types hold two values a word)
WORDS_HEADER = """
__device__ inline void lmx_unpack(uint32_t w, const __nv_bfloat16*, float* o) {
    o[0] = __uint_as_float(w << 16);
    o[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ inline void lmx_unpack(uint32_t w, const __half*, float* o) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    o[0] = f.x;
    o[1] = f.y;
}
__device__ inline void lmx_unpack(uint32_t w, const float*, float* o) { o[0] = __uint_as_float(w); }
// W consecutive 32-bit words from p (aligned to min(16, 4 W) bytes), in the widest loads that fit.
template <int W>
__device__ inline void lmx_load_words(const void* p, uint32_t* w) {
    if constexpr (W % 4 == 0) {
#pragma unroll
        for (int i = 0; i < W / 4; ++i) {
            const uint4 v = reinterpret_cast<const uint4*>(p)[i];
            w[4 * i] = v.x;
            w[4 * i + 1] = v.y;
            w[4 * i + 2] = v.z;
            w[4 * i + 3] = v.w;
        }
    } else if constexpr (W == 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        w[0] = v.x;
        w[1] = v.y;
    } else {
        static_assert(W == 1, "a row's share per lane is 1, 2 or a multiple of 4 words");
        w[0] = *reinterpret_cast<const uint32_t*>(p);
    }
}
"""

_HEADER = FLOAT_HEADER + WORDS_HEADER

# Template constants: T (the inputs' dtype), D (head dim, a multiple of 32), WARPS (warps per block),
# SCALE_BITS (the softmax scale's float32 bits: a compile-time constant, one kernel per distinct
# scale), TILED (the tiled loop below where the rows allow it) and KT (keys a warp takes at once).
#
# Two loops over the keys. The tiled one (keys and values with a unit element stride and rows aligned
# for vector loads, as a cache's storage and its slices are): lane l holds elements [l * PER_LANE,
# (l + 1) * PER_LANE) of a row, read in 16-, 8- or 4-byte loads, and each warp loads KT keys' and
# values' rows before it uses any, so a warp has 2 KT row reads in flight instead of waiting for
# each key in turn. The strided one (any strides): lane l holds elements l, l + 32, ..., one key
# per warp at a time. Both keep an online softmax in float32 (base 2); a tile updates it once.
_SOURCE = """
    constexpr int PER_LANE = D / 32;
    constexpr int ROW_BYTES = PER_LANE * int(sizeof(T));  // a lane's share of a row
    constexpr bool TILE = TILED && ROW_BYTES % 4 == 0;
    constexpr int ROW_WORDS = TILE ? ROW_BYTES / 4 : 1;
    constexpr int ALIGN = ROW_BYTES < 16 ? ROW_BYTES : 16;
    const float neg_inf = __uint_as_float(0xff800000u);
    const float qscale = __int_as_float(SCALE_BITS) * 1.4426950408889634f;  // scores in base 2

    const int head = blockIdx.x;
    const int batch = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int n_heads = q_shape[1];
    const int kv_head = head / (n_heads / k_shape[1]);

    const auto* qh = q + batch * q_strides[0] + head * q_strides[1];
    const auto* kh = k + batch * k_strides[0] + kv_head * k_strides[1];
    const auto* vh = v + batch * v_strides[0] + kv_head * v_strides[1];
    const int64_t q_d = q_strides[3];
    const int64_t k_t = k_strides[2], k_d = k_strides[3];
    const int64_t v_t = v_strides[2], v_d = v_strides[3];
    // The keys this block takes: all of [FIRST_KEY, END_KEY), or its share of them where the grid
    // splits them over gridDim.z blocks (the split kernel, which writes partial results).
    const int range_first = FIRST_KEY;
    const int range_end = END_KEY;
    const int chunk = (range_end - range_first + int(gridDim.z) - 1) / int(gridDim.z);
    const int first_key = range_first + int(blockIdx.z) * chunk;
    const int end_key = min(range_end, first_key + chunk);
    const bool tiled = TILE && k_d == 1 && v_d == 1 && (k_t * int64_t(sizeof(T))) % ALIGN == 0
        && (v_t * int64_t(sizeof(T))) % ALIGN == 0 && reinterpret_cast<uintptr_t>(kh) % ALIGN == 0
        && reinterpret_cast<uintptr_t>(vh) % ALIGN == 0;  // the same for the whole block

    float qr[PER_LANE];
    float acc[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        const int e = tiled ? lane * PER_LANE + j : lane + 32 * j;  // the element this register holds
        qr[j] = qscale * lmx_f32(qh[e * q_d]);
        acc[j] = 0.0f;
    }

    float m = neg_inf;  // running max of this warp's scores
    float l = 0.0f;     // running sum of exp2(score - m)
    auto strided = [&]() {  // any strides: lane l holds elements l, l + 32, ...; one key a warp at a time
        for (int i = first_key + warp; i < end_key; i += WARPS) {
            const auto* kr = kh + i * k_t;
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                s += qr[j] * lmx_f32(kr[(lane + 32 * j) * k_d]);
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                s += __shfl_xor_sync(0xffffffffu, s, off);
            }
            const float m_new = fmaxf(m, s);
            const float corr = exp2f(m - m_new);  // 0 for the first key (m = -inf)
            const float p = exp2f(s - m_new);
            l = l * corr + p;
            const auto* vr = vh + i * v_t;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                acc[j] = acc[j] * corr + p * lmx_f32(vr[(lane + 32 * j) * v_d]);
            }
            m = m_new;
        }
    };
TILE_LOOP
    __shared__ float warp_max[WARPS];
    __shared__ float warp_sum[WARPS];
    __shared__ float part[WARPS][D];
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum[warp] = l;
    }
    __syncthreads();
    float top = neg_inf;
    for (int w = 0; w < WARPS; ++w) {
        top = fmaxf(top, warp_max[w]);
    }
    const float mine = m == neg_inf ? 0.0f : exp2f(m - top);  // a warp without keys adds nothing
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        part[warp][tiled ? lane * PER_LANE + j : lane + 32 * j] = acc[j] * mine;
    }
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
        total += warp_max[w] == neg_inf ? 0.0f : warp_sum[w] * exp2f(warp_max[w] - top);
    }
"""

# The tiled loop and the choice between the loops (the kernels built with TILED; the others take the strided
# loop only, and their shorter source costs the host less to hash at each call: MLX keys a kernel by it)
_TILE_LOOP = """
    auto tiles = [&]() {  // lane l holds elements [l * PER_LANE, (l + 1) * PER_LANE); KT keys a warp at a time
        constexpr int PER_WORD = 4 / int(sizeof(T));  // values a 32-bit word holds: 2 or 1
        constexpr int X_SIZE = ROW_WORDS * PER_WORD;   // PER_LANE where TILE (this lambda runs only then)
        const auto* kl = kh + lane * PER_LANE;
        const auto* vl = vh + lane * PER_LANE;
        for (int base = first_key + warp * KT; base < end_key; base += WARPS * KT) {
            uint32_t kw[KT][ROW_WORDS];
            uint32_t vw[KT][ROW_WORDS];
#pragma unroll
            for (int t = 0; t < KT; ++t) {  // every row's loads first: 2 KT reads in flight
                if (base + t < end_key) {
                    lmx_load_words<ROW_WORDS>(kl + (base + t) * k_t, kw[t]);
                    lmx_load_words<ROW_WORDS>(vl + (base + t) * v_t, vw[t]);
                } else {  // past the end: zeros (a probability of 0 times garbage could be NaN)
#pragma unroll
                    for (int w = 0; w < ROW_WORDS; ++w) {
                        kw[t][w] = 0u;
                        vw[t][w] = 0u;
                    }
                }
            }
            float s[KT];
#pragma unroll
            for (int t = 0; t < KT; ++t) {
                float x[X_SIZE];
#pragma unroll
                for (int w = 0; w < ROW_WORDS; ++w) {
                    lmx_unpack(kw[t][w], k, x + w * PER_WORD);
                }
                float dot = 0.0f;
#pragma unroll
                for (int j = 0; j < PER_LANE; ++j) {
                    dot += qr[j] * x[j];
                }
                s[t] = dot;
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
                for (int t = 0; t < KT; ++t) {
                    s[t] += __shfl_xor_sync(0xffffffffu, s[t], off);
                }
            }
            float tile_max = neg_inf;
#pragma unroll
            for (int t = 0; t < KT; ++t) {
                s[t] = base + t < end_key ? s[t] : neg_inf;
                tile_max = fmaxf(tile_max, s[t]);
            }
            const float m_new = fmaxf(m, tile_max);  // finite: the tile's first key is in range
            const float corr = exp2f(m - m_new);      // 0 for the first tile (m = -inf)
            l *= corr;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                acc[j] *= corr;
            }
#pragma unroll
            for (int t = 0; t < KT; ++t) {
                const float p = exp2f(s[t] - m_new);  // 0 past the end
                l += p;
                float x[X_SIZE];
#pragma unroll
                for (int w = 0; w < ROW_WORDS; ++w) {
                    lmx_unpack(vw[t][w], v, x + w * PER_WORD);
                }
#pragma unroll
                for (int j = 0; j < PER_LANE; ++j) {
                    acc[j] = fmaf(p, x[j], acc[j]);
                }
            }
            m = m_new;
        }
    };
    if constexpr (TILE) {
        if (tiled) {
            tiles();
        } else {
            strided();
        }
    } else {
        strided();
    }

"""

# The block's output: softmax-weighted values, normalized.
_WRITE_OUT = """
    const float inv = 1.0f / total;
    auto* o = out + (static_cast<int64_t>(batch) * n_heads + head) * D;
    for (int d = threadIdx.x; d < D; d += WARPS * 32) {
        float sum = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            sum += part[w][d];
        }
        lmx_store(o + d, sum * inv);
    }
"""

# A split block's partial result (float32): its unnormalized sums relative to its max score, and that
# max and its sum of exp2(score - max) (-inf and 0 for a block without keys), for _COMBINE.
_WRITE_PART = """
    const int64_t r = (static_cast<int64_t>(batch) * n_heads + head) * gridDim.z + blockIdx.z;
    for (int d = threadIdx.x; d < D; d += WARPS * 32) {
        float sum = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            sum += part[w][d];
        }
        part_acc[r * D + d] = sum;
    }
    if (threadIdx.x == 0) {
        part_stats[2 * r] = top;
        part_stats[2 * r + 1] = total;
    }
"""

# Template constants: T (the output dtype), D. One block per (head, batch row): the split blocks'
# partial results combined into the row's output, as the blocks of one kernel combine their warps'.
_COMBINE = """
    const float neg_inf = __uint_as_float(0xff800000u);
    const int head = blockIdx.x;
    const int batch = blockIdx.y;
    const int n_heads = part_acc_shape[1];
    const int splits = part_acc_shape[2];
    const int64_t r0 = (static_cast<int64_t>(batch) * n_heads + head) * splits;
    float top = neg_inf;
    for (int i = 0; i < splits; ++i) {
        top = fmaxf(top, part_stats[2 * (r0 + i)]);
    }
    float total = 0.0f;
    for (int i = 0; i < splits; ++i) {
        const float m = part_stats[2 * (r0 + i)];
        total += m == neg_inf ? 0.0f : part_stats[2 * (r0 + i) + 1] * exp2f(m - top);
    }
    const float inv = 1.0f / total;
    auto* o = out + (static_cast<int64_t>(batch) * n_heads + head) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.0f;
        for (int i = 0; i < splits; ++i) {
            const float m = part_stats[2 * (r0 + i)];
            sum += m == neg_inf ? 0.0f : part_acc[(r0 + i) * D + d] * exp2f(m - top);
        }
        lmx_store(o + d, sum * inv);
    }
"""


def enabled_by_env() -> bool:
    """False when ``LMX_CUDA_ATTENTION`` is 0/false/off/no."""
    return settings.LMX_CUDA_ATTENTION.get()


def padded_by_env() -> bool:
    """True when ``LMX_CUDA_PADDED_ATTENTION`` is 1/true/on/yes: padded rows of a batch take
    :func:`decode_attention_from` (not yet measured on a GPU, so not the default)."""
    return settings.LMX_CUDA_PADDED_ATTENTION.get()


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether this MLX was built with its CUDA backend and sees a device."""
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def supported(queries: mx.array, keys: mx.array, values: mx.array) -> bool:
    """Whether :func:`decode_attention` takes these inputs: one query, (B, H, 1, D) / (B, H_kv, L, D),
    H a multiple of H_kv, D a multiple of 32 up to 1024, one float dtype for all three."""
    qs, ks, vs = queries.shape, keys.shape, values.shape
    dtype = queries.dtype
    return (
        len(qs) == 4
        and len(ks) == 4
        and qs[2] == 1
        and qs[3] % 32 == 0
        and qs[3] <= MAX_HEAD_DIM
        and ks[3] == qs[3]
        and vs == ks
        and ks[2] >= 1
        and ks[0] == qs[0]
        and qs[1] % ks[1] == 0
        and dtype in DTYPES
        and keys.dtype == dtype
        and values.dtype == dtype
    )


def fits(queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> bool:
    """Whether attention of these inputs (no mask, no softcap) is better run as :func:`decode_attention`
    on a CUDA GPU: a head dim MLX does not fuse, inputs :func:`supported` takes. (The device and the
    switch are the device profile's choice, made once at load: :class:`lmx.runtime.ops.CudaOps`.)"""
    return (
        queries.shape[-1] not in FUSED_HEAD_DIMS  # first: rejects Qwen 3 (and most models) at once
        and scale > 0
        and supported(queries, keys, values)
    )


def wanted(queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> bool:
    """:func:`fits`, on a CUDA GPU, unless ``LMX_CUDA_ATTENTION=0`` (the whole check, for scripts)."""
    return (
        fits(queries, keys, values, scale) and mx.default_device() == mx.gpu and cuda_available() and enabled_by_env()
    )


# What each kernel's rows attend to: its name, its extra input, the first key and the end
_RANGES = {
    "all": ("lmx_decode_attention", None, "0", "k_shape[2]"),
    "first": ("lmx_decode_attention_from", "first", "first[batch]", "k_shape[2]"),  # (B,): each row's first key
    "span": ("lmx_decode_attention_span", "span", "span[0]", "span[1]"),  # (2,): [first, end) for every row
}


def kernel_source(keys: str = "all", split: bool = False, tiled: bool = False) -> str:
    """The source of :func:`_kernel`'s kernel (``tiled``: with the tiled loop; its template's ``TILED``
    must then be true)."""
    _, _, first, end = _RANGES[keys]
    source = _SOURCE.replace("TILE_LOOP\n", _TILE_LOOP if tiled else "    strided();\n\n")
    return (source + (_WRITE_PART if split else _WRITE_OUT)).replace("FIRST_KEY", first).replace("END_KEY", end)


@functools.lru_cache(maxsize=12)
def _kernel(keys: str = "all", split: bool = False, tiled: bool = False) -> Any:
    """The kernel over the keys ``keys`` names (:data:`_RANGES`): every key; from index ``first[b]``
    on for row ``b`` (a batch's left padding before a row's own positions); or ``span[0] <= i <
    span[1]`` for every row (a compiled decode step's slots in use in its fixed storage). ``split``:
    the kernel whose blocks each take a share of those keys and write partial results; ``tiled``: the
    one with the tiled loop (else the strided loop only)."""
    base, extra, _, _ = _RANGES[keys]
    source = kernel_source(keys, split, tiled)
    base = base + ("_split" if split else "") + ("_tiled" if tiled else "")
    return mx.fast.cuda_kernel(
        name=kernel_name(base, source, _HEADER),
        input_names=["q", "k", "v"] + ([extra] if extra else []),
        output_names=["part_acc", "part_stats"] if split else ["out"],
        source=source,
        header=_HEADER,
        ensure_row_contiguous=False,  # the kernel reads strides: cache views are not copied
    )


@functools.lru_cache(maxsize=1)
def _combine_kernel() -> Any:
    """The kernel that combines a split kernel's partial results (:data:`_COMBINE`)."""
    return mx.fast.cuda_kernel(
        name=kernel_name("lmx_decode_attention_combine", _COMBINE, FLOAT_HEADER),
        input_names=["part_acc", "part_stats"],
        output_names=["out"],
        source=_COMBINE,
        header=FLOAT_HEADER,
    )


def splits(batch: int, n_heads: int, n_keys: int) -> int:
    """Blocks a (row, head)'s keys are split over (:data:`SPLIT_KEYS`): enough for about 256 blocks in
    all, each with 128 keys or more, at most 64."""
    return max(1, min(64, -(-256 // (batch * n_heads)), n_keys // 128))


@functools.lru_cache(maxsize=64)
def _float_bits(scale: float) -> int:
    return struct.unpack("<i", struct.pack("<f", scale))[0]


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
    """``softmax(scale * q @ k.T) @ v`` for one query per row and head, every key visible.

    Args:
        queries: (B, H, 1, D).
        keys, values: (B, H_kv, L, D), any strides; H a multiple of H_kv (grouped-query).
        scale: the score scale, > 0.

    Returns:
        (B, H, 1, D) in the queries' dtype.

    Raises:
        ValueError: the inputs are not ones :func:`supported` accepts, or ``scale`` <= 0.
    """
    _check("decode_attention", queries, keys, values, scale)
    return decode_attention_fitted(queries, keys, values, scale)


def decode_attention_fitted(queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
    """:func:`decode_attention` for inputs :func:`fits` has taken, without checking them again (the
    ops call it in every layer of a decode step, after asking :func:`fits`)."""
    if inference_active():
        return _run(queries, keys, values, scale)
    return _differentiable(scale)(queries, keys, values)


_inference = threading.local()


def _check(name: str, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> None:
    """A ValueError naming what the kernel takes, unless :func:`supported` takes these inputs and scale > 0."""
    if not supported(queries, keys, values) or not scale > 0:
        raise ValueError(
            f"{name} takes q (B, H, 1, D), k/v (B, H_kv, L>=1, D) with D a multiple of 32 up to "
            f"{MAX_HEAD_DIM}, one of {[str(t) for t in DTYPES]}, scale > 0; got q {queries.shape} {queries.dtype}, "
            f"k {keys.shape} {keys.dtype}, v {values.shape} {values.dtype}, scale {scale}"
        )


def inference_active() -> bool:
    """Whether this thread is inside :func:`inference`."""
    return getattr(_inference, "active", False)


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """Graphs built inside need no gradient through the kernel (a decode step): it then runs
    without the ``mx.custom_function`` that gives it MLX's gradient, an extra op and a call back into
    Python per layer (measured on an H200: decode 5% faster for Gemma 3 270M, 14% for the 1B)."""
    before = getattr(_inference, "active", False)
    _inference.active = True
    try:
        yield
    finally:
        _inference.active = before


@functools.lru_cache(maxsize=64)
def _differentiable(scale: float) -> Any:
    """The kernel, with the gradient of MLX's own attention (the kernel has no backward pass), so a
    gradient through a one-token step (LoRA on a one-token sequence) works as it does without it."""

    @mx.custom_function
    def attend(queries: mx.array, keys: mx.array, values: mx.array) -> mx.array:
        return _run(queries, keys, values, scale)

    @attend.vjp
    def attend_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        def mlx_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

        return tuple(mx.vjp(mlx_attention, list(primals), [cotangent])[1])

    return attend


def decode_attention_from(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, first: mx.array
) -> mx.array:
    """:func:`decode_attention` where row ``b`` sees only the keys from index ``first[b]`` on (the
    rows of a batch that joined at different times: what lies before a row's start is padding).
    For inference only (no gradient): call it inside :func:`inference`.

    Args:
        queries, keys, values, scale: as :func:`decode_attention`.
        first: (B,) int32, each row's first visible key index, below the number of keys.

    Raises:
        ValueError: inputs :func:`supported` does not take, ``first`` not (B,) int32, or no
            :func:`inference` context (the padded kernel has no gradient).
    """
    _check("decode_attention_from", queries, keys, values, scale)
    if first.shape != (queries.shape[0],) or first.dtype != mx.int32:
        raise ValueError(f"first must be ({queries.shape[0]},) int32, got {first.shape} {first.dtype}")
    if not inference_active():
        raise ValueError("decode_attention_from has no gradient: call it inside cuda_attention.inference()")
    return _run(queries, keys, values, scale, first, "first")


def decode_attention_span(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, span: mx.array
) -> mx.array:
    """:func:`decode_attention` where every row sees only the keys ``span[0] <= i < span[1]`` (a
    compiled decode step attends over its caches' whole storage, of which these slots are in use).
    For inference only (no gradient): call it inside :func:`inference`.

    Args:
        queries, keys, values, scale: as :func:`decode_attention`.
        span: (2,) int32, ``0 <= span[0] < span[1] <= L``.

    Raises:
        ValueError: inputs :func:`supported` does not take, ``span`` not (2,) int32, or no
            :func:`inference` context.
    """
    _check("decode_attention_span", queries, keys, values, scale)
    if span.shape != (2,) or span.dtype != mx.int32:
        raise ValueError(f"span must be (2,) int32, got {span.shape} {span.dtype}")
    if not inference_active():
        raise ValueError("decode_attention_span has no gradient: call it inside cuda_attention.inference()")
    return _run(queries, keys, values, scale, span, "span")


def layout(d: int, itemsize: int, tiled: bool) -> tuple[bool, int, int]:
    """The kernel's (tiled, warps a block, keys a warp takes at once) for head dim ``d`` and inputs of
    ``itemsize`` bytes. Tiled where asked (``tiled``) and a lane's share of a row is whole 32-bit words:
    16 warps, and as many keys a warp (up to 8) as keep its rows' loads within 32 registers (bf16: 8 keys
    for head dim 128, 4 for 256), which keeps a thread within the 128 registers a 512-thread block may
    use (``benchmarks/cuda_compile_check.py``); else 32 warps, one key each. Warps are fewer where their
    partial outputs would pass 32 KiB of shared memory (head dims over 256)."""
    words = d // 32 * itemsize // 4  # 32-bit words of a row a lane loads
    if tiled and words >= 1:
        return True, min(16, 8192 // d), max(1, min(8, 16 // words))
    return False, min(32, 8192 // d), 1


def _run(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    extra: mx.array | None = None,
    which: str = "all",
) -> mx.array:
    batch, n_heads, _, d = queries.shape
    n_keys = keys.shape[2]
    tiled, warps, kt = layout(d, queries.dtype.size, TILED_KEYS and n_keys >= TILED_MIN_KEYS)
    parts = splits(batch, n_heads, n_keys) if SPLIT_KEYS and n_keys >= SPLIT_MIN_KEYS else 1
    template = [
        ("T", queries.dtype),
        ("D", d),
        ("WARPS", warps),
        ("SCALE_BITS", _float_bits(scale)),
        ("TILED", tiled),
        ("KT", kt),
    ]
    inputs = [queries, keys, values] if extra is None else [queries, keys, values, extra]
    if parts == 1:
        return _kernel(which, False, tiled)(
            inputs=inputs,
            template=template,
            grid=(warps * 32 * n_heads, batch, 1),
            threadgroup=(warps * 32, 1, 1),
            output_shapes=[(batch, n_heads, 1, d)],
            output_dtypes=[queries.dtype],
        )[0]
    part_acc, part_stats = _kernel(which, True, tiled)(
        inputs=inputs,
        template=template,
        grid=(warps * 32 * n_heads, batch, parts),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(batch, n_heads, parts, d), (batch, n_heads, parts, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    threads = min(d, 256)
    return _combine_kernel()(
        inputs=[part_acc, part_stats],
        template=[("T", queries.dtype), ("D", d)],
        grid=(threads * n_heads, batch, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(batch, n_heads, 1, d)],
        output_dtypes=[queries.dtype],
    )[0]
