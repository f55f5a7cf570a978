// Prompt attention (many queries) on the CPU as blocked BLAS products.
//
// MLX's CPU attention for a 512-token Gemma 3 270M prompt took 23-29 ms a layer on the 2-core
// development machine (a quarter of the prompt's time after the GELU op). Here each head's queries go
// in blocks of 64: scores = scale * Q_block K^T as one sgemm over the keys the block can see, a causal
// softmax per row (exp_nonpositive, simd_exp.h), then P V as one sgemm; the blocks are shared out on
// the kernels' thread pool (OpenBLAS single-threaded, as lmx runs it).
#pragma once

#include "layer_ops.h"
#include "mlx/array.h"

namespace lmx {

namespace mx = mlx::core;

// Up to this many queries (decode, a speculative verify) attention runs per-row loops (layer_ops.cpp);
// more (a prompt) go to prompt_attention.
constexpr int64_t kFewQueries = 8;

// Float32 q (B, H, Lq, D), k (B, KV, Lk, D), v (B, KV, Lk, Dv) with H a multiple of KV: the inputs
// lmx's CPU attention ops take.
bool attention_inputs(const mx::array& q, const mx::array& k, const mx::array& v);
// Such inputs prompt_attention can run: a global BLAS (blas.h) and each input's last axis contiguous.
bool prompt_inputs(const mx::array& q, const mx::array& k, const mx::array& v);

// y (B, H, Lq, Dv) = softmax(scale * q k^T [causal: query i sees keys up to Lk - Lq + i]) v for float32
// q (B, H, Lq, D), k (B, KV, Lk, D), v (B, KV, Lk, Dv), H a multiple of KV, each with its last axis
// contiguous. Needs global_sgemm() (blas.h).
// With `mask` (bool (B or 1, 1, Lq, Lk), any strides; a sliding window past its width): query i sees the
// keys where mask[b, 0, i, j] is true, and `causal` is ignored.
void prompt_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal, float* y,
                      const mx::array* mask = nullptr);

// prompt_attention with a boolean mask as one op (float32 q/k/v of more than 8 queries, last axes
// contiguous, a global BLAS, a (B or 1, 1, Lq, Lk) bool mask); anything else goes to MLX's attention
// with the mask.
mx::array attention_masked(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           const mx::array& mask, mx::StreamOrDevice s = {});

class AttentionMasked : public CpuOp {
 public:
  AttentionMasked(mx::Stream stream, Fn fallback, float scale) : CpuOp(stream, std::move(fallback)), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxAttentionMasked";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const AttentionMasked&>(other).scale_;
  }

 private:
  float scale_;
};

}  // namespace lmx
