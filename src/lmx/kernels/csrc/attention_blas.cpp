// prompt_attention of attention_blas.h.
#include "attention_blas.h"

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "blas.h"
#include "cpu_eval.h"
#include "mlx/fast.h"
#include "qmatmul.h"
#include "simd_exp.h"
#include "strided.h"

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

}  // namespace

bool attention_inputs(const mx::array& q, const mx::array& k, const mx::array& v) {
  return q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32 && q.ndim() == 4 &&
         k.ndim() == 4 && v.ndim() == 4 && q.shape(0) == k.shape(0) && v.shape(0) == k.shape(0) && k.shape(1) > 0 &&
         q.shape(1) % k.shape(1) == 0 && v.shape(1) == k.shape(1) && q.shape(3) == k.shape(3) &&
         v.shape(2) == k.shape(2);
}

bool prompt_inputs(const mx::array& q, const mx::array& k, const mx::array& v) {
  return global_sgemm() != nullptr && q.strides().back() == 1 && k.strides().back() == 1 && v.strides().back() == 1;
}

void prompt_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal, float* y,
                      const mx::array* mask) {
  std::vector<float> tq, tk, tv;  // (the callers check that each last axis is contiguous: no copy)
  const Rows4 qr(q, tq), kr(k, tk), vr(v, tv);
  if (mask != nullptr) causal = false;  // the mask says which keys each query sees
  const uint8_t* mp = mask ? reinterpret_cast<const uint8_t*>(mask->data<bool>()) : nullptr;
  const int64_t ms0 = mask && mask->shape(0) > 1 ? mask->strides()[0] : 0;
  const int64_t ms2 = mask ? mask->strides()[2] : 0, ms3 = mask ? mask->strides()[3] : 0;
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
      if (mp != nullptr) {  // visible where the mask says: others weigh exactly 0
        const uint8_t* mr = mp + b * ms0 + (i0 + r) * ms2;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < keys; ++j) top = mr[j * ms3] && sr[j] > top ? sr[j] : top;
        if (top == -std::numeric_limits<float>::infinity()) {  // no key visible (not a row a model makes)
          std::fill(sr, sr + keys, 0.0f);
          inv[r] = 0.0f;
          continue;
        }
        for (int64_t j = 0; j < keys; ++j) sr[j] = mr[j * ms3] ? sr[j] : -std::numeric_limits<float>::infinity();
        const float total = exp_shift(sr, keys, top);  // a hidden key adds ~1e-38: nothing to a sum >= 1
        for (int64_t j = 0; j < keys; ++j) sr[j] = mr[j * ms3] ? sr[j] : 0.0f;
        inv[r] = 1.0f / total;
        continue;
      }
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

mx::array attention_masked(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           const mx::array& mask, mx::StreamOrDevice s) {
  auto mlx_attention = [scale, s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{
        mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], scale, "", in[3], {}, false, s)};
  };
  const bool here = attention_inputs(q, k, v) && q.shape(2) > kFewQueries && prompt_inputs(q, k, v) &&
                    mask.dtype() == mx::bool_ && mask.ndim() == 4 &&
                    (mask.shape(0) == 1 || mask.shape(0) == q.shape(0)) && mask.shape(1) == 1 &&
                    mask.shape(2) == q.shape(2) && mask.shape(3) == k.shape(2);
  if (!here) {
    return mlx_attention({q, k, v, mask})[0];
  }
  mx::Shape shape = q.shape();
  shape.back() = v.shape(3);
  return mx::array(shape, mx::float32, std::make_shared<AttentionMasked>(mx::to_stream(s), mlx_attention, scale),
                   {q, k, v, mask});
}

void AttentionMasked::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], mask = inputs[3], y = out.data<float>(),
                    scale = scale_]() { prompt_attention(q, k, v, scale, false, y, &mask); });
}

}  // namespace lmx
