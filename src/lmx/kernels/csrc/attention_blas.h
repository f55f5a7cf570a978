// Prompt attention (many queries) on the CPU as blocked BLAS products.
//
// MLX's CPU attention for a 512-token Gemma 3 270M prompt took 23-29 ms a layer on the 2-core
// development machine (a quarter of the prompt's time after the GELU op). Here each head's queries go
// in blocks of 64: scores = scale * Q_block K^T as one sgemm over the keys the block can see, a causal
// softmax per row (exp_nonpositive, simd_exp.h), then P V as one sgemm; the blocks are shared out on
// the kernels' thread pool (OpenBLAS single-threaded, as lmx runs it).
#pragma once

#include "mlx/array.h"

namespace lmx {

namespace mx = mlx::core;

// y (B, H, Lq, Dv) = softmax(scale * q k^T [causal: query i sees keys up to Lk - Lq + i]) v for float32
// q (B, H, Lq, D), k (B, KV, Lk, D), v (B, KV, Lk, Dv), H a multiple of KV, each with its last axis
// contiguous. Needs global_sgemm() (blas.h).
void prompt_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal, float* y);

}  // namespace lmx
