// cblas_sgemm of the BLAS in the process's global symbol scope (OpenBLAS, which lmx loads with
// RTLD_GLOBAL before MLX), or null: then the kernels that need it leave the work to MLX.
#pragma once

#include <dlfcn.h>

namespace lmx {

// cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); row-major 101,
// no transpose 111, transpose 112.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

inline Sgemm global_sgemm() {
  static const Sgemm f = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  return f;
}

}  // namespace lmx
