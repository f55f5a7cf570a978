// The ops of layer_ops.h: plain loops over float32 rows (a decode token is one row a head).
#include "layer_ops.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "attention_blas.h"
#include "cpu_eval.h"
#include "qmatmul.h"
#include "rows.h"
#include "simd_exp.h"
#include "strided.h"
#include "mlx/fast.h"
#include "mlx/transforms.h"

namespace lmx {
namespace {

// The attention's two inner loops, also compiled for AVX2 (picked at load time where the CPU has it).
#define LMX_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
// Whether the CPU has AVX2, for the loops written with its intrinsics (else their one-value forms: the
// same bits).
const bool kAvx2 = __builtin_cpu_supports("avx2");

// Eight partial sums, so the compiler vectorises the loop without reassociating it.
LMX_SIMD_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

LMX_SIMD_CLONES void add_scaled(float* y, const float* x, float w, int64_t n) {  // y += w * x
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// out[r] = dot(a, b[r], n) for four rows b[r]: dot's arithmetic for each (eight lanes of partial sums,
// the same bits), in four independent chains, so that each add no longer waits on the one before it
// (a decode attention's scores: one chain a key was bound by the adds' latency).
__attribute__((target("avx2"))) void dot4_avx2(const float* a, const float* const* b, int64_t n, float* out) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(a + i);
    acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(x, _mm256_loadu_ps(b0 + i)));
    acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(x, _mm256_loadu_ps(b1 + i)));
    acc2 = _mm256_add_ps(acc2, _mm256_mul_ps(x, _mm256_loadu_ps(b2 + i)));
    acc3 = _mm256_add_ps(acc3, _mm256_mul_ps(x, _mm256_loadu_ps(b3 + i)));
  }
  alignas(32) float c[4][8];
  _mm256_store_ps(c[0], acc0);
  _mm256_store_ps(c[1], acc1);
  _mm256_store_ps(c[2], acc2);
  _mm256_store_ps(c[3], acc3);
  for (; i < n; ++i) {
    for (int r = 0; r < 4; ++r) c[r][0] += a[i] * b[r][i];
  }
  for (int r = 0; r < 4; ++r) {
    out[r] = ((c[r][0] + c[r][1]) + (c[r][2] + c[r][3])) + ((c[r][4] + c[r][5]) + (c[r][6] + c[r][7]));
  }
}

// y += w[0] * x[0], then w[1] * x[1], w[2] * x[2], w[3] * x[3]: four add_scaled calls' arithmetic (the
// same bits) with y loaded and stored once.
__attribute__((target("avx2"))) void add_scaled4_avx2(float* y, const float* const* x, const float* w, int64_t n) {
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  const __m256 w0 = _mm256_set1_ps(w[0]), w1 = _mm256_set1_ps(w[1]), w2 = _mm256_set1_ps(w[2]),
               w3 = _mm256_set1_ps(w[3]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_loadu_ps(y + i);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(w0, _mm256_loadu_ps(x0 + i)));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(w1, _mm256_loadu_ps(x1 + i)));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(w2, _mm256_loadu_ps(x2 + i)));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(w3, _mm256_loadu_ps(x3 + i)));
    _mm256_storeu_ps(y + i, acc);
  }
  for (; i < n; ++i) y[i] = (((y[i] + w[0] * x0[i]) + w[1] * x1[i]) + w[2] * x2[i]) + w[3] * x3[i];
}

// One row of mx.quantize's affine layout back to float32: value i = scales[i / g] * q_i + biases[i / g],
// q_i the i-th `bits`-bit field of the packed words, lowest bits first (as mx.dequantize reads it).
LMX_SIMD_CLONES void dequantize_row8(float* out, const uint32_t* packed, const float* scales, const float* biases,
                                     int64_t n, int64_t g) {
  const uint8_t* q = reinterpret_cast<const uint8_t*>(packed);  // little-endian: byte i is field i
  for (int64_t start = 0; start < n; start += g) {
    const float s = scales[start / g], b = biases[start / g];
    for (int64_t i = start; i < start + g; ++i) out[i] = s * static_cast<float>(q[i]) + b;
  }
}

LMX_SIMD_CLONES void dequantize_row4(float* out, const uint32_t* packed, const float* scales, const float* biases,
                                     int64_t n, int64_t g) {
  const uint8_t* q = reinterpret_cast<const uint8_t*>(packed);  // byte i holds fields 2i (low) and 2i + 1
  for (int64_t start = 0; start < n; start += g) {
    const float s = scales[start / g], b = biases[start / g];
    for (int64_t i = start / 2; i < (start + g) / 2; ++i) {
      out[2 * i] = s * static_cast<float>(q[i] & 15) + b;
      out[2 * i + 1] = s * static_cast<float>(q[i] >> 4) + b;
    }
  }
}

