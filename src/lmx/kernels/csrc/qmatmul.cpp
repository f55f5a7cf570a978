// The kernels behind qmatmul.h: MLX primitives, the thread pool split, and the three compiled copies
// (portable; AVX2/FMA/F16C; the same 256-bit code with AVX-512VL's 32 vector registers, for products of
// 2-8 rows; chosen at run time) of kernels_impl.h.
#include "qmatmul.h"

#include <immintrin.h>
#include <sys/mman.h>


#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "blas.h"
#include "cpu_eval.h"
#include "strided.h"
#include "thread_pool.h"

namespace lmx {
namespace {

// Below this many weights per product, waking the pool costs more than it saves.
constexpr int64_t kParallelMin = 1 << 16;
// Rows of x above which qmatmul dequantizes W once and hands the product to BLAS.
constexpr int kGemvMaxRows = 8;
// Largest k handled with a row buffer on the stack (floats).
constexpr int64_t kMaxK = 1 << 15;

ThreadPool& pool() {
  static ThreadPool p(1);
  return p;
}

bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

// AVX-512F/VL/BW (with the AVX2 set): the same 256-bit code, compiled with 32 vector registers instead of
// 16, and the one-scale blocks' products in 512-bit registers (BW: byte masks for Q5_0's fifth bit).
bool cpu_has_avx512() {
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw");
  return ok;
}
std::atomic<bool> avx512_allowed{true};
std::atomic<int64_t> prefetch_rows{4};

// (global_sgemm, blas.h: without a global BLAS, many-row products go through MLX's matmul instead.)
// W rows decoded per BLAS call in a many-row product: the float32 copy alive at once stays at
// kRowBlock x k floats (4 MiB for k = 2048) instead of all of W; 512 rows (not 256) halve the sgemm
// calls, and their packing of x, a product.
constexpr int64_t kRowBlock = 512;

struct Gemv {
  const uint8_t* w;
  int64_t row_bytes;
  const float* x;
  int64_t m, k, n;
  float* y;
  int64_t prefetch = 0;  // decode products: W rows asked of memory ahead of the one decoded (0: none)
};

}  // namespace

}  // namespace lmx

#define LMX_IMPL_NS generic
#define LMX_IMPL_AVX2 0
#define LMX_IMPL_ZMM 0
#define LMX_IMPL_ROWS_PER_PASS 1
#include "kernels_impl.h"
#undef LMX_IMPL_NS
#undef LMX_IMPL_AVX2
#undef LMX_IMPL_ZMM
#undef LMX_IMPL_ROWS_PER_PASS

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LMX_IMPL_NS avx2
#define LMX_IMPL_AVX2 1
#define LMX_IMPL_ZMM 0
#define LMX_IMPL_ROWS_PER_PASS 4
#include "kernels_impl.h"
#undef LMX_IMPL_NS
#undef LMX_IMPL_AVX2
#undef LMX_IMPL_ZMM
#undef LMX_IMPL_ROWS_PER_PASS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,prefer-vector-width=256")
#define LMX_IMPL_NS avx512
#define LMX_IMPL_AVX2 1
#define LMX_IMPL_ZMM 1
#define LMX_IMPL_ROWS_PER_PASS 8
#include "kernels_impl.h"
#undef LMX_IMPL_NS
#undef LMX_IMPL_AVX2
#undef LMX_IMPL_ZMM
#undef LMX_IMPL_ROWS_PER_PASS
#pragma GCC pop_options

