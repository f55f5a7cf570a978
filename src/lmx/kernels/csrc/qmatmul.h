// lmx CPU kernels: y = x @ W^T with W kept in its GGUF block encoding (Q8_0, Q5_0, Q4_0, Q4_K, Q6_K).
//
// Each weight is decoded to exactly the float32 value ggml's dequantize_row_* (and gguf-py's numpy
// dequantize) gives, then multiplied with the float32 activation and accumulated in float32: the
// product equals the dequantized-float32 matmul up to summation order.
#pragma once

#include <functional>

#include <cstdint>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace lmx {

namespace mx = mlx::core;

// GGML type ids (ggml.h) of the supported block encodings.
enum GgmlType : int { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

// Values per block and bytes per block; {0, 0} for an unsupported type.
struct BlockGeometry {
  int64_t values;
  int64_t bytes;
};
BlockGeometry block_geometry(int type);

// y = x @ W^T. x: (..., k) floating; w: (n, k / values * bytes) uint8, rows in `type`'s blocks.
// Returns (..., n) in x's dtype. Many rows of x (prefill) go through dequantize + matmul (BLAS).
// int8_activations (opt-in; AVX2 only, up to 8 rows): x is quantized to int8 per 32 values and
// multiplied in integers, as llama.cpp does: several times fewer instructions a weight, and results
// that differ from the exact product by the activations' rounding (about 0.1-1% of a value).
mx::array qmatmul(const mx::array& x, const mx::array& w, int type, int k, bool int8_activations = false,
                  mx::StreamOrDevice s = {});

// The float32 values of quantized rows: w (..., k / values * bytes) uint8 -> (..., k) float32.
mx::array dequantize_rows(const mx::array& w, int type, int k, mx::StreamOrDevice s = {});

// One product of a decode step for decode_products: y (m, n) = x (m, k) @ W^T, W's n rows of `type`
// blocks at w (row_bytes apart), 1 <= m <= 8 row-major float32 rows of x.
struct DecodeProduct {
  const uint8_t* w;
  int64_t row_bytes;
  int type;
  int64_t k, n;
  const float* x;
  int64_t m;
  float* y;
};

// Several decode products in one job of the thread pool (each W's rows split as qmatmul splits them),
// each computed by qmatmul's own kernels: the same values, bit for bit. Call from an op's eval, where
// the arrays' data is ready.
void decode_products(const DecodeProduct* products, int count);

// Threads the kernels use (the calling thread counts as one); n < 1 means 1.
void set_num_threads(int n);
// fn(i) for i in [0, tasks) on the kernels' thread pool (the calling thread takes part).
void run_parallel(int64_t tasks, const std::function<void(int64_t)>& fn);
int num_threads();
// How long the pool's threads poll for the next job before they sleep (0: sleep at once). For benchmarks.
void set_pool_spin(int microseconds);

// Whether the AVX2/FMA/F16C code path is in use (else portable scalar code).
bool has_avx2();
// Backs the 2 MiB-aligned interior of w's buffer with transparent huge pages (MADV_HUGEPAGE, then
// MADV_COLLAPSE: Linux 6.1 on), so that a matrix streamed once a token (the tied head: 178 MB for Gemma 3
// 270M) costs one TLB entry per 2 MiB instead of per 4 KiB. The values are untouched. Returns the bytes
// the kernel backs with huge pages now (0: under 2 MiB of whole huge pages, or refused). w must be evaluated.
int64_t huge_pages(const mx::array& w);
// W rows a decode product (1-8 rows of x) asks memory for ahead of the row it decodes (default 4; 0: none).
// The same values either way. For benchmarks.
void set_prefetch_rows(int rows);
// Whether products (one row, and 2-8 rows of x) may use the AVX-512VL copy of the kernels (on by default where
// the CPU has it; the same values either way). Returns whether it is in use now. For tests and benchmarks.
bool set_avx512(bool allowed);

class QMatmul : public mx::UnaryPrimitive {
 public:
  QMatmul(mx::Stream stream, int type, int k, bool int8)
      : mx::UnaryPrimitive(stream), type_(type), k_(k), int8_(int8) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "LmxQMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int type_;
  int k_;
  bool int8_;
};

class DequantizeRows : public mx::UnaryPrimitive {
 public:
  DequantizeRows(mx::Stream stream, int type, int k) : mx::UnaryPrimitive(stream), type_(type), k_(k) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LmxDequantizeRows";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int type_;
  int k_;
};

}  // namespace lmx