// sum(exp(x[i] - top)): exp_nonpositive (simd_exp.h), eight values at a time with AVX2 where the
// CPU has it, else one at a time.
__attribute__((target("avx2"))) float sum_exp_avx2(const float* x, int64_t n, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc = _mm256_add_ps(acc, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), t)));
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  float total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) total += exp_nonpositive(x[i] - top);
  return total;
}

float sum_exp(const float* x, int64_t n, float top) {
  if (kAvx2) {
    return sum_exp_avx2(x, n, top);
  }
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += exp_nonpositive(x[i] - top);
  return total;
}

LMX_SIMD_CLONES float max_of(const float* x, int64_t n) {
  float acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
  }
  for (; i < n; ++i) acc[0] = x[i] > acc[0] ? x[i] : acc[0];
  float top = acc[0];
  for (int j = 1; j < 8; ++j) top = acc[j] > top ? acc[j] : top;
  return top;
}

// Multiply-adds of a decode attention (queries x keys x (d + dv)) from which its query rows are shared
// out over the thread pool: Gemma 3 270M's 4 heads from about 128 keys on (0.2 ms a layer at 540 keys
// on one thread of the development machine).
constexpr int64_t kDecodeParallelMin = 1 << 18;

bool float_vector(const mx::array& a, int64_t n) {
  return a.dtype() == mx::float32 && a.ndim() == 1 && a.shape(0) == n;
}

}  // namespace

void CpuOp::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation; lmx uses MLX's own ops on the GPU");
}

std::vector<mx::array> CpuOp::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto grads = mx::vjp(fallback_, primals, cotangents).second;
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1 || !float_vector(w, x.shape(-1))) {
    return mx::fast::rms_norm(x, w, eps, s);
  }
  auto fallback = [eps, s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::fast::rms_norm(in[0], in[1], eps, s)};
  };
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(mx::to_stream(s), fallback, eps), {x, w});
}

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([x, w, y = out.data<float>(), eps = eps_]() {
    std::vector<float> tmp;
    const float* xp = row_major(x, tmp);
    const float* wp = w.data<float>();  // 1-D: contiguous unless a strided view, handled below
    const int64_t n = x.shape(-1), rows = x.size() / n, ws = w.strides()[0];
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(xp + r * n, wp, ws, eps, n, y + r * n);
  });
}

bool RmsNorm::is_equivalent(const mx::Primitive& other) const {
  return eps_ == static_cast<const RmsNorm&>(other).eps_;
}

mx::array rope(const mx::array& x, int dims, const mx::array& periods, float scale, int offset,
               mx::StreamOrDevice s) {
  auto mlx_rope = [dims, scale, offset, s](const mx::array& a, const mx::array& p) {
    return mx::fast::rope(a, dims, false, std::nullopt, scale, offset, p, s);
  };
  if (x.dtype() != mx::float32 || x.ndim() < 2 || dims % 2 || dims > x.shape(-1) ||
      !float_vector(periods, dims / 2)) {
    return mlx_rope(x, periods);
  }
  auto fallback = [mlx_rope](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mlx_rope(in[0], in[1])};
  };
  return mx::array(
      x.shape(), mx::float32, std::make_shared<Rope>(mx::to_stream(s), fallback, dims, scale, offset), {x, periods});
}

mx::array rope_rows(const mx::array& x, int dims, const mx::array& periods, float scale, const mx::array& offsets,
                    mx::StreamOrDevice s) {
  auto mlx_rope = [dims, scale, s](const mx::array& a, const mx::array& p, const mx::array& at) {
    return mx::fast::rope(a, dims, false, std::nullopt, scale, at, p, s);
  };
  if (x.dtype() != mx::float32 || x.ndim() < 2 || dims % 2 || dims > x.shape(-1) ||
      !float_vector(periods, dims / 2) || offsets.dtype() != mx::int32 || offsets.ndim() != 1 ||
      offsets.shape(0) != x.shape(0)) {
    return mlx_rope(x, periods, offsets);
  }
  auto fallback = [mlx_rope](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mlx_rope(in[0], in[1], in[2])};
  };
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Rope>(mx::to_stream(s), fallback, dims, scale, 0, true), {x, periods, offsets});
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([in = inputs, y = out.data<float>(), dims = dims_, scale = scale_, offset = offset_,
                    rows_at = rows_]() {
    const auto &x = in[0], &periods = in[1];
    std::vector<float> tmp;
    const float* xp = row_major(x, tmp);
    const int64_t d = x.shape(-1), len = x.shape(-2), rows = x.size() / d, half = dims / 2;
    const int64_t ps = periods.strides()[0];
    // One table a call (positions x pairs), or one a batch row when each row has its own offset.
    const int64_t tables = rows_at ? x.shape(0) : 1, per_table = rows / tables;
    const int32_t* at = rows_at ? in[2].data<int32_t>() : nullptr;
    const int64_t as = rows_at ? in[2].strides()[0] : 0;
    std::vector<float> cosv(tables * len * half), sinv(tables * len * half);
    rope_tables(periods.data<float>(), ps, half, scale, offset, at, as, tables, len, cosv.data(), sinv.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t where = ((r / per_table) * len + r % len) * half;
      rope_row(xp + r * d, cosv.data() + where, sinv.data() + where, half, d, y + r * d);
    }
  });
}