namespace lmx {
namespace {

// Split rows [0, n) into chunks of whole 8-row groups, about 4 per thread so that a thread that gets
// no core for a while costs little; small jobs run on the calling thread alone.
template <class F>
void parallel_rows(int64_t n, int64_t work, F&& f) {
  const int threads = pool().size();
  if (work < kParallelMin || threads == 1) {
    f(0, n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(8, (n + 4 * threads - 1) / (4 * threads) + 7) / 8 * 8;
  pool().run((n + chunk - 1) / chunk, [&](int64_t i) { f(i * chunk, std::min(n, (i + 1) * chunk)); });
}

void check_args(const mx::array& w, int type, int k, const char* what) {
  BlockGeometry g = block_geometry(type);
  std::ostringstream msg;
  if (g.values == 0) {
    msg << what << ": unsupported GGML type " << type << " (supported: Q4_0, Q5_0, Q8_0, Q4_K, Q6_K)";
  } else if (k <= 0 || k % g.values || k > kMaxK) {
    msg << what << ": k must be a positive multiple of " << g.values << " up to " << kMaxK << ", got " << k;
  } else if (w.dtype() != mx::uint8 || w.ndim() < 1 || w.shape(-1) != k / g.values * g.bytes) {
    msg << what << ": w must be uint8 rows of " << k / g.values * g.bytes << " bytes (k=" << k << "), got dtype "
        << w.dtype() << " shape (";
    for (auto s : w.shape()) msg << s << ",";
    msg << ")";
  } else {
    return;
  }
  throw std::invalid_argument(msg.str());
}

}  // namespace

BlockGeometry block_geometry(int type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q5_0: return {32, 22};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

void run_parallel(int64_t tasks, const std::function<void(int64_t)>& fn) {
  if (tasks <= 1 || pool().size() == 1) {
    for (int64_t i = 0; i < tasks; ++i) fn(i);
    return;
  }
  pool().run(tasks, fn);
}

void set_num_threads(int n) {
  pool().resize(std::max(1, n));
}
int num_threads() {
  return pool().size();
}
void set_pool_spin(int microseconds) {
  pool().set_spin(std::chrono::microseconds(std::max(0, microseconds)));
}
bool has_avx2() {
  return cpu_has_avx2();
}
int64_t huge_pages(const mx::array& w) {
  if (w.status() == mx::array::Status::unscheduled) {
    throw std::invalid_argument("huge_pages: w must be evaluated (mx.eval) first");
  }
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto start = reinterpret_cast<uintptr_t>(w.data<uint8_t>());
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1), hi = (start + w.nbytes()) & ~(kHuge - 1);
  if (hi <= lo) {
    return 0;
  }
  void* p = reinterpret_cast<void*>(lo);
#ifndef MADV_COLLAPSE
  constexpr int MADV_COLLAPSE = 25;  // Linux 6.1 (older headers lack it; older kernels answer EINVAL)
#endif
  return madvise(p, hi - lo, MADV_HUGEPAGE) == 0 && madvise(p, hi - lo, MADV_COLLAPSE) == 0
             ? static_cast<int64_t>(hi - lo)
             : 0;
}
void set_prefetch_rows(int rows) {
  prefetch_rows = std::max(0, rows);
}
bool set_avx512(bool allowed) {
  avx512_allowed = allowed;
  return allowed && cpu_has_avx512();
}

mx::array dequantize_rows(const mx::array& w, int type, int k, mx::StreamOrDevice s) {
  check_args(w, type, k, "dequantize_rows");
  mx::Shape shape = w.shape();
  shape.back() = k;
  auto wc = mx::contiguous(w, false, s);
  return mx::array(shape, mx::float32, std::make_shared<DequantizeRows>(mx::to_stream(s), type, k), {wc});
}

mx::array qmatmul(const mx::array& x, const mx::array& w, int type, int k, bool int8_activations,
                  mx::StreamOrDevice s) {
  check_args(w, type, k, "qmatmul");
  if (w.ndim() != 2) {
    throw std::invalid_argument("qmatmul: w must be 2-D (n, row_bytes)");
  }
  if (x.ndim() < 1 || x.shape(-1) != k || !mx::issubdtype(x.dtype(), mx::floating)) {
    std::ostringstream msg;
    msg << "qmatmul: x must be floating with last dimension " << k << ", got dtype " << x.dtype();
    throw std::invalid_argument(msg.str());
  }
  auto xf = mx::astype(x, mx::float32, s);
  int64_t rows = x.size() / k;
  if (rows > kGemvMaxRows && global_sgemm() == nullptr) {
    // Prefill without a BLAS of our own to call: decode W whole, then MLX's matmul.
    auto out = mx::matmul(xf, mx::transpose(dequantize_rows(w, type, k, s), s), s);
    return mx::astype(out, x.dtype(), s);
  }
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  // No Contiguous op for what is row-major already (each is one more op a product, every step: ~3 us
  // each on the CPU, 254 of a Gemma 3 270M step's 750 ops): the weights, evaluated at load, are;
  // x is read through row_major() when the product runs, a copy only where it is not.
  const bool w_ready = w.status() != mx::array::Status::unscheduled && w.flags().row_contiguous;
  auto out = mx::array(shape, mx::float32,
                       std::make_shared<QMatmul>(mx::to_stream(s), type, k, int8_activations),
                       {xf, w_ready ? w : mx::contiguous(w, false, s)});
  return mx::astype(out, x.dtype(), s);
}

namespace {

// y[:, r0:r1] = x @ W[r0:r1].T with W's rows decoded into `block` (row-major: 101, no transpose: 111,
// transpose: 112).
void block_product(const Gemv& g, int type, bool avx, int64_t r0, int64_t r1, float* block) {
  const uint8_t* w = g.w + r0 * g.row_bytes;  // rows r0.. of W, decoded to block rows 0..
  avx ? avx2::dequantize(type, w, g.row_bytes, g.k, block, 0, r1 - r0)
      : generic::dequantize(type, w, g.row_bytes, g.k, block, 0, r1 - r0);
  global_sgemm()(101, 111, 112, static_cast<int>(g.m), static_cast<int>(r1 - r0), static_cast<int>(g.k), 1.0f, g.x,
                 static_cast<int>(g.k), block, static_cast<int>(g.k), 0.0f, g.y + r0, static_cast<int>(g.n));
}

// A many-row product. With a single-threaded BLAS (lmx's default, LMX_BLAS_THREADS=1) the blocks of W
// are shared out over lmx's pool, each decoded and multiplied by whichever thread claims it: the pool's
// threads sleep rather than spin, so a busy machine slows prefill down instead of stalling it (RESULTS.md,
// "CPU thread policy"). A multi-threaded BLAS gets the blocks one at a time and splits each itself.
void prefill(const Gemv& g, int type, bool avx) {
  // Up to kRowBlock rows a block, and at least one block a thread (n = 640 on 2 threads: 2 x 320,
  // not 512 + 128; n = 256: 2 x 128, not one block on one thread), in whole 8-row groups.
  const int64_t threads = pool().size();
  const int64_t rows = std::min<int64_t>(kRowBlock, ((g.n + threads - 1) / threads + 7) / 8 * 8);
  const int64_t blocks = (g.n + rows - 1) / rows;
  if (blas_threads() == 1 && threads > 1 && blocks > 1) {
    pool().run(blocks, [&](int64_t i) {
      thread_local std::vector<float> block;
      block.resize(rows * g.k);
      block_product(g, type, avx, i * rows, std::min(g.n, (i + 1) * rows), block.data());
    });
    return;
  }
  std::vector<float> block(std::min<int64_t>(kRowBlock, g.n) * g.k);
  for (int64_t r0 = 0; r0 < g.n; r0 += kRowBlock) {
    const int64_t r1 = std::min<int64_t>(g.n, r0 + kRowBlock);
    const uint8_t* w = g.w + r0 * g.row_bytes;
    parallel_rows(r1 - r0, (r1 - r0) * g.k, [&](int64_t a, int64_t b) {
      avx ? avx2::dequantize(type, w, g.row_bytes, g.k, block.data(), a, b)
          : generic::dequantize(type, w, g.row_bytes, g.k, block.data(), a, b);
    });
    global_sgemm()(101, 111, 112, static_cast<int>(g.m), static_cast<int>(r1 - r0), static_cast<int>(g.k), 1.0f,
                   g.x, static_cast<int>(g.k), block.data(), static_cast<int>(g.k), 0.0f, g.y + r0,
                   static_cast<int>(g.n));
  }
}

}  // namespace

void QMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  auto& encoder = begin_eval(stream(), inputs, out);
  Gemv g{w.data<uint8_t>(), w.shape(1), nullptr, static_cast<int64_t>(x.size() / k_), k_, w.shape(0),
         out.data<float>()};
  encoder.dispatch([g, x, type = type_, int8 = int8_]() mutable {
    std::vector<float> tmp;
    g.x = row_major(x, tmp);  // x's data is ready only now, on the stream's thread
    const bool avx = cpu_has_avx2();
    if (g.m > kGemvMaxRows) {  // prefill: W decoded a block of rows at a time, each block one sgemm
      prefill(g, type, avx);
      return;
    }
    g.prefetch = prefetch_rows;
    if (int8 && avx) {  // llama.cpp's arithmetic: x to int8 per 32 values, integer dot products
      const int64_t blocks = g.m * (g.k / 32);
      std::vector<int8_t> xq(g.m * g.k);
      std::vector<float> xs(blocks);
      std::vector<int32_t> xsum(blocks);
      avx2::quantize_rows(g.x, g.m, g.k, xq.data(), xs.data(), xsum.data());
      parallel_rows(g.n, g.n * g.k * g.m, [&](int64_t r0, int64_t r1) {
        avx2::gemv_int8(type, g, xq.data(), xs.data(), xsum.data(), r0, r1);
      });
      return;
    }
    // The copy with 32 vector registers: 2-8 rows all in one pass over each decoded W row, and one row
    // 5% faster than the AVX2 copy (28 one-row products of Gemma 3 270M, 2.59 -> 2.45 ms; the same bits)
    const bool avx512 = avx512_allowed && cpu_has_avx512();
    parallel_rows(g.n, g.n * g.k * g.m, [&](int64_t r0, int64_t r1) {
      avx512 ? avx512::gemv(type, g, r0, r1) : avx ? avx2::gemv(type, g, r0, r1) : generic::gemv(type, g, r0, r1);
    });
  });
}

void decode_products(const DecodeProduct* products, int count) {
  const bool avx512 = avx512_allowed && cpu_has_avx512(), avx = cpu_has_avx2();
  auto rows = [&](const DecodeProduct& p, int64_t r0, int64_t r1) {
    const Gemv g{p.w, p.row_bytes, p.x, p.m, p.k, p.n, p.y, prefetch_rows};
    avx512 ? avx512::gemv(p.type, g, r0, r1) : avx ? avx2::gemv(p.type, g, r0, r1) : generic::gemv(p.type, g, r0, r1);
  };
  const int threads = pool().size();
  // Each product's rows in chunks as parallel_rows cuts them, every chunk of every product one task.
  std::vector<std::array<int64_t, 3>> tasks;  // (product, first row, end row)
  for (int i = 0; i < count; ++i) {
    const DecodeProduct& p = products[i];
    const int64_t chunk = p.n * p.k * p.m < kParallelMin || threads == 1
                              ? p.n
                              : std::max<int64_t>(8, (p.n + 4 * threads - 1) / (4 * threads) + 7) / 8 * 8;
    for (int64_t r = 0; r < p.n; r += chunk) tasks.push_back({i, r, std::min(p.n, r + chunk)});
  }
  run_parallel(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    rows(products[tasks[t][0]], tasks[t][1], tasks[t][2]);
  });
}

void QMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("lmx qmatmul has no GPU implementation; lmx uses MLX's own ops on the GPU");
}

