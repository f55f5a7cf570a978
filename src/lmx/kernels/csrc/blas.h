// The sgemm lmx's kernels multiply with, or null: then the kernels that need it leave the work to MLX.
// First scipy-openblas32's (an OpenBLAS whose kernel set is picked at run time, AVX-512 where the CPU
// has it; its symbols carry a scipy_ prefix, so it stays out of MLX's way), then the process-global
// cblas_sgemm (the OpenBLAS lmx loads with RTLD_GLOBAL before MLX, for MLX's own products). lmx's
// runtime (lmx/runtime/blas.py) loads both before the kernels are first called.
#pragma once

#include <dlfcn.h>

namespace lmx {

// cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); row-major 101,
// no transpose 111, transpose 112.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

// The symbol global_sgemm() calls ("scipy_cblas_sgemm" or "cblas_sgemm"), or "" where there is none.
inline const char* sgemm_name() {
  static const char* name = dlsym(RTLD_DEFAULT, "scipy_cblas_sgemm") != nullptr ? "scipy_cblas_sgemm"
                            : dlsym(RTLD_DEFAULT, "cblas_sgemm") != nullptr     ? "cblas_sgemm"
                                                                                : "";
  return name;
}

inline Sgemm global_sgemm() {
  static const Sgemm f = *sgemm_name() ? reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, sgemm_name())) : nullptr;
  return f;
}

// The threads that sgemm runs on (1 when its library does not say).
inline int blas_threads() {
  using Get = int (*)();
  static const Get f = reinterpret_cast<Get>(dlsym(
      RTLD_DEFAULT, *sgemm_name() == 's' ? "scipy_openblas_get_num_threads" : "openblas_get_num_threads"));
  return f != nullptr ? f() : 1;
}

}  // namespace lmx
