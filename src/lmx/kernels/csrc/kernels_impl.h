// The kernels' portable body, included three times by qmatmul.cpp: as namespace lmx::generic; as
// lmx::avx2 under `#pragma GCC target("avx2,fma,f16c")` (with hand-written AVX2 decoders, FMA dots); and
// as lmx::avx512, the same 256-bit code with AVX-512VL's 32 vector registers (more rows of x per pass)
// and, for the one-scale blocks' products, 512-bit registers (LMX_IMPL_ZMM; the same sums).
// Block layouts and the float operation order of every decoder follow ggml's dequantize_row_*
// (ggml-quants.c), so a decoded weight is bit-identical to gguf-py's numpy dequantize.
// No include guard on purpose. Needs LMX_IMPL_NS, LMX_IMPL_AVX2, LMX_IMPL_ZMM, LMX_IMPL_ROWS_PER_PASS, Gemv, kMaxK and
// the GgmlType ids.

namespace lmx::LMX_IMPL_NS {

#define LMX_INLINE inline __attribute__((always_inline))

// IEEE half -> float, exactly (normals, subnormals, inf, nan).
LMX_INLINE float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    float f = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24, exact
    return sign ? -f : f;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---- block decoders: one block of bytes -> its float32 values ----

LMX_INLINE void decode_q8_0(const uint8_t* b, float* y) {  // d f16, qs[32] int8
  const float d = half_to_float(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) {
    y[i] = static_cast<float>(q[i]) * d;
  }
}

LMX_INLINE void decode_q4_0(const uint8_t* b, float* y) {  // d f16, qs[16]
  const float d = half_to_float(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

LMX_INLINE void decode_q5_0(const uint8_t* b, float* y) {  // d f16, qh u32, qs[16]
  const float d = half_to_float(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int xh0 = ((qh >> j) << 4) & 0x10;
    const int xh1 = (qh >> (j + 12)) & 0x10;
    y[j] = static_cast<float>(((qs[j] & 0x0F) | xh0) - 16) * d;
    y[j + 16] = static_cast<float>(((qs[j] >> 4) | xh1) - 16) * d;
  }
}

LMX_INLINE void scale_min_k4(int j, const uint8_t* q, int* d, int* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

LMX_INLINE void decode_q4_k(const uint8_t* b, float* y) {  // d f16, dmin f16, scales[12], qs[128]
  const float d = half_to_float(b);
  const float dmin = half_to_float(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32, y += 64) {
    int sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) {
      y[l] = d1 * static_cast<float>(q[l] & 0xF) - m1;
      y[l + 32] = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

LMX_INLINE void decode_q6_k(const uint8_t* b, float* y) {  // ql[128], qh[64], scales[16] int8, d f16
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_to_float(b + 208);
  for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

#if LMX_IMPL_AVX2
// AVX2 decoders: the same values as the portable ones above (one multiply per weight, or a multiply
// then a subtract for Q4_K, never fused), 8 at a time. Each decoder hands every group of 8 weights to
// a sink: RowStore writes them to a row buffer, RowDot multiplies them straight into a dot product with
// x (decode: the weights never leave registers). `at` is the group's first index in the row, and
// `lane` = (at / 8) % 4, a constant at every call once inlined.

// The half scale, converted by the F16C instruction (exact for every finite half).
LMX_INLINE float half_f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

LMX_INLINE float hsum4(const __m256 (&acc)[4]) {
  __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

struct RowStore {
  float* y;
  LMX_INLINE void put(int64_t at, int, __m256 w) {
    _mm256_storeu_ps(y + at, w);
  }
};

// w . x with the four accumulators of dot() below, lane for lane: the sum is dot(decoded row, x), bit for bit.
struct RowDot {
  const float* x;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  LMX_INLINE void put(int64_t at, int lane, __m256 w) {
    acc[lane] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + at), acc[lane]);
  }
  LMX_INLINE float sum() const {
    return hsum4(acc);
  }
};

// The same sink for M rows of x at once (x + i * stride, i < M): each group of 8 decoded weights is
// multiplied into all M dot products while it sits in a register, so a W row is decoded once per M rows
// of x instead of once per row (or stored and read back M times). Row i's four accumulators see exactly
// the products RowDot's would, in the same order: sum(i) is RowDot's sum for that row, bit for bit.
template <int M>
struct RowsDot {
  const float* x;
  int64_t stride;
  __m256 acc[M][4];
  LMX_INLINE RowsDot(const float* x_, int64_t stride_) : x(x_), stride(stride_) {
    for (int i = 0; i < M; ++i) {
      for (int l = 0; l < 4; ++l) acc[i][l] = _mm256_setzero_ps();
    }
  }
  LMX_INLINE void put(int64_t at, int lane, __m256 w) {
    for (int i = 0; i < M; ++i) {
      acc[i][lane] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * stride + at), acc[i][lane]);
    }
  }
  LMX_INLINE float sum(int i) const {
    return hsum4(acc[i]);
  }
};

LMX_INLINE __m256 i8x8_times(__m128i q, __m256 s) {  // the low 8 int8 of q, as floats, times s
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s);
}

// 32 int8 quants at values [at, at + 32): float(q) * s0 for the first 16, * s1 for the last 16.
template <class Out>
LMX_INLINE void emit_i8x32(__m256i q, __m256 s0, __m256 s1, int64_t at, Out& out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  out.put(at, 0, i8x8_times(lo, s0));
  out.put(at + 8, 1, i8x8_times(_mm_srli_si128(lo, 8), s0));
  out.put(at + 16, 2, i8x8_times(hi, s1));
  out.put(at + 24, 3, i8x8_times(_mm_srli_si128(hi, 8), s1));
}

// The same for 32 int8 quants read from memory (Q8_0), all times s.
template <class Out>
LMX_INLINE void emit_i8x32_mem(const uint8_t* q, __m256 s, int64_t at, Out& out) {
  for (int g = 0; g < 4; ++g) {
    out.put(at + 8 * g, g, i8x8_times(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * g)), s));
  }
}

// 32 values 0..15 (uint8) at [at, at + 32): d * q - m.
template <class Out>
LMX_INLINE void emit_u4x32_affine(__m256i q, __m256 d, __m256 m, int64_t at, Out& out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int g = 0; g < 4; ++g) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[g]));
    out.put(at + 8 * g, g, _mm256_sub_ps(_mm256_mul_ps(d, f), m));
  }
}

