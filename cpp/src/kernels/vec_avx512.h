// AVX-512F: 16 floats / 8 doubles per register, 32 registers.
#pragma once

#include "kernels/exp2_poly.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// 4 rows x 4 vectors = 16 accumulators: enough chains for two 512-bit FMA pipes (Intel) and for Zen 4's
// double-pumped one, with 16 of the 32 registers left over for the 4 loads and a broadcast.
template <class Scalar>
struct VecAvx512;

template <>
struct VecAvx512<float> {
  using T = float;
  using V = __m512;
  using S = T;  // storage type of the caller's arrays (WithStorage overrides it)
  static constexpr int W = 16;
  static constexpr int kTileRows = 4;
  static constexpr int kTileVecs = 4;
  static constexpr int kRegisters = 32;  // vector registers (the decode loops' budget)

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(T x) { return _mm512_set1_ps(x); }
  static V load(const T* p) { return _mm512_load_ps(p); }
  static V loadu(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, V x) { _mm512_store_ps(p, x); }
  static void storeu(T* p, V x) { _mm512_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V neginf_to_zero(V x) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, set1(-INFINITY), _CMP_EQ_OQ), x, zero());
  }
  static bool all_equal(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ) == 0xffff; }
  static T reduce_max(V x) { return _mm512_reduce_max_ps(x); }
  static T reduce_add(V x) { return _mm512_reduce_add_ps(x); }

  // Lane t = the sum of acc[t]'s lanes, for W accumulators at once: a tree of 15 adds (halves of pairs,
  // then quarters, then within 128-bit lanes) where 16 reduce_adds take 64 dependent shuffle-adds. The
  // decode layout's scores are such sums, one per key.
  static V sum_each(const V* acc) {
    V halves[8], quarters[4];
    for (int i = 0; i < 8; ++i)  // 128-bit lanes 0-1: key 2i, 2-3: key 2i + 1
      halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x44),
                                _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xee));
    for (int i = 0; i < 4; ++i)  // 128-bit lane L: key 4i + L
      quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                  _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xdd));
    V pairs[2];
    for (int i = 0; i < 2; ++i) {  // lane L, elements 0-1: key 8i + L, elements 2-3: key 8i + 4 + L
      const __m512d a = _mm512_castps_pd(quarters[2 * i]), b = _mm512_castps_pd(quarters[2 * i + 1]);
      pairs[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // lane L, element m: key 4m + L; the permute puts key t in lane t
    const V sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], 0x88), _mm512_shuffle_ps(pairs[0], pairs[1], 0xdd));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
  }

  // dst[c * dst_stride + r] = src[r * src_stride + c] for a 16 x 16 block: pairs of rows interleaved, then
  // pairs of pairs, then 128-bit lanes gathered across the four row groups.
  static void transpose(const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
    V r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
      const __m512d lo = _mm512_castps_pd(t[4 * i]), lo2 = _mm512_castps_pd(t[4 * i + 2]);
      const __m512d hi = _mm512_castps_pd(t[4 * i + 1]), hi2 = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, lo2));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, lo2));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi, hi2));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi, hi2));
    }
    for (int j = 0; j < 4; ++j) {
      const V even01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), odd01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
      const V even23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), odd23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
      _mm512_storeu_ps(dst + j * dst_stride, _mm512_shuffle_f32x4(even01, even23, 0x88));
      _mm512_storeu_ps(dst + (8 + j) * dst_stride, _mm512_shuffle_f32x4(even01, even23, 0xdd));
      _mm512_storeu_ps(dst + (4 + j) * dst_stride, _mm512_shuffle_f32x4(odd01, odd23, 0x88));
      _mm512_storeu_ps(dst + (12 + j) * dst_stride, _mm512_shuffle_f32x4(odd01, odd23, 0xdd));
    }
  }

  static V exp2(V x) {
    // -200 is far enough below 2^-149 that scalef underflows to exactly 0 (masked scores are -inf);
    // max/min take x as the second operand so a NaN passes through.
    const V clamped = _mm512_max_ps(set1(-200.0f), _mm512_min_ps(set1(128.0f), x));
    const V n = _mm512_roundscale_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_reduced<VecAvx512<float>>(_mm512_sub_ps(clamped, n)), n);
  }
};

template <>
struct VecAvx512<double> {
  using T = double;
  using V = __m512d;
  using S = T;  // storage type of the caller's arrays (WithStorage overrides it)
  static constexpr int W = 8;
  static constexpr int kTileRows = 4;
  static constexpr int kTileVecs = 4;
  static constexpr int kRegisters = 32;  // vector registers (the decode loops' budget)

  static V zero() { return _mm512_setzero_pd(); }
  static V set1(T x) { return _mm512_set1_pd(x); }
  static V load(const T* p) { return _mm512_load_pd(p); }
  static V loadu(const T* p) { return _mm512_loadu_pd(p); }
  static void store(T* p, V x) { _mm512_store_pd(p, x); }
  static void storeu(T* p, V x) { _mm512_storeu_pd(p, x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V max(V a, V b) { return _mm512_max_pd(a, b); }
  static V min(V a, V b) { return _mm512_min_pd(a, b); }
  static V div(V a, V b) { return _mm512_div_pd(a, b); }
  static V neginf_to_zero(V x) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(x, set1(-INFINITY), _CMP_EQ_OQ), x, zero());
  }
  static bool all_equal(V a, V b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ) == 0xff; }
  static T reduce_max(V x) { return _mm512_reduce_max_pd(x); }
  static T reduce_add(V x) { return _mm512_reduce_add_pd(x); }
  static V sum_each(const V* acc) {  // lane t = the sum of acc[t]'s lanes (rare in decode: float64)
    alignas(64) T sums[W];
    for (int t = 0; t < W; ++t) sums[t] = reduce_add(acc[t]);
    return load(sums);
  }

  // dst[c * dst_stride + r] = src[r * src_stride + c] for an 8 x 8 block.
  static void transpose(const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
    V r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_pd(src + i * src_stride);
    for (int i = 0; i < 4; ++i) {  // t[2i + j], 128-bit lane L: column 2L + j of rows 2i, 2i + 1
      t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
    }
    for (int j = 0; j < 2; ++j) {
      const V even01 = _mm512_shuffle_f64x2(t[j], t[2 + j], 0x88), odd01 = _mm512_shuffle_f64x2(t[j], t[2 + j], 0xdd);
      const V even23 = _mm512_shuffle_f64x2(t[4 + j], t[6 + j], 0x88), odd23 = _mm512_shuffle_f64x2(t[4 + j], t[6 + j], 0xdd);
      _mm512_storeu_pd(dst + j * dst_stride, _mm512_shuffle_f64x2(even01, even23, 0x88));
      _mm512_storeu_pd(dst + (4 + j) * dst_stride, _mm512_shuffle_f64x2(even01, even23, 0xdd));
      _mm512_storeu_pd(dst + (2 + j) * dst_stride, _mm512_shuffle_f64x2(odd01, odd23, 0x88));
      _mm512_storeu_pd(dst + (6 + j) * dst_stride, _mm512_shuffle_f64x2(odd01, odd23, 0xdd));
    }
  }

  static V exp2(V x) {
    const V clamped = _mm512_max_pd(set1(-1100.0), _mm512_min_pd(set1(1024.0), x));
    const V n = _mm512_roundscale_pd(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_pd(exp2_reduced<VecAvx512<double>>(_mm512_sub_pd(clamped, n)), n);
  }
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
