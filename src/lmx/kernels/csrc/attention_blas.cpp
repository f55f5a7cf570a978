// prompt_attention of attention_blas.h.
#include "attention_blas.h"

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "blas.h"
#include "qmatmul.h"
#include "simd_exp.h"

namespace lmx {
namespace {

constexpr int64_t kBlock = 64;  // query rows a task

// p[j] = exp(p[j] - top) for j < n (in place); returns their sum. Eight at a time with AVX2.
__attribute__((target("avx2"))) float exp_shift_avx2(float* p, int64_t n, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), t));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  float total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; j < n; ++j) {
    p[j] = exp_nonpositive(p[j] - top);
    total += p[j];
  }
  return total;
}

float exp_shift(float* p, int64_t n, float top) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    return exp_shift_avx2(p, n, top);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = exp_nonpositive(p[j] - top);
    total += p[j];
  }
  return total;
}

// The element (b, h, j, 0) of a 4-D float32 array whose last axis is contiguous, and its row stride.
struct Rows {
  const float* p;
  int64_t s0, s1, s2;
  explicit Rows(const mx::array& a)
      : p(a.data<float>()), s0(a.strides()[0]), s1(a.strides()[1]), s2(a.strides()[2]) {}
  const float* at(int64_t b, int64_t h, int64_t j) const {
    return p + b * s0 + h * s1 + j * s2;
  }
};

}  // namespace

void prompt_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal, float* y) {
  const Rows qr(q), kr(k), vr(v);
  const int64_t batch = q.shape(0), heads = q.shape(1), lq = q.shape(2), d = q.shape(3);
  const int64_t groups = heads / k.shape(1), lk = k.shape(2), dv = v.shape(3);
  const int64_t blocks = (lq + kBlock - 1) / kBlock;
  const Sgemm sgemm = global_sgemm();
  run_parallel(batch * heads * blocks, [&](int64_t task) {
    const int64_t blk = task % blocks, h = (task / blocks) % heads, b = task / (blocks * heads);
    const int64_t i0 = blk * kBlock, rows = std::min(kBlock, lq - i0);
    const int64_t keys = causal ? lk - lq + i0 + rows : lk;  // what the block's last row sees
    const int64_t g = h / groups;
    std::vector<float> s(rows * keys);
    sgemm(101, 111, 112, static_cast<int>(rows), static_cast<int>(keys), static_cast<int>(d), scale, qr.at(b, h, i0),
          static_cast<int>(qr.s2), kr.at(b, g, 0), static_cast<int>(kr.s2), 0.0f, s.data(), static_cast<int>(keys));
    std::vector<float> inv(rows);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s.data() + r * keys;
      const int64_t seen = causal ? lk - lq + i0 + r + 1 : keys;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < seen; ++j) top = sr[j] > top ? sr[j] : top;
      inv[r] = 1.0f / exp_shift(sr, seen, top);
      std::fill(sr + seen, sr + keys, 0.0f);  // the block's later rows' keys: weight 0
    }
    float* yb = y + ((b * heads + h) * lq + i0) * dv;
    sgemm(101, 111, 111, static_cast<int>(rows), static_cast<int>(dv), static_cast<int>(keys), 1.0f, s.data(),
          static_cast<int>(keys), vr.at(b, g, 0), static_cast<int>(vr.s2), 0.0f, yb, static_cast<int>(dv));
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = yb + r * dv;
      for (int64_t c = 0; c < dv; ++c) yr[c] *= inv[r];
    }
  });
}

}  // namespace lmx