// Byte i of the result is 0xFF where bit i of x is set, else 0.
LMX_INLINE __m256i bits_to_bytes(uint32_t x) {
  const __m256i shuffle = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                           3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), shuffle);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

// The 16 bytes at qs as 32 nibbles: the low nibbles first, then the high ones (ggml's order).
LMX_INLINE __m256i nibbles_32(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}

template <class Out>
LMX_INLINE void block_q8_0(const uint8_t* b, int64_t at, Out& out) {  // d f16, qs[32] int8
  emit_i8x32_mem(b + 2, _mm256_set1_ps(half_f16c(b)), at, out);
}

template <class Out>
LMX_INLINE void block_q4_0(const uint8_t* b, int64_t at, Out& out) {  // d f16, qs[16]
  const __m256 d = _mm256_set1_ps(half_f16c(b));
  emit_i8x32(_mm256_sub_epi8(nibbles_32(b + 2), _mm256_set1_epi8(8)), d, d, at, out);
}

template <class Out>
LMX_INLINE void block_q5_0(const uint8_t* b, int64_t at, Out& out) {  // d f16, qh u32, qs[16]
  const __m256 d = _mm256_set1_ps(half_f16c(b));
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const __m256i high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
  emit_i8x32(_mm256_sub_epi8(_mm256_or_si256(nibbles_32(b + 6), high), _mm256_set1_epi8(16)), d, d, at, out);
}

template <class Out>
LMX_INLINE void block_q4_k(const uint8_t* b, int64_t at, Out& out) {  // d f16, dmin f16, scales[12], qs[128]
  const float d = half_f16c(b);
  const float dmin = half_f16c(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    int sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    emit_u4x32_affine(_mm256_and_si256(v, m4), _mm256_set1_ps(d1), _mm256_set1_ps(m1), at + j, out);
    emit_u4x32_affine(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), _mm256_set1_ps(d2), _mm256_set1_ps(m2),
                      at + j + 32, out);
  }
}