bool Rope::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Rope&>(other);
  return dims_ == o.dims_ && scale_ == o.scale_ && offset_ == o.offset_ && rows_ == o.rows_;
}

mx::array logsumexp(const mx::array& x, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) == 0) {
    return mx::logsumexp(x, -1, true, s);
  }
  auto fallback = [s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::logsumexp(in[0], -1, true, s)};
  };
  mx::Shape shape = x.shape();
  shape.back() = 1;
  return mx::array(shape, mx::float32, std::make_shared<LogSumExp>(mx::to_stream(s), fallback), {x});
}

namespace {

// One row's logsumexp (LogSumExp's value; LogSoftmax subtracts this very value).
float row_logsumexp(const float* x, int64_t n) {
  const float top = max_of(x, n);
  // +inf anywhere: inf; all -inf: -inf (as MLX); a NaN makes the sum NaN
  return std::isinf(top) ? top : top + std::log(sum_exp(x, n, top));
}

// fn(r) for each of `rows` rows of n values: rows of a vocabulary (a batch's logits) one a task.
template <typename Fn>
void each_row(int64_t rows, int64_t n, Fn&& fn) {
  if (n >= (1 << 14)) {
    run_parallel(rows, fn);
  } else {
    for (int64_t r = 0; r < rows; ++r) fn(r);
  }
}

__attribute__((target("avx2"))) void subtract_avx2(const float* x, int64_t n, float c, float* y) {
  const __m256 cv = _mm256_set1_ps(c);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_sub_ps(_mm256_loadu_ps(x + i), cv));
  for (; i < n; ++i) y[i] = x[i] - c;
}

void subtract(const float* x, int64_t n, float c, float* y) {
  if (kAvx2) {
    subtract_avx2(x, n, c, y);
    return;
  }
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] - c;
}

// The row's largest value, and whether it holds a NaN (the max then means nothing).
__attribute__((target("avx2"))) float max_and_nan_avx2(const float* x, int64_t n, bool* nan) {
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 odd = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    top = _mm256_max_ps(top, v);
    odd = _mm256_or_ps(odd, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, top);
  float best = part[0];
  for (int j = 1; j < 8; ++j) best = std::max(best, part[j]);
  bool any = _mm256_movemask_ps(odd) != 0;
  for (; i < n; ++i) {
    any = any || std::isnan(x[i]);
    best = std::max(best, x[i]);
  }
  *nan = any;
  return best;
}

// The first index holding `value` (a value of the row; NaN: the first NaN).
__attribute__((target("avx2"))) int64_t first_of_avx2(const float* x, int64_t n, float value) {
  const bool nan = std::isnan(value);
  const __m256 v = _mm256_set1_ps(value);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    const int hits = _mm256_movemask_ps(nan ? _mm256_cmp_ps(a, a, _CMP_UNORD_Q) : _mm256_cmp_ps(a, v, _CMP_EQ_OQ));
    if (hits) return i + __builtin_ctz(hits);
  }
  for (; i < n; ++i) {
    if (nan ? std::isnan(x[i]) : x[i] == value) return i;
  }
  return 0;
}

uint32_t argmax_row(const float* x, int64_t n) {
  if (kAvx2) {
    bool nan = false;
    const float top = max_and_nan_avx2(x, n, &nan);
    return static_cast<uint32_t>(first_of_avx2(x, n, nan ? std::numeric_limits<float>::quiet_NaN() : top));
  }
  int64_t best = 0;  // MLX's rule: a larger value, or the first NaN, takes the lead
  for (int64_t i = 1; i < n; ++i) {
    if (std::isnan(x[best])) break;
    if (x[i] > x[best] || std::isnan(x[i])) best = i;
  }
  return static_cast<uint32_t>(best);
}

