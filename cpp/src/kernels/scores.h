// Score policies (dot product, additive) and the scalar functions on scores: exp relative to a
// reference, tanh, soft-capping.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

constexpr double kLog2e = 1.4426950408889634;

// e^(x - reference) for x <= reference, as exp2 of the difference times log2(e).
template <class Vec>
inline typename Vec::V exp_minus(typename Vec::V x, typename Vec::V reference) {
  return Vec::exp2(Vec::mul(Vec::sub(x, reference), Vec::set1(static_cast<typename Vec::T>(kLog2e))));
}

// tanh(x) = (e - 1) / (e + 1) with e = e^(2x). |x| is clamped where tanh rounds to +-1 (9 in float, 20 in
// double) so e stays finite; the absolute error is about one ulp of 1, which is what the additive score
// sum_d w_d tanh(.) accumulates anyway. NaN passes through the clamp (x is the second operand).
template <class Vec>
inline typename Vec::V tanh_vec(typename Vec::V x) {
  using T = typename Vec::T;
  const T limit = sizeof(T) == 4 ? T(9) : T(20);
  const typename Vec::V clamped = Vec::max(Vec::set1(-limit), Vec::min(Vec::set1(limit), x));
  const typename Vec::V e = Vec::exp2(Vec::mul(clamped, Vec::set1(static_cast<T>(2 * kLog2e))));
  return Vec::div(Vec::sub(e, Vec::set1(T(1))), Vec::add(e, Vec::set1(T(1))));
}

// Score policies: how one depth step k of a score tile combines a broadcast element a (from K) with a
// vector b (from Q^T), how `a` is read, and what happens to a finished accumulator. The P.V product is
// always DotScore (or, for native bfloat16 pairs, its paired counterpart in bf16_pairs.h).
struct WidenedOperand {  // `a` is one element of the caller's storage, widened to the compute type
  template <class Vec, class A>
  static typename Vec::V broadcast(const A* a) {
    return Vec::set1(widen(*a));
  }
  template <class Vec>
  static typename Vec::V finish(typename Vec::V acc, const typename Vec::T*) {
    return acc;
  }
};

struct DotScore : WidenedOperand {
  template <class Vec>
  static typename Vec::V depth_weight(const typename Vec::T*, int64_t) {
    return Vec::zero();
  }
  template <class Vec>
  static typename Vec::V combine(typename Vec::V acc, typename Vec::V a, typename Vec::V b, typename Vec::V) {
    return Vec::fmadd(a, b, acc);
  }
};

struct AdditiveScore : WidenedOperand {  // sum_d w_d tanh(q_d + k_d), Keras AdditiveAttention / Bahdanau
  template <class Vec>
  static typename Vec::V depth_weight(const typename Vec::T* weight, int64_t k) {
    return Vec::set1(weight[k]);
  }
  template <class Vec>
  static typename Vec::V combine(typename Vec::V acc, typename Vec::V a, typename Vec::V b, typename Vec::V w) {
    return Vec::fmadd(w, tanh_vec<Vec>(Vec::add(a, b)), acc);
  }
};

// Logit soft-capping of `count` contiguous scores: s -> cap * tanh(s / cap). Applied before any bias or
// mask, so masked positions stay at -inf (zero probability).
template <class Vec>
void apply_softcap(typename Vec::T* scores, int64_t count, typename Vec::T cap) {
  using T = typename Vec::T;
  const typename Vec::V cap_vec = Vec::set1(cap), inv_cap = Vec::set1(T(1) / cap);
  int64_t e = 0;
  for (; e + Vec::W <= count; e += Vec::W)
    Vec::storeu(scores + e, Vec::mul(cap_vec, tanh_vec<Vec>(Vec::mul(Vec::loadu(scores + e), inv_cap))));
  if (e == count) return;
  // The last count - e < W scores go through the same vector code in a zero-padded copy, so every score
  // rounds alike wherever it falls.
  T tail[Vec::W] = {};
  for (int64_t i = 0; i < count - e; ++i) tail[i] = scores[e + i];
  Vec::storeu(tail, Vec::mul(cap_vec, tanh_vec<Vec>(Vec::mul(Vec::loadu(tail), inv_cap))));
  for (int64_t i = 0; i < count - e; ++i) scores[e + i] = tail[i];
}

// Soft-capping of a whole tile when the call asks for it.
template <class Vec>
void soft_cap(const AttnParams& p, int64_t count, typename Vec::T* s_t) {
  if (p.softcap > 0) apply_softcap<Vec>(s_t, count, static_cast<typename Vec::T>(p.softcap));
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