template <class Out>
LMX_INLINE void block_q6_k(const uint8_t* b, int64_t at, Out& out) {  // ql[128], qh[64], scales[16] int8, d f16
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_f16c(b + 208);
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi8(32);
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    // 16-bit shifts: the 0x30 mask keeps only bits that stayed inside their byte
    const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2));
    const __m256i q2 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2));
    const __m256i q3 =
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m2));
    const __m256i q4 = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(h, 2), m2));
    __m256 s[8];
    for (int i = 0; i < 8; ++i) s[i] = _mm256_set1_ps(d * static_cast<float>(sc[i]));
    emit_i8x32(_mm256_sub_epi8(q1, bias), s[0], s[1], at + n, out);
    emit_i8x32(_mm256_sub_epi8(q2, bias), s[2], s[3], at + n + 32, out);
    emit_i8x32(_mm256_sub_epi8(q3, bias), s[4], s[5], at + n + 64, out);
    emit_i8x32(_mm256_sub_epi8(q4, bias), s[6], s[7], at + n + 96, out);
  }
}

// A row of blocks, every group of 8 weights to `out`.
template <int T, class Out>
LMX_INLINE void decode_row_to(const uint8_t* row, int64_t k, Out& out) {
  if constexpr (T == Q8_0) {
    for (int64_t i = 0; i < k; i += 32, row += 34) block_q8_0(row, i, out);
  } else if constexpr (T == Q4_0) {
    for (int64_t i = 0; i < k; i += 32, row += 18) block_q4_0(row, i, out);
  } else if constexpr (T == Q5_0) {
    for (int64_t i = 0; i < k; i += 32, row += 22) block_q5_0(row, i, out);
  } else if constexpr (T == Q4_K) {
    for (int64_t i = 0; i < k; i += 256, row += 144) block_q4_k(row, i, out);
  } else {
    static_assert(T == Q6_K);
    for (int64_t i = 0; i < k; i += 256, row += 210) block_q6_k(row, i, out);
  }
}

template <int T>
LMX_INLINE void decode_row(const uint8_t* row, int64_t k, float* y) {
  RowStore out{y};
  decode_row_to<T>(row, k, out);
}

#if LMX_IMPL_ZMM
// The avx512 copy's one-scale blocks (Q8_0, Q5_0, Q4_0) in 512-bit registers: each holds two of RowDot's
// 8-lane accumulators (lanes 0|1, then 2|3) and one instruction decodes, scales or multiplies 16 weights.
// Every lane gets the same products in the same order as RowDot's, so the sums are the same bits (tests
// compare this copy with the AVX2 one); about half the instructions a block (benchmarks/cpu_decode_widths.cpp).
LMX_INLINE __m256 high_half(__m512 a) {  // lanes 8-15
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
}

LMX_INLINE float hsum_pairs(__m512 a01, __m512 a23) {  // hsum4 of the four 8-lane accumulators
  const __m256 acc[4] = {_mm512_castps512_ps256(a01), high_half(a01), _mm512_castps512_ps256(a23), high_half(a23)};
  return hsum4(acc);
}

struct RowDot16 {  // RowDot's sums, 16 weights a step
  const float* x;
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  LMX_INLINE void put16(int64_t at, int pair, __m512 w) {
    acc[pair] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + at), acc[pair]);
  }
  LMX_INLINE float sum() const {
    return hsum_pairs(acc[0], acc[1]);
  }
};

template <int M>
struct RowsDot16 {  // RowsDot<M>'s sums, 16 weights a step
  const float* x;
  int64_t stride;
  __m512 acc[M][2];
  LMX_INLINE RowsDot16(const float* x_, int64_t stride_) : x(x_), stride(stride_) {
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  }
  LMX_INLINE void put16(int64_t at, int pair, __m512 w) {
    for (int i = 0; i < M; ++i) {
      acc[i][pair] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * stride + at), acc[i][pair]);
    }
  }
  LMX_INLINE float sum(int i) const {
    return hsum_pairs(acc[i][0], acc[i][1]);
  }
};

LMX_INLINE __m512 i8x16_times(__m128i q, __m512 s) {  // 16 int8 as floats, times s (as i8x8_times)
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s);
}