// The eval_cpu of an op over the rows of its one float32 input x (..., n): fn(row, n, r, y) writes row r's
// result into out's data y (of type T).
template <typename T, typename Fn>
void eval_each_row(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out, Fn fn) {
  const auto& x = inputs[0];
  auto& encoder = begin_eval(stream, inputs, out);
  encoder.dispatch([x, y = out.data<T>(), fn]() {
    std::vector<float> tmp;
    const float* xp = row_major(x, tmp);
    const int64_t n = x.shape(-1), rows = x.size() / n;
    each_row(rows, n, [&](int64_t r) { fn(xp + r * n, n, r, y); });
  });
}

}  // namespace

void LogSumExp::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_each_row<float>(stream(), inputs, out,
                       [](const float* x, int64_t n, int64_t r, float* y) { y[r] = row_logsumexp(x, n); });
}

mx::array log_softmax(const mx::array& x, mx::StreamOrDevice s) {
  auto mlx_log_softmax = [s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::subtract(in[0], mx::logsumexp(in[0], -1, true, s), s)};
  };
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) == 0) {
    return mlx_log_softmax({x})[0];
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<LogSoftmax>(mx::to_stream(s), mlx_log_softmax), {x});
}

void LogSoftmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_each_row<float>(stream(), inputs, out, [](const float* x, int64_t n, int64_t r, float* y) {
    subtract(x, n, row_logsumexp(x, n), y + r * n);
  });
}

mx::array argmax(const mx::array& x, mx::StreamOrDevice s) {
  auto mlx_argmax = [s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::argmax(in[0], -1, false, s)};
  };
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) == 0) {
    return mlx_argmax({x})[0];
  }
  mx::Shape shape(x.shape().begin(), x.shape().end() - 1);
  return mx::array(shape, mx::uint32, std::make_shared<ArgMax>(mx::to_stream(s), mlx_argmax), {x});
}

void ArgMax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  eval_each_row<uint32_t>(stream(), inputs, out,
                          [](const float* x, int64_t n, int64_t r, uint32_t* y) { y[r] = argmax_row(x, n); });
}

namespace {

constexpr int kBucketsPerUnit = 64;  // buckets per unit of log-probability below the row's maximum
constexpr int kBuckets = 32 * kBucketsPerUnit;  // the last holds everything e^-32 below the top or less

// A token's bucket: its distance below the row's maximum in steps of 1/64, the last bucket for
// everything further (and -inf). A larger value never lands in a later bucket (the subtraction and
// the truncation are both monotonic); ties share one.
inline int bucket_of(float top, float v) {
  return static_cast<int>(std::min((top - v) * kBucketsPerUnit, static_cast<float>(kBuckets - 1)));
}

// mass[bucket] += exp(x[i] - top) for every token (the same bits as bucket_of and exp_nonpositive).
__attribute__((target("avx2"))) void add_masses_avx2(const float* x, int64_t n, float top, double* mass) {
  const __m256 t = _mm256_set1_ps(top), per_unit = _mm256_set1_ps(kBucketsPerUnit);
  const __m256 last = _mm256_set1_ps(kBuckets - 1);
  alignas(32) float e[8];
  alignas(32) int32_t b[8];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_store_ps(e, exp8_nonpositive(_mm256_sub_ps(v, t)));
    const __m256 d = _mm256_min_ps(_mm256_mul_ps(_mm256_sub_ps(t, v), per_unit), last);
    _mm256_store_si256(reinterpret_cast<__m256i*>(b), _mm256_cvttps_epi32(d));
    for (int j = 0; j < 8; ++j) mass[b[j]] += e[j];
  }
  for (; i < n; ++i) mass[bucket_of(top, x[i])] += exp_nonpositive(x[i] - top);
}

void add_masses(const float* x, int64_t n, float top, double* mass) {
  if (kAvx2) {
    add_masses_avx2(x, n, top, mass);
    return;
  }
  for (int64_t i = 0; i < n; ++i) mass[bucket_of(top, x[i])] += exp_nonpositive(x[i] - top);
}

// One row of top_p (see layer_ops.h): y = x where the token is kept, else -inf.
void top_p_row(const float* x, float* y, int64_t n, float reach) {
  const float top = max_of(x, n);
  const bool nan = std::any_of(x, x + n, [](float v) { return std::isnan(v); });
  if (!std::isfinite(top) || nan) {  // all -inf, a +inf or a NaN: the row as it is (MLX's rule keeps it too)
    std::copy(x, x + n, y);
    return;
  }
  std::array<double, kBuckets> mass{};  // exp(x - top) summed per bucket, in double
  add_masses(x, n, top, mass.data());
  double total = 0.0;
  for (double m : mass) total += m;
  const double bound = static_cast<double>(reach) * total;  // `reach` in the same unnormalised units
  // The buckets most likely first, while the mass up to and including them stays below the bound:
  // all their tokens are kept. Bucket b holds the last token kept.
  int b = 0;
  double before = 0.0;  // the mass of the buckets ahead of b
  while (b < kBuckets - 1 && before + mass[b] < bound) before += mass[b++];
  std::vector<float> values;
  for (int64_t i = 0; i < n; ++i) {
    if (bucket_of(top, x[i]) == b) values.push_back(x[i]);
  }
  float threshold = -std::numeric_limits<float>::infinity();  // an empty last bucket: every token reached
  if (!values.empty()) {
    // Most likely first; the bucket's first token is kept (the row's first, or the mass before it is
    // below the bound), then each while the mass before it is.
    std::sort(values.begin(), values.end(), std::greater<float>());
    threshold = values[0];
    before += exp_nonpositive(values[0] - top);
    for (size_t j = 1; j < values.size() && before < bound; ++j) {
      threshold = values[j];
      before += exp_nonpositive(values[j] - top);
    }
  }
  const float drop = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] >= threshold ? x[i] : drop;
}

}  // namespace

