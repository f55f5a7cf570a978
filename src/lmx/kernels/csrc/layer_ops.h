// lmx CPU layer ops: RMSNorm and RoPE as one MLX op each.
//
// On the CPU, MLX runs mx.fast.rms_norm and mx.fast.rope as compositions of small ops (about 5 and
// 15); each op costs a fixed few microseconds, so on one decode token a norm took ~34 us and a rope
// ~111 us on the 2-core development machine, against ~7 us for one op: 8 of them a layer were about
// a sixth of a Gemma 3 270M decode step. These compute the same float32 math in one op. Gradients
// are those of MLX's own op (the vjp differentiates it), so training is unchanged.
#pragma once

#include <functional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace lmx {

namespace mx = mlx::core;

// x * rsqrt(mean(x^2, -1) + eps) * w. Float32 x with w of shape (x.shape(-1),) run here; anything
// else goes to mx.fast.rms_norm.
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s = {});

// Rotary embedding of the first `dims` features (non-traditional: the two halves rotate together),
// positions offset + (index along axis -2) times `scale`, angle position / periods[i] for pair i.
// Float32 x with periods of shape (dims / 2,) run here; anything else goes to mx.fast.rope.
mx::array rope(const mx::array& x, int dims, const mx::array& periods, float scale, int offset,
               mx::StreamOrDevice s = {});

// rope() with each batch row at a position of its own (left-padded rows of a batch): x (B, ..., L, D),
// offsets (B,) int32; row b's positions are offsets[b] + (index along axis -2). Float32 x with int32
// offsets of shape (B,) runs here; anything else goes to mx.fast.rope with the offsets array.
mx::array rope_rows(const mx::array& x, int dims, const mx::array& periods, float scale, const mx::array& offsets,
                    mx::StreamOrDevice s = {});

// Softmax attention over keys and values, grouped-query aware: q (B, H, Lq, D), k (B, KV, Lk, D),
// v (B, KV, Lk, Dv) with H a multiple of KV; no mask, or causal (query i sees keys up to Lk - Lq + i).
// Float32 runs here: up to 8 queries (decode) as per-row loops, more (a prompt) as blocked BLAS
// products (attention_blas.h) when a global BLAS is loaded and each input's last axis is contiguous;
// anything else goes to mx.fast.scaled_dot_product_attention.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    mx::StreamOrDevice s = {});

// attention() of one query a row where row b sees only the keys from index first[b] on (the rows of a
// batch left-padded to one cache): q (B, H, 1, D), first (B,) int32. Row b's value is the one it gets
// from attention() over its own keys alone, bit for bit (the same loops from its first key). Float32
// runs here; anything else goes to mx.fast.scaled_dot_product_attention with the equivalent mask.
mx::array attention_from(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                         const mx::array& first, mx::StreamOrDevice s = {});

// attention() over keys and values held quantized, as mx.quantize lays them out along the head
// dimension (a quantized KV cache): kw/vw (B, KV, Lk, D * bits / 32) uint32, ks/kb and vs/vb
// (B, KV, Lk, D / group_size) float32 scales and biases; bits 8 or 4. Each key and value row is
// dequantized once, in registers, for every query head of its group: the keys and values are read
// at a quarter (8-bit) or an eighth (4-bit) of their float32 bytes. Float32 queries of up to 8
// positions run here; anything else goes to MLX (dequantize, then scaled_dot_product_attention).
mx::array quantized_attention(const mx::array& q, const mx::array& kw, const mx::array& ks, const mx::array& kb,
                              const mx::array& vw, const mx::array& vs, const mx::array& vb, float scale,
                              bool causal, int group_size, int bits, mx::StreamOrDevice s = {});

// quantized_attention() of one query a row where row b sees only the keys from index first[b] on (the rows
// of a batch left-padded to one cache), as attention_from() is to attention(): row b's value is the one it
// gets over its own keys alone, bit for bit. first (B,) int32.
mx::array quantized_attention_from(const mx::array& q, const mx::array& kw, const mx::array& ks,
                                   const mx::array& kb, const mx::array& vw, const mx::array& vs,
                                   const mx::array& vb, float scale, const mx::array& first, int group_size,
                                   int bits, mx::StreamOrDevice s = {});

// log(sum(exp(x))) over the last axis, keeping it (size 1). MLX's CPU exp costs ~29 ns a value here
// (7.4 ms for Gemma 3's 262144 logits, every decode step); this one is vectorised (a Cephes-style
// exp, within 2 ulp) and takes ~0.3 ms. Float32 runs here; anything else goes to mx.logsumexp.
mx::array logsumexp(const mx::array& x, mx::StreamOrDevice s = {});