// A one-scale block's 32 values as two halves of 16 int8 (low half: values 0-15).
template <int T>
LMX_INLINE void halves_16(const uint8_t* b, __m128i& lo, __m128i& hi) {
  if constexpr (T == Q8_0) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
  } else {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (T == Q5_0 ? 6 : 2)));
    lo = _mm_and_si128(v, m4);  // ggml's order: the low nibbles are values 0-15, the high ones 16-31
    hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    if constexpr (T == Q5_0) {  // bit j of qh is value j's fifth bit
      uint32_t qh;
      std::memcpy(&qh, b + 2, 4);
      const __m128i bit = _mm_set1_epi8(0x10), bias = _mm_set1_epi8(16);
      lo = _mm_sub_epi8(_mm_mask_add_epi8(lo, static_cast<__mmask16>(qh & 0xFFFF), lo, bit), bias);
      hi = _mm_sub_epi8(_mm_mask_add_epi8(hi, static_cast<__mmask16>(qh >> 16), hi, bit), bias);
    } else {
      lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
      hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
    }
  }
}

template <int T>
constexpr bool kOneScale = T == Q8_0 || T == Q5_0 || T == Q4_0;

// A row of one-scale blocks, 16 weights at a time to `out` (RowDot16 or RowsDot16).
template <int T, class Out>
LMX_INLINE void decode_row_to16(const uint8_t* row, int64_t k, Out& out) {
  static_assert(kOneScale<T>);
  constexpr int64_t bytes = T == Q8_0 ? 34 : T == Q5_0 ? 22 : 18;
  for (int64_t i = 0; i < k; i += 32, row += bytes) {
    __m128i lo, hi;
    halves_16<T>(row, lo, hi);
    const __m512 d = _mm512_set1_ps(half_f16c(row));
    out.put16(i, 0, i8x16_times(lo, d));
    out.put16(i + 16, 1, i8x16_times(hi, d));
  }
}
#endif

// ---- int8 activations (opt-in, llama.cpp's arithmetic): x quantized per block of 32 values ----

// x[0..k) -> int8 q (round to nearest) with one float scale per 32 values (|x| max / 127) and the
// blocks' sums of q (for Q4_K's minimums).
LMX_INLINE void quantize_x(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + 32 * b;
    __m256 amax = _mm256_setzero_ps();
    for (int g = 0; g < 4; ++g) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * g)));
    alignas(32) float m[8];
    _mm256_store_ps(m, amax);
    float top = 0.0f;
    for (float v : m) top = v > top ? v : top;
    const float d = top / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    scale[b] = d;
    int32_t total = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * id));
      q[32 * b + i] = static_cast<int8_t>(v);
      total += v;
    }
    sum[b] = total;
  }
}

// Sum over 8 int32 lanes of a * b (32 signed int8 pairs), via the unsigned x signed maddubs.
LMX_INLINE __m256i dot_i8x32(__m256i a, __m256i b) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

struct XQ {  // a quantized row of x
  const int8_t* q;
  const float* scale;
  const int32_t* sum;
};