mx::array top_p(const mx::array& x, float reach, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) == 0) {
    throw std::invalid_argument("top_p: x must be (..., V) float32 with V > 0");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<TopP>(mx::to_stream(s), reach), {x});
}

void TopP::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([x, y = out.data<float>(), reach = reach_]() {
    std::vector<float> tmp;
    const float* xp = row_major(x, tmp);
    const int64_t n = x.shape(-1), rows = x.size() / n;
    run_parallel(rows, [&](int64_t r) { top_p_row(xp + r * n, y + r * n, n, reach); });
  });
}

void TopP::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("lmx top_p has no GPU implementation; lmx uses MLX's own sort on the GPU");
}

bool TopP::is_equivalent(const mx::Primitive& other) const {
  return reach_ == static_cast<const TopP&>(other).reach_;
}

namespace {

constexpr int64_t kDrawBlock = 256;  // tokens a partial sum of categorical_row covers

// exp((x[i] - top) * inv_t) into w, and the sum of each kDrawBlock tokens into blocks (double).
__attribute__((target("avx2"))) void draw_weights_avx2(const float* x, int64_t n, float top, float inv_t, float* w,
                                                       double* blocks) {
  const __m256 t = _mm256_set1_ps(top), s = _mm256_set1_ps(inv_t);
  for (int64_t b0 = 0; b0 < n; b0 += kDrawBlock) {
    const int64_t b1 = std::min(n, b0 + kDrawBlock);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = b0;
    for (; i + 8 <= b1; i += 8) {
      const __m256 e = exp8_nonpositive(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), t), s));
      _mm256_storeu_ps(w + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    alignas(32) float part[8];
    _mm256_store_ps(part, acc);
    double total = 0.0;
    for (float v : part) total += v;
    for (; i < b1; ++i) total += (w[i] = exp_nonpositive((x[i] - top) * inv_t));
    blocks[b0 / kDrawBlock] = total;
  }
}

void draw_weights(const float* x, int64_t n, float top, float inv_t, float* w, double* blocks) {
  if (kAvx2) {
    draw_weights_avx2(x, n, top, inv_t, w, blocks);
    return;
  }
  for (int64_t b0 = 0; b0 < n; b0 += kDrawBlock) {
    double total = 0.0;
    for (int64_t i = b0; i < std::min(n, b0 + kDrawBlock); ++i) total += (w[i] = exp_nonpositive((x[i] - top) * inv_t));
    blocks[b0 / kDrawBlock] = total;
  }
}

uint32_t categorical_row(const float* x, int64_t n, float u, float inv_t) {
  const float top = max_of(x, n);
  if (!std::isfinite(top)) {
    return 0;  // no finite logit (or +inf: MLX's draw would be NaN-driven too)
  }
  std::vector<float> w(n);
  std::vector<double> blocks((n + kDrawBlock - 1) / kDrawBlock);
  draw_weights(x, n, top, inv_t, w.data(), blocks.data());
  double total = 0.0;
  for (double b : blocks) total += b;
  const double target = static_cast<double>(u) * total;
  // The block where the running sum passes the target, then the token inside it. A -inf token
  // weighs exp_nonpositive's floor (~1e-38) in the block sums but is never drawn.
  const float drop = -std::numeric_limits<float>::infinity();
  double before = 0.0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const int64_t b0 = static_cast<int64_t>(b) * kDrawBlock, b1 = std::min(n, b0 + kDrawBlock);
    if (before + blocks[b] <= target) {
      before += blocks[b];
      continue;
    }
    for (int64_t i = b0; i < b1; ++i) {
      if (x[i] == drop) continue;
      before += w[i];
      if (before > target) return static_cast<uint32_t>(i);
    }
  }
  for (int64_t i = n - 1; i > 0; --i) {  // rounding left the target unreached: the last finite token
    if (x[i] != drop) return static_cast<uint32_t>(i);
  }
  return 0;
}

}  // namespace

