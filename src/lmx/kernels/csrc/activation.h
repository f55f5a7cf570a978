// lmx CPU activation: a gated MLP's gelu_pytorch_tanh(gate) * up as one threaded, vectorised op.
//
// On the CPU MLX computes Gemma 3's GELU (tanh form) with scalar tanh on one thread: 27-38 ms a layer
// for a 512-token prompt of Gemma 3 270M (1M values) on the 2-core development machine, about a
// third of the prompt's time. This computes the same function, x * sigmoid(2 * inner) (equal to
// 0.5 * x * (1 + tanh(inner)), inner = sqrt(2 / pi) * (x + 0.044715 x^3)), with an AVX2 exp and the
// kernels' thread pool. Gradients are those of MLX's own composition.
#pragma once

#include "layer_ops.h"

namespace lmx {

// gelu_pytorch_tanh(gate) * up. Float32 gate and up of one shape run here; anything else goes to
// MLX's ops.
mx::array gelu_tanh_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

// y = gelu_pytorch_tanh(g) * u over n float32 values, on the kernels' thread pool: what the op computes
// (the fused decode layer calls it too).
void gelu_tanh_mul_values(const float* g, const float* u, float* y, int64_t n);

class GeluTanhMul : public CpuOp {
 public:
  using CpuOp::CpuOp;
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxGeluTanhMul";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

}  // namespace lmx
