// Reading MLX arrays whatever their strides: flat offsets, row-major copies, and 4-D arrays as rows
// (b, h, j, :) with the last axis contiguous. Shared by the kernels' eval_cpu bodies.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace lmx {

namespace mx = mlx::core;

// The element offset of flat (row-major) index i of `a`, whatever its strides.
inline int64_t strided_offset(const mx::array& a, int64_t i) {
  int64_t at = 0;
  for (int d = a.ndim() - 1; d >= 0 && i > 0; --d) {
    at += (i % a.shape(d)) * a.strides()[d];
    i /= a.shape(d);
  }
  return at;
}

// x as row-major float32 values: its own buffer when already row-contiguous, else a copy in `tmp`.
inline const float* row_major(const mx::array& x, std::vector<float>& tmp) {
  if (x.flags().row_contiguous) {
    return x.data<float>();
  }
  tmp.resize(x.size());
  const float* p = x.data<float>();
  for (int64_t i = 0; i < static_cast<int64_t>(x.size()); ++i) {
    tmp[i] = p[strided_offset(x, i)];
  }
  return tmp.data();
}

// A 4-D array's rows (b, h, j, :) of element type T, its last axis contiguous: the array's own memory
// when its last stride is 1 (cache slices are such views), else a row-major copy held in `tmp`.
template <typename T>
struct RowsOf {
  const T* p;
  int64_t s0, s1, s2;
  RowsOf(const mx::array& a, std::vector<T>& tmp) {
    if (a.strides()[3] == 1) {
      p = a.data<T>();
      s0 = a.strides()[0], s1 = a.strides()[1], s2 = a.strides()[2];
    } else {
      tmp.resize(a.size());
      const T* src = a.data<T>();
      for (int64_t i = 0; i < static_cast<int64_t>(a.size()); ++i) tmp[i] = src[strided_offset(a, i)];
      p = tmp.data();
      s2 = a.shape(3), s1 = s2 * a.shape(2), s0 = s1 * a.shape(1);
    }
  }
  const T* at(int64_t b, int64_t h, int64_t j) const {
    return p + b * s0 + h * s1 + j * s2;
  }
};

using Rows4 = RowsOf<float>;

}  // namespace lmx