mx::array categorical(const mx::array& logits, const mx::array& u, float temperature, mx::StreamOrDevice s) {
  if (logits.dtype() != mx::float32 || logits.ndim() != 2 || logits.shape(1) == 0) {
    throw std::invalid_argument("categorical: logits must be (B, V) float32 with V > 0");
  }
  if (u.dtype() != mx::float32 || u.ndim() != 1 || u.shape(0) != logits.shape(0)) {
    throw std::invalid_argument("categorical: u must be (B,) float32, one number a row of logits");
  }
  if (!(temperature > 0.0f) || !std::isfinite(temperature)) {
    throw std::invalid_argument("categorical: temperature must be a positive finite number");
  }
  return mx::array({logits.shape(0)}, mx::uint32, std::make_shared<Categorical>(mx::to_stream(s), temperature),
                   {logits, u});
}

void Categorical::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  const auto& logits = inputs[0];
  const auto& u = inputs[1];
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([logits, u, y = out.data<uint32_t>(), inv_t = 1.0f / temperature_]() {
    std::vector<float> tmp, tmp_u;
    const float* xp = row_major(logits, tmp);
    const float* up = row_major(u, tmp_u);
    const int64_t n = logits.shape(1), rows = logits.shape(0);
    run_parallel(rows, [&](int64_t r) { y[r] = categorical_row(xp + r * n, n, up[r], inv_t); });
  });
}

void Categorical::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("lmx categorical has no GPU implementation; lmx uses MLX's own categorical on the GPU");
}

bool Categorical::is_equivalent(const mx::Primitive& other) const {
  return temperature_ == static_cast<const Categorical&>(other).temperature_;
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    mx::StreamOrDevice s) {
  auto mlx_attention = [scale, causal, s](const mx::array& q, const mx::array& k, const mx::array& v) {
    return mx::fast::scaled_dot_product_attention(q, k, v, scale, causal ? "causal" : "", {}, {}, false, s);
  };
  // more than kFewQueries (a prompt): blocked BLAS products (attention_blas.h)
  const bool here = attention_inputs(q, k, v) && k.shape(2) >= q.shape(2) &&
                    (q.shape(2) <= kFewQueries || prompt_inputs(q, k, v));
  if (!here) {
    return mlx_attention(q, k, v);
  }
  auto fallback = [mlx_attention](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mlx_attention(in[0], in[1], in[2])};
  };
  mx::Shape shape = q.shape();
  shape.back() = v.shape(3);
  return mx::array(shape, mx::float32, std::make_shared<Attention>(mx::to_stream(s), fallback, scale, causal), {q, k, v});
}

namespace {

// The (B, 1, 1, n_keys) mask of attention_from(): row b sees the keys from index first[b] (B,) on.
mx::array first_key_mask(const mx::array& first, int n_keys, mx::StreamOrDevice s) {
  const auto keys = mx::arange(n_keys, mx::int32, s);
  const auto seen = mx::greater_equal(mx::expand_dims(keys, 0, s), mx::expand_dims(first, 1, s), s);  // (B, S)
  return mx::reshape(seen, {seen.shape(0), 1, 1, seen.shape(1)}, s);
}

// Row b's first key of `first` (B,) int32, kept inside [0, n_keys): a row sees one key at least.
int64_t first_key(const mx::array& first, int64_t b, int64_t n_keys) {
  return std::clamp<int64_t>(first.data<int32_t>()[b * first.strides()[0]], 0, n_keys - 1);
}

}  // namespace

mx::array attention_from(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                         const mx::array& first, mx::StreamOrDevice s) {
  auto mlx_attention = [scale, s](const std::vector<mx::array>& in) {
    const auto mask = first_key_mask(in[3], in[1].shape(2), s);
    return std::vector<mx::array>{
        mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], scale, "", mask, {}, false, s)};
  };
  const bool here = attention_inputs(q, k, v) && q.shape(2) == 1 && first.dtype() == mx::int32 &&
                    first.ndim() == 1 && first.shape(0) == q.shape(0);
  if (!here) {
    return mlx_attention({q, k, v, first})[0];
  }
  mx::Shape shape = q.shape();
  shape.back() = v.shape(3);
  return mx::array(shape, mx::float32, std::make_shared<Attention>(mx::to_stream(s), mlx_attention, scale, false, true),
                   {q, k, v, first});
}