// One W row against M quantized rows of x: each block of W is unpacked to int8 once and multiplied into
// all M rows, row i's arithmetic exactly that of M = 1 (one accumulator per row, the same order).
template <int T, int M>
LMX_INLINE void dot_rows_int8(const uint8_t* row, const XQ* x, int64_t k, float* out) {
  __m256 acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  if constexpr (T == Q8_0 || T == Q5_0 || T == Q4_0) {
    constexpr int64_t bytes = T == Q8_0 ? 34 : T == Q5_0 ? 22 : 18;
    for (int64_t b = 0; b < k / 32; ++b, row += bytes) {
      __m256i qw;
      if constexpr (T == Q8_0) {
        qw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2));
      } else if constexpr (T == Q5_0) {
        uint32_t qh;
        std::memcpy(&qh, row + 2, 4);
        const __m256i high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
        qw = _mm256_sub_epi8(_mm256_or_si256(nibbles_32(row + 6), high), _mm256_set1_epi8(16));
      } else {
        qw = _mm256_sub_epi8(nibbles_32(row + 2), _mm256_set1_epi8(8));
      }
      const float dw = half_f16c(row);
      for (int i = 0; i < M; ++i) {
        const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].q + 32 * b));
        const __m256 s = _mm256_set1_ps(dw * x[i].scale[b]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8x32(qw, qx)), s, acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) out[i] = hsum4({acc[i], zero, zero, zero});
  } else if constexpr (T == Q4_K) {
    float mins[M];
    for (int i = 0; i < M; ++i) mins[i] = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t i0 = 0; i0 < k; i0 += 256, row += 144) {
      const float d = half_f16c(row), dmin = half_f16c(row + 2);
      const uint8_t* q = row + 16;
      for (int j = 0; j < 4; ++j, q += 32) {
        const int64_t b = (i0 + 64 * j) / 32;  // x block of the low nibbles; b + 1: the high ones
        int sc1, m1, sc2, m2;
        scale_min_k4(2 * j, row + 4, &sc1, &m1);
        scale_min_k4(2 * j + 1, row + 4, &sc2, &m2);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int i = 0; i < M; ++i) {
          const XQ& xi = x[i];
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi.q + 32 * b));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi.q + 32 * b + 32));
          const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones);  // lo is unsigned
          const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones);
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d * sc1 * xi.scale[b]), acc[i]);
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d * sc2 * xi.scale[b + 1]), acc[i]);
          mins[i] += dmin * m1 * xi.scale[b] * xi.sum[b] + dmin * m2 * xi.scale[b + 1] * xi.sum[b + 1];
        }
      }
    }
    for (int i = 0; i < M; ++i) out[i] = hsum4({acc[i], zero, zero, zero}) - mins[i];
  } else {
    static_assert(T == Q6_K);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi8(32);
    for (int64_t i0 = 0; i0 < k; i0 += 256, row += 210) {
      const uint8_t* ql = row;
      const uint8_t* qh = row + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(row + 192);
      const float d = half_f16c(row + 208);
      for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2)),
            _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(h, 2), m2))};
        for (int g = 0; g < 4; ++g) {
          const int64_t b = (i0 + n + 32 * g) / 32;
          const __m256i qw = _mm256_sub_epi8(q[g], bias);
          const __m256i aw = _mm256_sign_epi8(qw, qw);
          // 16-bit lanes 0-7 hold values 0-15 (scale sc[2g]), lanes 8-15 values 16-31 (sc[2g + 1])
          const __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[2 * g + 1]), _mm_set1_epi16(sc[2 * g]));
          for (int i = 0; i < M; ++i) {
            const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].q + 32 * b));
            const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, qw));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, scales)),
                                     _mm256_set1_ps(d * x[i].scale[b]), acc[i]);
          }
        }
      }
    }
    for (int i = 0; i < M; ++i) out[i] = hsum4({acc[i], zero, zero, zero});
  }
}
#else
template <int T>
LMX_INLINE void decode_row(const uint8_t* row, int64_t k, float* y) {
  if constexpr (T == Q8_0) {
    for (int64_t i = 0; i < k; i += 32, row += 34) decode_q8_0(row, y + i);
  } else if constexpr (T == Q4_0) {
    for (int64_t i = 0; i < k; i += 32, row += 18) decode_q4_0(row, y + i);
  } else if constexpr (T == Q5_0) {
    for (int64_t i = 0; i < k; i += 32, row += 22) decode_q5_0(row, y + i);
  } else if constexpr (T == Q4_K) {
    for (int64_t i = 0; i < k; i += 256, row += 144) decode_q4_k(row, y + i);
  } else {
    static_assert(T == Q6_K);
    for (int64_t i = 0; i < k; i += 256, row += 210) decode_q6_k(row, y + i);
  }
}
#endif

// ---- dot products (k is a multiple of 32) ----

#if LMX_IMPL_AVX2
LMX_INLINE float dot(const float* a, const float* b, int64_t k) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < k; i += 32) {
    for (int g = 0; g < 4; ++g) {
      acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * g), _mm256_loadu_ps(b + i + 8 * g), acc[g]);
    }
  }
  return hsum4(acc);
}
#else
LMX_INLINE float dot(const float* a, const float* b, int64_t k) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < k; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
#endif

// ---- row-range workers: rows [r0, r1) of W against m rows of x ----


#if LMX_IMPL_AVX2
// W row r against rows [i0, i0 + M) of x: the row decoded once into M dot products.
template <int T, int M>
LMX_INLINE void gemv_row_m(const Gemv& g, int64_t i0, int64_t r) {
#if LMX_IMPL_ZMM
  if constexpr (kOneScale<T>) {
    RowsDot16<M> out(g.x + i0 * g.k, g.k);
    decode_row_to16<T>(g.w + r * g.row_bytes, g.k, out);
    for (int i = 0; i < M; ++i) g.y[(i0 + i) * g.n + r] = out.sum(i);
    return;
  }
#endif
  RowsDot<M> out(g.x + i0 * g.k, g.k);
  decode_row_to<T>(g.w + r * g.row_bytes, g.k, out);
  for (int i = 0; i < M; ++i) g.y[(i0 + i) * g.n + r] = out.sum(i);
}

