// Row loops shared by the one-op norm and RoPE (layer_ops.cpp) and the fused decode layer
// (decode_layer.cpp): one definition, compiled alike (no FMA contraction, see CMakeLists.txt), so
// the fused layer rounds exactly as the separate ops do.
#pragma once

#include <cmath>
#include <cstdint>

namespace lmx {

// y = x * rsqrt(mean(x^2) + eps) * w over one row of n values (w read every ws floats).
inline void rms_norm_row(const float* x, const float* w, int64_t ws, float eps, int64_t n, float* y) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * inv) * w[i * ws];
}

// The cosines and sines of `len` positions from `offset` (times `scale`), pair i at angle
// position / periods[i * ps]: cosv and sinv hold len x half values.
inline void rope_table(const float* periods, int64_t ps, int64_t half, float scale, int offset, int64_t len,
                       float* cosv, float* sinv) {
  for (int64_t l = 0; l < len; ++l) {
    const float pos = scale * static_cast<float>(offset + l);
    for (int64_t i = 0; i < half; ++i) {
      const float theta = pos * (1.0f / periods[i * ps]);
      cosv[l * half + i] = std::cos(theta);
      sinv[l * half + i] = std::sin(theta);
    }
  }
}

// rope_table() once for each of `tables` tables of len x half values, one after another: table t from
// position at[t * as], or from `offset` where `at` is null (then one table).
inline void rope_tables(const float* periods, int64_t ps, int64_t half, float scale, int offset, const int32_t* at,
                        int64_t as, int64_t tables, int64_t len, float* cosv, float* sinv) {
  for (int64_t t = 0; t < tables; ++t) {
    rope_table(periods, ps, half, scale, at ? at[t * as] : offset, len, cosv + t * len * half, sinv + t * len * half);
  }
}

// One row of d features rotated by one position's table (c, s: half values each; the two halves of
// the first 2 * half features rotate together, the rest are copied). y may be x.
inline void rope_row(const float* x, const float* c, const float* s, int64_t half, int64_t d, float* y) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    y[i] = a * c[i] - b * s[i];
    y[i + half] = a * s[i] + b * c[i];
  }
  for (int64_t i = 2 * half; i < d; ++i) y[i] = x[i];
}

}  // namespace lmx