void Attention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([in = inputs, y = out.data<float>(), scale = scale_, causal = causal_, from = from_]() {
    const auto &q = in[0], &k = in[1], &v = in[2];
    if (q.shape(2) > kFewQueries) {
      prompt_attention(q, k, v, scale, causal, y);
      return;
    }
    std::vector<float> tq, tk, tv;
    const Rows4 qr(q, tq), kr(k, tk), vr(v, tv);
    const int64_t batch = q.shape(0), heads = q.shape(1), lq = q.shape(2), d = q.shape(3);
    const int64_t groups = heads / k.shape(1), lk = k.shape(2), dv = v.shape(3);
    // One task a query row (batch, head, position): each computed alone, whichever thread runs it.
    auto row = [&](int64_t t) {
      thread_local std::vector<float> p;
      p.resize(lk);
      const int64_t b = t / (heads * lq), h = t / lq % heads, i = t % lq;
      const int64_t k0 = from ? first_key(in[3], b, lk) : 0;  // the row's keys are [k0, lk)
      const int64_t keys = (causal ? lk - lq + i + 1 : lk) - k0;
      const float* qi = qr.at(b, h, i);
      float top = -std::numeric_limits<float>::infinity();
      const int64_t g = h / groups;
      int64_t j = 0;
      for (; kAvx2 && j + 4 <= keys; j += 4) {
        const float* kj[4] = {kr.at(b, g, k0 + j), kr.at(b, g, k0 + j + 1), kr.at(b, g, k0 + j + 2),
                              kr.at(b, g, k0 + j + 3)};
        dot4_avx2(qi, kj, d, p.data() + j);
      }
      for (; j < keys; ++j) p[j] = dot(qi, kr.at(b, g, k0 + j), d);
      for (j = 0; j < keys; ++j) {
        p[j] *= scale;
        top = std::max(top, p[j]);
      }
      float total = 0.0f;
      for (j = 0; j < keys; ++j) {
        p[j] = std::exp(p[j] - top);
        total += p[j];
      }
      float* yi = y + t * dv;
      std::fill(yi, yi + dv, 0.0f);
      for (j = 0; kAvx2 && j + 4 <= keys; j += 4) {
        const float* vj[4] = {vr.at(b, g, k0 + j), vr.at(b, g, k0 + j + 1), vr.at(b, g, k0 + j + 2),
                              vr.at(b, g, k0 + j + 3)};
        add_scaled4_avx2(yi, vj, p.data() + j, dv);
      }
      for (; j < keys; ++j) add_scaled(yi, vr.at(b, g, k0 + j), p[j], dv);
      const float inv = 1.0f / total;
      for (int64_t c = 0; c < dv; ++c) yi[c] *= inv;
    };
    const int64_t rows = batch * heads * lq;
    if (rows * lk * (d + dv) >= kDecodeParallelMin) {
      run_parallel(rows, row);
    } else {
      for (int64_t t = 0; t < rows; ++t) row(t);
    }
  });
}

bool Attention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Attention&>(other);
  return scale_ == o.scale_ && causal_ == o.causal_ && from_ == o.from_;
}

namespace {

// quantized_attention(), or with `first` (inputs[7]) quantized_attention_from().
mx::array make_quantized_attention(std::vector<mx::array> inputs, float scale, bool causal, int group_size, int bits,
                                   mx::StreamOrDevice s) {
  const bool from = inputs.size() == 8;
  auto mlx_attention = [scale, causal, group_size, bits, s](const std::vector<mx::array>& in) {
    auto k = mx::dequantize(in[1], in[2], in[3], group_size, bits, "affine", std::nullopt, std::nullopt, s);
    auto v = mx::dequantize(in[4], in[5], in[6], group_size, bits, "affine", std::nullopt, std::nullopt, s);
    std::optional<mx::array> mask;
    if (in.size() == 8) mask = first_key_mask(in[7], k.shape(2), s);
    return std::vector<mx::array>{
        mx::fast::scaled_dot_product_attention(in[0], k, v, scale, causal ? "causal" : "", mask, {}, false, s)};
  };
  const auto &q = inputs[0], &kw = inputs[1];
  bool here = (bits == 8 || bits == 4) && group_size > 0 && group_size % 2 == 0 && q.dtype() == mx::float32 &&
              q.ndim() == 4 && q.shape(2) <= kFewQueries && q.shape(3) % group_size == 0;
  if (from) {
    const auto& first = inputs[7];
    here = here && q.shape(2) == 1 && first.dtype() == mx::int32 && first.ndim() == 1 && first.shape(0) == q.shape(0);
  }
  for (int i = 1; here && i < 7; ++i) {
    const auto& a = inputs[i];
    const bool words = i == 1 || i == 4;
    here = a.ndim() == 4 && a.dtype() == (words ? mx::uint32 : mx::float32) && a.shape(0) == q.shape(0) &&
           a.shape(1) == kw.shape(1) && a.shape(2) == kw.shape(2) &&
           a.shape(3) == (words ? q.shape(3) * bits / 32 : q.shape(3) / group_size);
  }
  here = here && kw.shape(1) > 0 && q.shape(1) % kw.shape(1) == 0 && kw.shape(2) >= q.shape(2);
  if (!here) {
    return mlx_attention(inputs)[0];
  }
  const auto shape = q.shape();  // q is inputs[0], which the call below moves from
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantizedAttention>(mx::to_stream(s), mlx_attention, scale, causal, group_size,
                                                        bits, from),
                   std::move(inputs));
}

}  // namespace

