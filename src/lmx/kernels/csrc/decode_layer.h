// A decoder layer of one decode position as two MLX ops (Gemma 3 and Qwen 3 on GGUF blocks).
//
// On the CPU each MLX op costs a fixed few microseconds to build and to run, and a Gemma 3 270M
// decode step was 496 of them: 27 a layer (seven products, six norms, two RoPEs, reshapes, adds,
// the cache's slices). Around the cache write and attention, which stay MLX ops, these compute a
// layer's two other pieces as one op each, with the very row loops and product kernels the separate
// ops run (rows.h, decode_products), so their values are the separate ops' values, bit for bit.
// They have no gradient: lmx runs them only inside a decode step (Ops.inference).
#pragma once

#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace lmx {

namespace mx = mlx::core;

// Where a layer's attention inputs come from: the input norm, the query, key and value products,
// the per-head query and key norms and RoPE.
struct BeginSpec {
  float eps;        // the input norm's
  int types[3];     // GGML types of wq, wk, wv
  int n_heads, n_kv_heads, head_dim;
  float head_eps;   // the query and key norms'
  int rope_dims;    // rotated features of a head (even, <= head_dim)
  float rope_scale;
  int offset;       // the position (rows_at 0)
  int rows_at;      // 1: each row's position is in a (B,) int32 input instead (left-padded rows of a batch)
};

// The layer up to attention for B <= 8 rows of one position: x (B, 1, dim) float32; norm (dim,);
// wq, wk, wv (rows, row bytes) uint8 GGUF blocks; q_norm, k_norm (head_dim,); periods
// (rope_dims / 2,) float32 -> q (B, n_heads, 1, head_dim), k and v (B, n_kv_heads, 1, head_dim):
// rope(q_norm(split(norm(x) @ wq^T))), the same for k, and split(norm(x) @ wv^T). RoPE's position is
// spec.offset, or with spec.rows_at, positions[b] for row b (positions (B,) int32).
// Throws std::invalid_argument on other shapes or dtypes.
std::vector<mx::array> decode_layer_begin(const mx::array& x, const mx::array& norm, const mx::array& wq,
                                          const mx::array& wk, const mx::array& wv, const mx::array& q_norm,
                                          const mx::array& k_norm, const mx::array& periods, const BeginSpec& spec,
                                          const std::optional<mx::array>& positions = std::nullopt,
                                          mx::StreamOrDevice s = {});

// Gemma 3's layer after attention for B <= 8 rows of one position: x (B, 1, dim) the residual
// stream, attn (B, n_heads, 1, head_dim) attention's output -> (B, 1, dim):
// h = x + post_attn(merge(attn) @ wo^T); h + post_ffn(down(gelu_tanh(pre_ffn(h) @ wg^T) * (pre_ffn(h) @ wu^T))).
// types: GGML types of wo, wg, wu, wd; norms (dim,) float32 with one eps.
// Throws std::invalid_argument on other shapes or dtypes.
mx::array decode_layer_end(const mx::array& x, const mx::array& attn, const mx::array& wo,
                           const mx::array& post_attn, const mx::array& pre_ffn, const mx::array& wg,
                           const mx::array& wu, const mx::array& wd, const mx::array& post_ffn,
                           const std::vector<int>& types, float eps, mx::StreamOrDevice s = {});

class DecodeLayerBegin : public mx::Primitive {
 public:
  DecodeLayerBegin(mx::Stream stream, BeginSpec spec) : mx::Primitive(stream), spec_(spec) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&, const std::vector<int>&,
                             const std::vector<mx::array>&) override;
  const char* name() const override {
    return "LmxDecodeLayerBegin";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  BeginSpec spec_;
};

class DecodeLayerEnd : public mx::UnaryPrimitive {
 public:
  DecodeLayerEnd(mx::Stream stream, std::vector<int> types, float eps)
      : mx::UnaryPrimitive(stream), types_(std::move(types)), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&, const std::vector<int>&,
                             const std::vector<mx::array>&) override;
  const char* name() const override {
    return "LmxDecodeLayerEnd";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  std::vector<int> types_;
  float eps_;
};

}  // namespace lmx
