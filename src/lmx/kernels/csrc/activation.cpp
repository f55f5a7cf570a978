// gelu_tanh_mul of activation.h.
#include "activation.h"

#include <immintrin.h>

#include <cmath>
#include <vector>

#include "cpu_eval.h"
#include "qmatmul.h"
#include "simd_exp.h"
#include "strided.h"

namespace lmx {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr int64_t kChunk = 16384;  // values a task (a thread's share of a 512 x 2048 prompt is 32 tasks)

// x * sigmoid(2 inner): sigmoid from e = exp(-|z|) (never overflows): 1 / (1 + e) for z >= 0, e / (1 + e) else.
inline float gelu_one(float x) {
  const float z = 2.0f * kSqrt2OverPi * (x + kCubic * x * x * x);
  const float a = -std::fabs(z);
  const float e = a < -87.3f ? 0.0f : exp_nonpositive(a);  // past float's range: the limit, exactly 0
  const float s = (z >= 0.0f ? 1.0f : e) / (1.0f + e);
  return x * s;
}

void gelu_mul_scalar(const float* g, const float* u, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_one(g[i]) * u[i];
}

__attribute__((target("avx2"))) void gelu_mul_avx2(const float* g, const float* u, float* y, int64_t n) {
  const __m256 c2 = _mm256_set1_ps(2.0f * kSqrt2OverPi), cubic = _mm256_set1_ps(kCubic);
  const __m256 lo = _mm256_set1_ps(-87.3f), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    // the scalar path's operation order: 2 sqrt(2/pi) * (x + (0.044715 * x * x) * x)
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(cubic, x), x), x);
    const __m256 z = _mm256_mul_ps(c2, _mm256_add_ps(x, x3));
    const __m256 a = _mm256_or_ps(z, sign);  // -|z|
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(a, lo, _CMP_LT_OQ), exp8_nonpositive(a));  // 0 past -87.3
    const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(z, zero, _CMP_GE_OQ));
    const __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_loadu_ps(u + i)));
  }
  gelu_mul_scalar(g + i, u + i, y + i, n - i);
}

void gelu_mul(const float* g, const float* u, float* y, int64_t n) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    gelu_mul_avx2(g, u, y, n);
  } else {
    gelu_mul_scalar(g, u, y, n);
  }
}

}  // namespace

mx::array gelu_tanh_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  auto mlx_ops = [s](const mx::array& g, const mx::array& u) {
    const auto inner = mx::multiply(mx::array(kSqrt2OverPi, g.dtype()),
                                    mx::add(g, mx::multiply(mx::array(kCubic, g.dtype()), mx::power(g, mx::array(3.0f, g.dtype()), s), s), s), s);
    const auto gelu = mx::multiply(mx::multiply(mx::array(0.5f, g.dtype()), g, s),
                                   mx::add(mx::array(1.0f, g.dtype()), mx::tanh(inner, s), s), s);
    return mx::multiply(gelu, u, s);
  };
  if (gate.dtype() != mx::float32 || up.dtype() != mx::float32 || gate.shape() != up.shape()) {
    return mlx_ops(gate, up);
  }
  auto fallback = [mlx_ops](const std::vector<mx::array>& in) { return std::vector<mx::array>{mlx_ops(in[0], in[1])}; };
  return mx::array(gate.shape(), mx::float32, std::make_shared<GeluTanhMul>(mx::to_stream(s), fallback), {gate, up});
}

void GeluTanhMul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& g = inputs[0];
  const auto& u = inputs[1];
  auto& encoder = begin_eval(stream(), inputs, out);
  encoder.dispatch([g, u, y = out.data<float>()]() {
    std::vector<float> tg, tu;
    const float* gp = row_major(g, tg);
    const float* up = row_major(u, tu);
    gelu_tanh_mul_values(gp, up, y, g.size());
  });
}

void gelu_tanh_mul_values(const float* g, const float* u, float* y, int64_t n) {
  run_parallel((n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t start = c * kChunk;
    gelu_mul(g + start, u + start, y + start, std::min(kChunk, n - start));
  });
}

}  // namespace lmx