mx::array quantized_attention(const mx::array& q, const mx::array& kw, const mx::array& ks, const mx::array& kb,
                              const mx::array& vw, const mx::array& vs, const mx::array& vb, float scale,
                              bool causal, int group_size, int bits, mx::StreamOrDevice s) {
  return make_quantized_attention({q, kw, ks, kb, vw, vs, vb}, scale, causal, group_size, bits, s);
}

mx::array quantized_attention_from(const mx::array& q, const mx::array& kw, const mx::array& ks,
                                   const mx::array& kb, const mx::array& vw, const mx::array& vs,
                                   const mx::array& vb, float scale, const mx::array& first, int group_size,
                                   int bits, mx::StreamOrDevice s) {
  return make_quantized_attention({q, kw, ks, kb, vw, vs, vb, first}, scale, false, group_size, bits, s);
}

void QuantizedAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([inputs, y = out.data<float>(), scale = scale_, causal = causal_, g = group_size_,
                    bits = bits_, from = from_]() {
    const auto& q = inputs[0];
    std::vector<float> tq, tks, tkb, tvs, tvb;
    std::vector<uint32_t> tkw, tvw;
    const Rows4 qr(q, tq);
    const RowsOf<uint32_t> kwr(inputs[1], tkw), vwr(inputs[4], tvw);
    const RowsOf<float> ksr(inputs[2], tks), kbr(inputs[3], tkb), vsr(inputs[5], tvs), vbr(inputs[6], tvb);
    const int64_t batch = q.shape(0), heads = q.shape(1), lq = q.shape(2), d = q.shape(3);
    const int64_t n_kv = inputs[1].shape(1), groups = heads / n_kv, lk = inputs[1].shape(2);
    const int64_t rows = groups * lq;  // the queries one key head serves: (query head of the group, position)
    auto dequantize = bits == 8 ? dequantize_row8 : dequantize_row4;
    std::vector<float> row(d), p(rows * lk), total(rows);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t k0 = from ? first_key(inputs[7], b, lk) : 0;  // the row's keys are [k0, lk)
      for (int64_t hk = 0; hk < n_kv; ++hk) {
        // Scores: each key row dequantized once, for every query it serves.
        for (int64_t j = k0; j < lk; ++j) {
          dequantize(row.data(), kwr.at(b, hk, j), ksr.at(b, hk, j), kbr.at(b, hk, j), d, g);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t h = hk * groups + r / lq, i = r % lq;
            const bool seen = !causal || j <= lk - lq + i;
            p[r * lk + j] = seen ? dot(qr.at(b, h, i), row.data(), d) * scale
                                 : -std::numeric_limits<float>::infinity();
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* pr = p.data() + r * lk;
          const float top = max_of(pr + k0, lk - k0);
          float sum = 0.0f;
          for (int64_t j = k0; j < lk; ++j) {
            pr[j] = std::exp(pr[j] - top);
            sum += pr[j];
          }
          total[r] = sum;
          const int64_t h = hk * groups + r / lq, i = r % lq;
          float* yr = y + ((b * heads + h) * lq + i) * d;
          std::fill(yr, yr + d, 0.0f);
        }
        // Outputs: each value row dequantized once, added to every query's output with its weight.
        for (int64_t j = k0; j < lk; ++j) {
          dequantize(row.data(), vwr.at(b, hk, j), vsr.at(b, hk, j), vbr.at(b, hk, j), d, g);
          for (int64_t r = 0; r < rows; ++r) {
            const float w = p[r * lk + j];
            if (w == 0.0f) continue;  // a masked (causal) key
            const int64_t h = hk * groups + r / lq, i = r % lq;
            add_scaled(y + ((b * heads + h) * lq + i) * d, row.data(), w, d);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t h = hk * groups + r / lq, i = r % lq;
          float* yr = y + ((b * heads + h) * lq + i) * d;
          const float inv = 1.0f / total[r];
          for (int64_t c = 0; c < d; ++c) yr[c] *= inv;
        }
      }
    }
  });
}

bool QuantizedAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedAttention&>(other);
  return scale_ == o.scale_ && causal_ == o.causal_ && group_size_ == o.group_size_ && bits_ == o.bits_ &&
         from_ == o.from_;
}

}  // namespace lmx