// Rows of x per decode of a W row (LMX_IMPL_ROWS_PER_PASS, set by qmatmul.cpp per copy). M x 4
// accumulators, a weight and an x vector: 4 rows spill a little from AVX2's 16 vector registers yet
// measured as fast as 2 + 2; with AVX-512VL's 32 (the avx512 copy) all 8 rows go in one pass, 1.1-1.45x
// faster than 4 + 4 on a Zen 4 (benchmarks/cpu_kernels_rows.py, RESULTS.md "CPU products of 2-8 rows").
constexpr int kRowsPerPass = LMX_IMPL_ROWS_PER_PASS;
#endif

// Ask memory for W row r + ahead (within the rows [.., r1) of this task): where the hardware's
// prefetchers stop at each 4 KiB page, a streamed matrix (the head) otherwise waits on every row.
LMX_INLINE void prefetch_row(const uint8_t* w, int64_t row_bytes, int64_t r, int64_t r1, int64_t ahead) {
  if (ahead > 0 && r + ahead < r1) {
    const uint8_t* p = w + (r + ahead) * row_bytes;
    for (int64_t at = 0; at < row_bytes; at += 64) __builtin_prefetch(p + at, 0, 3);
  }
}
LMX_INLINE void prefetch_row(const Gemv& g, int64_t r, int64_t r1) {
  prefetch_row(g.w, g.row_bytes, r, r1, g.prefetch);
}

template <int T>
LMX_INLINE void gemv_rows(const Gemv& g, int64_t r0, int64_t r1) {
#if LMX_IMPL_AVX2
  if (g.m == 1) {  // decode: no row buffer
#if LMX_IMPL_ZMM
    if constexpr (kOneScale<T>) {
      for (int64_t r = r0; r < r1; ++r) {
        prefetch_row(g, r, r1);
        RowDot16 out{g.x};
        decode_row_to16<T>(g.w + r * g.row_bytes, g.k, out);
        g.y[r] = out.sum();
      }
      return;
    }
#endif
    for (int64_t r = r0; r < r1; ++r) {
      prefetch_row(g, r, r1);
      RowDot out{g.x};
      decode_row_to<T>(g.w + r * g.row_bytes, g.k, out);
      g.y[r] = out.sum();
    }
    return;
  }
  // m rows of x: each W row decoded once per kRowsPerPass rows of x (while it is still in L1), the
  // rows split as evenly as possible (8 = 4 + 4, 5 = 3 + 2 with 4 per pass).
  const int64_t passes = (g.m + kRowsPerPass - 1) / kRowsPerPass;
  int64_t split[kGemvMaxRows];
  for (int64_t p = 0, i0 = 0; p < passes; ++p) {
    split[p] = (g.m - i0) / (passes - p);
    i0 += split[p];
  }
  for (int64_t r = r0; r < r1; ++r) {
    prefetch_row(g, r, r1);
    for (int64_t p = 0, i0 = 0; p < passes; i0 += split[p], ++p) {
      switch (split[p]) {
        case 1: gemv_row_m<T, 1>(g, i0, r); break;
        case 2: gemv_row_m<T, 2>(g, i0, r); break;
        case 3: gemv_row_m<T, 3>(g, i0, r); break;
        case 4: gemv_row_m<T, 4>(g, i0, r); break;
        case 5: if constexpr (kRowsPerPass >= 5) gemv_row_m<T, 5>(g, i0, r); break;
        case 6: if constexpr (kRowsPerPass >= 6) gemv_row_m<T, 6>(g, i0, r); break;
        case 7: if constexpr (kRowsPerPass >= 7) gemv_row_m<T, 7>(g, i0, r); break;
        default: if constexpr (kRowsPerPass >= 8) gemv_row_m<T, 8>(g, i0, r); break;
      }
    }
  }
#else
  alignas(64) float buf[kMaxK];
  for (int64_t r = r0; r < r1; ++r) {
    decode_row<T>(g.w + r * g.row_bytes, g.k, buf);
    for (int64_t i = 0; i < g.m; ++i) {
      g.y[i * g.n + r] = dot(buf, g.x + i * g.k, g.k);
    }
  }
#endif
}

