// The sgemm lmx's kernels multiply with, or null: then the kernels that need it leave the work to MLX.
// First scipy-openblas32's (an OpenBLAS whose kernel set is picked at run time, AVX-512 where the CPU
// has it), which lmx's runtime (lmx/runtime/blas.py) loads with RTLD_LOCAL, so that its unprefixed
// LAPACK helpers never stand in for MLX's; found here by its soname. Else the process-global
// cblas_sgemm (the OpenBLAS lmx loads with RTLD_GLOBAL before MLX, for MLX's own products).
#pragma once

#include <dlfcn.h>

namespace lmx {

// cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); row-major 101,
// no transpose 111, transpose 112.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

// scipy-openblas32 if lmx's runtime loaded it (RTLD_NOLOAD: never loads it here), else null.
inline void* kernels_blas() {
  static void* const handle = dlopen("libscipy_openblas.so", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  return handle;
}

// The symbol global_sgemm() calls ("scipy_cblas_sgemm" or "cblas_sgemm"), or "" where there is none.
inline const char* sgemm_name() {
  static const char* const name = kernels_blas() != nullptr && dlsym(kernels_blas(), "scipy_cblas_sgemm") != nullptr
                                      ? "scipy_cblas_sgemm"
                                  : dlsym(RTLD_DEFAULT, "cblas_sgemm") != nullptr ? "cblas_sgemm"
                                                                                  : "";
  return name;
}

// The library and name of a symbol of the BLAS global_sgemm() comes from.
inline void* blas_symbol(const char* scipy_name, const char* plain_name) {
  return *sgemm_name() == 's' ? dlsym(kernels_blas(), scipy_name) : dlsym(RTLD_DEFAULT, plain_name);
}

inline Sgemm global_sgemm() {
  static const Sgemm f = *sgemm_name() ? reinterpret_cast<Sgemm>(blas_symbol("scipy_cblas_sgemm", "cblas_sgemm")) : nullptr;
  return f;
}

// The threads that sgemm runs on (1 when its library does not say).
inline int blas_threads() {
  using Get = int (*)();
  static const Get f =
      reinterpret_cast<Get>(blas_symbol("scipy_openblas_get_num_threads", "openblas_get_num_threads"));
  return f != nullptr ? f() : 1;
}

}  // namespace lmx