// x - logsumexp(x) over the last axis (the log-softmax) as one op: the values of MLX's subtract of the
// logsumexp() above, bit for bit, in one threaded pass where MLX's subtract ran single-threaded (1.8 ms
// for 8 rows of a 262144-token vocabulary on the development machine). Float32 runs here; anything else
// goes to MLX's ops.
mx::array log_softmax(const mx::array& x, mx::StreamOrDevice s = {});

// The index of each row's largest value over the last axis: x (..., V) float32 -> (...) uint32, as
// MLX's argmax (the first of ties; the first NaN of a row that has one). Rows over the threads, eight
// values at a time: MLX's one-thread argmax took 6.5 ms of an 8-row Gemma 3 decode step. Other inputs
// go to mx.argmax.
mx::array argmax(const mx::array& x, mx::StreamOrDevice s = {});

// The nucleus (top-p) filter as one op: in each row of log-probabilities x (unnormalised and -inf
// entries allowed), most likely first, a token is kept while the probability mass of the tokens before
// it is below `reach`; the first token is always kept, so are the ties of the last one kept, and the
// others become -inf. MLX sorts the whole row for this (25 ms for a 262144-token vocabulary on the
// development machine); here each token's mass goes into a bucket by its distance from the row's
// maximum (1/64 apart), the buckets are summed most likely first, and only the tokens of the bucket
// where the mass reaches `reach` are sorted. x: (..., V) float32 with V > 0 (else std::invalid_argument;
// lmx.runtime.ops sends other inputs to MLX's sort).
mx::array top_p(const mx::array& x, float reach, mx::StreamOrDevice s = {});

// One draw a row from softmax(logits / temperature) by inverting its distribution with one uniform
// number u in [0, 1) a row: the first token whose running sum of exp((logits - max) / temperature)
// passes u times the row's sum (-inf tokens weigh 0 and are never drawn). MLX's categorical draws a
// Gumbel number for every token (two logs each: 3.5 ms a row of a 262144-token vocabulary on the
// development machine); this takes one exp a token. logits (B, V) float32, u (B,) float32 ->
// (B,) uint32. A row without a finite logit draws token 0 (as MLX's does).
mx::array categorical(const mx::array& logits, const mx::array& u, float temperature, mx::StreamOrDevice s = {});

// An op computed here on the CPU whose gradient is that of `fallback` (MLX's own op).
class CpuOp : public mx::UnaryPrimitive {
 public:
  using Fn = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;
  CpuOp(mx::Stream stream, Fn fallback) : mx::UnaryPrimitive(stream), fallback_(std::move(fallback)) {}
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;

 private:
  Fn fallback_;
};

class RmsNorm : public CpuOp {
 public:
  RmsNorm(mx::Stream stream, Fn fallback, float eps) : CpuOp(stream, std::move(fallback)), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxRmsNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float eps_;
};

class Rope : public CpuOp {
 public:
  // rows: the offsets are an input (one a batch row), not `offset`
  Rope(mx::Stream stream, Fn fallback, int dims, float scale, int offset, bool rows = false)
      : CpuOp(stream, std::move(fallback)), dims_(dims), scale_(scale), offset_(offset), rows_(rows) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxRope";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int dims_;
  float scale_;
  int offset_;
  bool rows_;
};

class LogSumExp : public CpuOp {
 public:
  using CpuOp::CpuOp;
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxLogSumExp";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class LogSoftmax : public CpuOp {
 public:
  using CpuOp::CpuOp;
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxLogSoftmax";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class ArgMax : public CpuOp {
 public:
  using CpuOp::CpuOp;
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxArgMax";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class TopP : public mx::UnaryPrimitive {
 public:
  TopP(mx::Stream stream, float reach) : mx::UnaryPrimitive(stream), reach_(reach) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxTopP";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float reach_;
};

class Categorical : public mx::Primitive {
 public:
  Categorical(mx::Stream stream, float temperature) : mx::Primitive(stream), temperature_(temperature) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "LmxCategorical";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float temperature_;
};

class Attention : public CpuOp {
 public:
  // from: a fourth input, (B,) int32, holds each row's first key (attention_from)
  Attention(mx::Stream stream, Fn fallback, float scale, bool causal, bool from = false)
      : CpuOp(stream, std::move(fallback)), scale_(scale), causal_(causal), from_(from) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool causal_;
  bool from_;
};

class QuantizedAttention : public CpuOp {
 public:
  // from: an eighth input, (B,) int32, holds each row's first key (quantized_attention_from)
  QuantizedAttention(mx::Stream stream, Fn fallback, float scale, bool causal, int group_size, int bits,
                     bool from = false)
      : CpuOp(stream, std::move(fallback)),
        scale_(scale),
        causal_(causal),
        group_size_(group_size),
        bits_(bits),
        from_(from) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxQuantizedAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool causal_;
  int group_size_;
  int bits_;
  bool from_;
};

}  // namespace lmx
