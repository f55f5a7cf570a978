// Issue 17 part 1 (CPU decode): one-row products of Q8_0 and Q5_0 blocks the way lmx's CPU
// kernels compute them (256-bit: four 8-lane accumulators; each weight decoded exactly, times its
// scale, then an FMA), against 512-bit registers holding two of those lanes each (the same lanes, the
// same order: bit-identical sums) with Q5_0's fifth bit set through a byte mask (AVX-512BW). Not part
// of lmx: the measurement that led to it (benchmarks/RESULTS.md, "CPU: one-scale blocks in 512-bit registers").
//
//     g++ -O3 -ffp-contract=off -o /tmp/cpu_decode_widths benchmarks/cpu_decode_widths.cpp
//     /tmp/cpu_decode_widths 2048     # rows of 640 values (2048: in cache; 65536: from memory)
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <cstdlib>
#include <vector>
#define T256 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,prefer-vector-width=256")))
#define T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq")))
T256 static inline float half_f16c(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
// The kernels' order: (acc0 + acc1) + (acc2 + acc3), then halves.
T256 static inline float hsum4(const __m256* acc) {
  __m256 t = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
T512 static inline float hsum_pairs(__m512 a01, __m512 a23) {  // lanes 0|1 and 2|3 as four 8-lane accumulators
  const __m256 acc[4] = {_mm512_castps512_ps256(a01), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a01), 1)),
                         _mm512_castps512_ps256(a23), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a23), 1))};
  return hsum4(acc);
}
T256 static inline __m256i bits_to_bytes(uint32_t x) {
  const __m256i shuffle = _mm256_setr_epi8(0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,2,2,2,2,2,2,2,2,3,3,3,3,3,3,3,3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuffle);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}
T256 static inline __m256i nibbles_32(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128((const __m128i*)qs);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}
T256 static inline __m256 i8x8_times(__m128i q, __m256 s) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s); }
T256 float q5_ymm(const uint8_t* row, const float* x, int64_t k) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < k; i += 32, row += 22) {
    const __m256 d = _mm256_set1_ps(half_f16c(row));
    uint32_t qh; std::memcpy(&qh, row + 2, 4);
    const __m256i high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nibbles_32(row + 6), high), _mm256_set1_epi8(16));
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    acc[0] = _mm256_fmadd_ps(i8x8_times(lo, d), _mm256_loadu_ps(x + i), acc[0]);
    acc[1] = _mm256_fmadd_ps(i8x8_times(_mm_srli_si128(lo, 8), d), _mm256_loadu_ps(x + i + 8), acc[1]);
    acc[2] = _mm256_fmadd_ps(i8x8_times(hi, d), _mm256_loadu_ps(x + i + 16), acc[2]);
    acc[3] = _mm256_fmadd_ps(i8x8_times(_mm_srli_si128(hi, 8), d), _mm256_loadu_ps(x + i + 24), acc[3]);
  }
  return hsum4(acc);
}
T512 float q5_zmm(const uint8_t* row, const float* x, int64_t k) {
  __m512 a01 = _mm512_setzero_ps(), a23 = _mm512_setzero_ps();
  const __m128i m4 = _mm_set1_epi8(0x0F), b16 = _mm_set1_epi8(0x10), s16 = _mm_set1_epi8(16);
  for (int64_t i = 0; i < k; i += 32, row += 22) {
    const __m512 d = _mm512_set1_ps(half_f16c(row));
    uint32_t qh; std::memcpy(&qh, row + 2, 4);
    const __m128i v = _mm_loadu_si128((const __m128i*)(row + 6));
    __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    lo = _mm_sub_epi8(_mm_mask_add_epi8(lo, (__mmask16)(qh & 0xffff), lo, b16), s16);
    hi = _mm_sub_epi8(_mm_mask_add_epi8(hi, (__mmask16)(qh >> 16), hi, b16), s16);
    a01 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d), _mm512_loadu_ps(x + i), a01);
    a23 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d), _mm512_loadu_ps(x + i + 16), a23);
  }
  return hsum_pairs(a01, a23);
}
T256 float q8_ymm(const uint8_t* row, const float* x, int64_t k) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < k; i += 32, row += 34) {
    const __m256 s = _mm256_set1_ps(half_f16c(row));
    for (int g = 0; g < 4; ++g) {
      __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + 2 + 8 * g)))), s);
      acc[g] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i + 8 * g), acc[g]);
    }
  }
  return hsum4(acc);
}

T512 float q8_zmm(const uint8_t* row, const float* x, int64_t k) {
  __m512 a01 = _mm512_setzero_ps(), a23 = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32, row += 34) {
    const __m512 s = _mm512_set1_ps(half_f16c(row));
    __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + 2)))), s);
    __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + 18)))), s);
    a01 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a01);
    a23 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a23);
  }
  // the same order as dot_ymm: (acc0 + acc1) + (acc2 + acc3), then halves
  return hsum_pairs(a01, a23);
}


template <class F>
double time_rows(F f, const std::vector<uint8_t>& w, int64_t rb, const std::vector<float>& x, std::vector<float>& y) {
  const int64_t n = static_cast<int64_t>(y.size());
  auto t0 = std::chrono::steady_clock::now();
  for (int it = 0; it < 10; ++it)
    for (int64_t r = 0; r < n; ++r) y[r] = f(&w[r * rb], x.data(), 640);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 10;
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 2048, k = 640;
  std::mt19937 rng(1);
  std::vector<float> x(k), y1(n), y2(n);
  for (auto& v : x) v = (rng() % 2001 - 1000) / 1000.0f;
  for (int64_t bytes : {34, 22}) {  // Q8_0, Q5_0
    const int64_t rb = k / 32 * bytes;
    std::vector<uint8_t> w(n * rb);
    for (auto& b : w) b = rng() & 0xff;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t b = 0; b < k / 32; ++b) {
        uint16_t h = 0x2000 + (rng() & 0x3ff);  // a finite half scale
        std::memcpy(&w[r * rb + b * bytes], &h, 2);
      }
    for (int rep = 0; rep < 5; ++rep) {
      double a = bytes == 34 ? time_rows(q8_ymm, w, rb, x, y1) : time_rows(q5_ymm, w, rb, x, y1);
      double b = bytes == 34 ? time_rows(q8_zmm, w, rb, x, y2) : time_rows(q5_zmm, w, rb, x, y2);
      std::printf("%s %lld rows: 256-bit %.3f ms  512-bit %.3f ms  same bits %d\n", bytes == 34 ? "Q8_0" : "Q5_0",
                  static_cast<long long>(n), a, b, static_cast<int>(std::memcmp(y1.data(), y2.data(), n * 4) == 0));
    }
  }
}