std::vector<mx::array> QMatmul::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg != 0) {
      throw std::invalid_argument("qmatmul: quantized weights are frozen; there is no gradient with respect to them");
    }
    // dL/dx = dL/dy @ W, with W decoded to float32 (the values the forward used).
    grads.push_back(mx::matmul(cotangents[0], dequantize_rows(primals[1], type_, k_, stream()), stream()));
  }
  return grads;
}

bool QMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QMatmul&>(other);
  return type_ == o.type_ && k_ == o.k_ && int8_ == o.int8_;
}

void DequantizeRows::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& w = inputs[0];
  auto& encoder = begin_eval(stream(), inputs, out);
  int64_t k = k_, rows = out.size() / k_, row_bytes = w.shape(-1);
  encoder.dispatch([wp = w.data<uint8_t>(), y = out.data<float>(), k, rows, row_bytes, type = type_]() {
    const bool avx = cpu_has_avx2();
    parallel_rows(rows, rows * k, [&](int64_t r0, int64_t r1) {
      avx ? avx2::dequantize(type, wp, row_bytes, k, y, r0, r1)
          : generic::dequantize(type, wp, row_bytes, k, y, r0, r1);
    });
  });
}

void DequantizeRows::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("lmx dequantize_rows has no GPU implementation; lmx uses MLX's own ops on the GPU");
}

bool DequantizeRows::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DequantizeRows&>(other);
  return type_ == o.type_ && k_ == o.k_;
}

}  // namespace lmx
