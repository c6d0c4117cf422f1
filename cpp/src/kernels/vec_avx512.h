// AVX-512F: 16 floats / 8 doubles per register, 32 registers.
#pragma once

#include "kernels/exp2_poly.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// 4 rows x 4 vectors = 16 accumulators: enough chains for two 512-bit FMA pipes (Intel) and for Zen 4's
// double-pumped one, with 32 registers left over for the 4 loads and a broadcast.
template <class Scalar>
struct VecAvx512;

template <>
struct VecAvx512<float> {
  using T = float;
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kTileRows = 4;
  static constexpr int kTileVecs = 4;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(T x) { return _mm512_set1_ps(x); }
  static V load(const T* p) { return _mm512_load_ps(p); }
  static V loadu(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, V x) { _mm512_store_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V neginf_to_zero(V x) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, set1(-INFINITY), _CMP_EQ_OQ), x, zero());
  }
  static bool all_equal(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ) == 0xffff; }
  static T reduce_max(V x) { return _mm512_reduce_max_ps(x); }
  static T reduce_add(V x) { return _mm512_reduce_add_ps(x); }

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
  static constexpr int W = 8;
  static constexpr int kTileRows = 4;
  static constexpr int kTileVecs = 4;

  static V zero() { return _mm512_setzero_pd(); }
  static V set1(T x) { return _mm512_set1_pd(x); }
  static V load(const T* p) { return _mm512_load_pd(p); }
  static V loadu(const T* p) { return _mm512_loadu_pd(p); }
  static void store(T* p, V x) { _mm512_store_pd(p, x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V max(V a, V b) { return _mm512_max_pd(a, b); }
  static V neginf_to_zero(V x) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(x, set1(-INFINITY), _CMP_EQ_OQ), x, zero());
  }
  static bool all_equal(V a, V b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ) == 0xff; }
  static T reduce_max(V x) { return _mm512_reduce_max_pd(x); }
  static T reduce_add(V x) { return _mm512_reduce_add_pd(x); }

  static V exp2(V x) {
    const V clamped = _mm512_max_pd(set1(-1100.0), _mm512_min_pd(set1(1024.0), x));
    const V n = _mm512_roundscale_pd(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_pd(exp2_reduced<VecAvx512<double>>(_mm512_sub_pd(clamped, n)), n);
  }
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
