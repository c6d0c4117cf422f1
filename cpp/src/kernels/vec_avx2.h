// AVX2 + FMA: 8 floats / 4 doubles per register, 16 registers.
#pragma once

#include "kernels/exp2_poly.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// 3 rows x 4 vectors = 12 accumulators: more than the 8 independent FMA chains that hide the 4-cycle
// latency at two FMAs per cycle, with the 4 loads (the broadcast folds into the FMA) in 16 ymm.
// Measured on Zen 4, 1 thread: 3x4 beat 4x2 by 5-7% and 6x2 / 4x3 by 1-2%.
template <class Scalar>
struct VecAvx2;

template <>
struct VecAvx2<float> {
  using T = float;
  using V = __m256;
  using S = T;  // storage type of the caller's arrays (WithStorage overrides it)
  static constexpr int W = 8;
  static constexpr int kTileRows = 3;
  static constexpr int kTileVecs = 4;
  static constexpr int kRegisters = 16;  // vector registers (the decode loops' budget)

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(T x) { return _mm256_set1_ps(x); }
  static V load(const T* p) { return _mm256_load_ps(p); }
  static V loadu(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, V x) { _mm256_store_ps(p, x); }
  static void storeu(T* p, V x) { _mm256_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V neginf_to_zero(V x) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(-INFINITY), _CMP_EQ_OQ), x);
  }
  static bool all_equal(V a, V b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)) == 0xff; }
  static T reduce_max(V x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  static T reduce_add(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }

  // Lane t = the sum of acc[t]'s lanes, for W accumulators at once: a tree of 7 adds (see VecAvx512).
  static V sum_each(const V* acc) {
    V halves[4];
    for (int i = 0; i < 4; ++i)  // 128-bit lane 0: key 2i, lane 1: key 2i + 1
      halves[i] = _mm256_add_ps(_mm256_permute2f128_ps(acc[2 * i], acc[2 * i + 1], 0x20),
                                _mm256_permute2f128_ps(acc[2 * i], acc[2 * i + 1], 0x31));
    V pairs[2];
    for (int i = 0; i < 2; ++i) {  // lane L, elements 0-1: key 4i + L, elements 2-3: key 4i + 2 + L
      const __m256d a = _mm256_castps_pd(halves[2 * i]), b = _mm256_castps_pd(halves[2 * i + 1]);
      pairs[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    // lane L, element m: key 2m + L; the permute puts key t in lane t
    const V sums = _mm256_add_ps(_mm256_shuffle_ps(pairs[0], pairs[1], 0x88), _mm256_shuffle_ps(pairs[0], pairs[1], 0xdd));
    return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }

  // dst[c * dst_stride + r] = src[r * src_stride + c] for an 8 x 8 block.
  static void transpose(const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
    V r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
      const __m256d lo = _mm256_castps_pd(t[4 * i]), lo2 = _mm256_castps_pd(t[4 * i + 2]);
      const __m256d hi = _mm256_castps_pd(t[4 * i + 1]), hi2 = _mm256_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(lo, lo2));
      r[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(lo, lo2));
      r[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(hi, hi2));
      r[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(hi, hi2));
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(dst + j * dst_stride, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
      _mm256_storeu_ps(dst + (4 + j) * dst_stride, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
    }
  }

  static V exp2(V x) {
    // Clamp to the normal range; min/max take x as the second operand so a NaN passes through.
    const V clamped = _mm256_max_ps(set1(-126.0f), _mm256_min_ps(set1(127.0f), x));
    const V n = _mm256_round_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V p = exp2_reduced<VecAvx2<float>>(_mm256_sub_ps(clamped, n));
    const __m256i biased = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const V result = _mm256_mul_ps(p, _mm256_castsi256_ps(biased));
    // Below 2^-126 (masked scores are -inf) the answer is 0; the ordered compare keeps NaN as NaN.
    return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(-126.0f), _CMP_LT_OQ), result);
  }
};

template <>
struct VecAvx2<double> {
  using T = double;
  using V = __m256d;
  using S = T;  // storage type of the caller's arrays (WithStorage overrides it)
  static constexpr int W = 4;
  static constexpr int kTileRows = 3;
  static constexpr int kTileVecs = 4;
  static constexpr int kRegisters = 16;  // vector registers (the decode loops' budget)

  static V zero() { return _mm256_setzero_pd(); }
  static V set1(T x) { return _mm256_set1_pd(x); }
  static V load(const T* p) { return _mm256_load_pd(p); }
  static V loadu(const T* p) { return _mm256_loadu_pd(p); }
  static void store(T* p, V x) { _mm256_store_pd(p, x); }
  static void storeu(T* p, V x) { _mm256_storeu_pd(p, x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }
  static V min(V a, V b) { return _mm256_min_pd(a, b); }
  static V div(V a, V b) { return _mm256_div_pd(a, b); }
  static V neginf_to_zero(V x) {
    return _mm256_andnot_pd(_mm256_cmp_pd(x, set1(-INFINITY), _CMP_EQ_OQ), x);
  }
  static bool all_equal(V a, V b) { return _mm256_movemask_pd(_mm256_cmp_pd(a, b, _CMP_EQ_OQ)) == 0xf; }
  static T reduce_max(V x) {
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_max_sd(m, _mm_unpackhi_pd(m, m)));
  }
  static T reduce_add(V x) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static V sum_each(const V* acc) {  // lane t = the sum of acc[t]'s lanes (rare in decode: float64)
    alignas(32) T sums[W];
    for (int t = 0; t < W; ++t) sums[t] = reduce_add(acc[t]);
    return load(sums);
  }

  // dst[c * dst_stride + r] = src[r * src_stride + c] for a 4 x 4 block.
  static void transpose(const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
    const V r0 = _mm256_loadu_pd(src), r1 = _mm256_loadu_pd(src + src_stride);
    const V r2 = _mm256_loadu_pd(src + 2 * src_stride), r3 = _mm256_loadu_pd(src + 3 * src_stride);
    const V even01 = _mm256_unpacklo_pd(r0, r1), odd01 = _mm256_unpackhi_pd(r0, r1);  // columns 0/2, 1/3
    const V even23 = _mm256_unpacklo_pd(r2, r3), odd23 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(dst, _mm256_permute2f128_pd(even01, even23, 0x20));
    _mm256_storeu_pd(dst + 2 * dst_stride, _mm256_permute2f128_pd(even01, even23, 0x31));
    _mm256_storeu_pd(dst + dst_stride, _mm256_permute2f128_pd(odd01, odd23, 0x20));
    _mm256_storeu_pd(dst + 3 * dst_stride, _mm256_permute2f128_pd(odd01, odd23, 0x31));
  }

  static V exp2(V x) {
    const V clamped = _mm256_max_pd(set1(-1022.0), _mm256_min_pd(set1(1023.0), x));
    const V n = _mm256_round_pd(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V p = exp2_reduced<VecAvx2<double>>(_mm256_sub_pd(clamped, n));
    // AVX2 has no double -> int64 conversion: go through int32, which holds [-1022, 1023] exactly.
    const __m256i exponent = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
    const __m256i biased = _mm256_slli_epi64(_mm256_add_epi64(exponent, _mm256_set1_epi64x(1023)), 52);
    const V result = _mm256_mul_pd(p, _mm256_castsi256_pd(biased));
    return _mm256_andnot_pd(_mm256_cmp_pd(x, set1(-1022.0), _CMP_LT_OQ), result);
  }
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