#if LMX_IMPL_AVX2
// Rows [r0, r1) of W against the m <= 8 quantized rows of x (int8 activations), each W row unpacked once.
template <int T>
LMX_INLINE void gemv_rows_int8(const Gemv& g, const int8_t* xq, const float* xs, const int32_t* xsum, int64_t r0,
                               int64_t r1) {
  const int64_t nb = g.k / 32;
  XQ x[kGemvMaxRows];
  for (int64_t i = 0; i < g.m; ++i) x[i] = XQ{xq + i * g.k, xs + i * nb, xsum + i * nb};
  float out[kGemvMaxRows];
  for (int64_t r = r0; r < r1; ++r) {
    prefetch_row(g, r, r1);
    const uint8_t* row = g.w + r * g.row_bytes;
    switch (g.m) {  // one accumulator per row of x: all 8 fit the 16 registers
      case 1: dot_rows_int8<T, 1>(row, x, g.k, out); break;
      case 2: dot_rows_int8<T, 2>(row, x, g.k, out); break;
      case 3: dot_rows_int8<T, 3>(row, x, g.k, out); break;
      case 4: dot_rows_int8<T, 4>(row, x, g.k, out); break;
      case 5: dot_rows_int8<T, 5>(row, x, g.k, out); break;
      case 6: dot_rows_int8<T, 6>(row, x, g.k, out); break;
      case 7: dot_rows_int8<T, 7>(row, x, g.k, out); break;
      default: dot_rows_int8<T, 8>(row, x, g.k, out); break;
    }
    for (int64_t i = 0; i < g.m; ++i) g.y[i * g.n + r] = out[i];
  }
}

[[maybe_unused]] void gemv_int8(int type, const Gemv& g, const int8_t* xq, const float* xs, const int32_t* xsum, int64_t r0,
               int64_t r1) {
  switch (type) {
    case Q8_0: return gemv_rows_int8<Q8_0>(g, xq, xs, xsum, r0, r1);
    case Q4_0: return gemv_rows_int8<Q4_0>(g, xq, xs, xsum, r0, r1);
    case Q5_0: return gemv_rows_int8<Q5_0>(g, xq, xs, xsum, r0, r1);
    case Q4_K: return gemv_rows_int8<Q4_K>(g, xq, xs, xsum, r0, r1);
    case Q6_K: return gemv_rows_int8<Q6_K>(g, xq, xs, xsum, r0, r1);
  }
}

[[maybe_unused]] void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t i = 0; i < m; ++i) quantize_x(x + i * k, k, q + i * k, scale + i * (k / 32), sum + i * (k / 32));
}
#endif

void gemv(int type, const Gemv& g, int64_t r0, int64_t r1) {
  switch (type) {
    case Q8_0: return gemv_rows<Q8_0>(g, r0, r1);
    case Q4_0: return gemv_rows<Q4_0>(g, r0, r1);
    case Q5_0: return gemv_rows<Q5_0>(g, r0, r1);
    case Q4_K: return gemv_rows<Q4_K>(g, r0, r1);
    case Q6_K: return gemv_rows<Q6_K>(g, r0, r1);
  }
}

template <int T>
LMX_INLINE void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t k, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) decode_row<T>(w + r * row_bytes, k, y + r * k);
}

[[maybe_unused]] void dequantize(int type, const uint8_t* w, int64_t rb, int64_t k, float* y, int64_t r0, int64_t r1) {
  switch (type) {
    case Q8_0: return dequant_rows<Q8_0>(w, rb, k, y, r0, r1);
    case Q4_0: return dequant_rows<Q4_0>(w, rb, k, y, r0, r1);
    case Q5_0: return dequant_rows<Q5_0>(w, rb, k, y, r0, r1);
    case Q4_K: return dequant_rows<Q4_K>(w, rb, k, y, r0, r1);
    case Q6_K: return dequant_rows<Q6_K>(w, rb, k, y, r0, r1);
  }
}

#undef LMX_INLINE

}  // namespace lmx::LMX_IMPL_NS
