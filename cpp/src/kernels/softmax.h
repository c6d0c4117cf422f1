// The online softmax of the queries-in-lanes layout and the output it leaves: the per-row accumulators,
// one key block's update step, and the normalised output row with its logsumexp.
//
// Invariants of the online softmax (per query row):
//   m = max of the scores seen so far (-inf if none may be attended),
//   l = sum of exp(score - m), O = sum of exp(score - m) * v;
//   a new block with max m' rescales l and O by exp(m - m'); the reference point is 0 instead of m'
//   while m' is -inf, so exp(-inf - (-inf)) is never evaluated; a row with l = 0 outputs 0, lse -inf.
#pragma once

#include "kernels/masks.h"
#include "kernels/scores.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// Per-row softmax state of one work item: the unnormalised output o(r, e) = o[r * o_row + e * o_col],
// the running max m[r] and the running sum l[r].
template <class T>
struct Accumulators {
  T* o;
  T* m;
  T* l;
};

// Online softmax down the key axis: folds S^T into the running max / sum, turns it into P^T in place
// and rescales the value_dim rows of O^T (none when only the statistics are wanted).
template <class Vec>
void softmax_update(int64_t lanes, int64_t nk, typename Vec::T* s_t, const Accumulators<typename Vec::T>& acc,
                    int64_t value_dim) {
  using T = typename Vec::T;
  using V = typename Vec::V;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t lane = 0; lane < lanes; lane += Vec::W) {
    T* column = s_t + lane;
    V block_max = Vec::set1(neg_inf);
    for (int64_t j = 0; j < nk; ++j) block_max = Vec::max(block_max, Vec::load(column + j * lanes));
    const V old_max = Vec::load(acc.m + lane);
    const V new_max = Vec::max(old_max, block_max);
    const V reference = Vec::neginf_to_zero(new_max);
    V block_sum = Vec::zero();
    for (int64_t j = 0; j < nk; ++j) {
      const V prob = exp_minus<Vec>(Vec::load(column + j * lanes), reference);
      Vec::store(column + j * lanes, prob);
      block_sum = Vec::add(block_sum, prob);
    }
    V sum = Vec::load(acc.l + lane);
    // Skipped when no lane's max moved (the common case after the first blocks) and on a lane vector's
    // first visible block (O and l are still 0).
    if (!Vec::all_equal(old_max, new_max) && !Vec::all_equal(old_max, Vec::set1(neg_inf))) {
      const V rescale = exp_minus<Vec>(old_max, reference);
      sum = Vec::mul(sum, rescale);
      for (int64_t e = 0; e < value_dim; ++e)
        Vec::store(acc.o + e * lanes + lane, Vec::mul(Vec::load(acc.o + e * lanes + lane), rescale));
    }
    Vec::store(acc.l + lane, Vec::add(sum, block_sum));
    Vec::store(acc.m + lane, new_max);
  }
}

// The logsumexp of a row from its accumulators; -inf when it may attend nothing (l == 0).
template <class T>
T row_lse(T m, T l) {
  return l == T(0) ? -std::numeric_limits<T>::infinity() : m + std::log(l);
}

// How a row leaves its accumulators (m, l): out = o * factor, and its lse. The one place a row is
// finalised (emit_row, QueryLanes::emit, the weights pass; merge_splits through emit_row), so the sink
// joins each denominator exactly once, whatever the layout or the key splits. With a sink,
// top = max(m, sink) keeps both exponentials <= 1: factor = e^(m - top) / (l e^(m - top) + e^(sink - top)).
template <class T>
void finish_row(const AttnParams& p, int64_t head, T m, T l, T* factor, T* lse) {
  if (!p.sinks) {
    *factor = l == T(0) ? T(0) : T(1) / l;  // l == 0: the row may attend nothing; its o is 0, output 0
    *lse = row_lse(m, l);
    return;
  }
  const T sink = static_cast<const T*>(p.sinks)[head];
  const T top = sink > m ? sink : m;  // m is -inf when no key was visible, NaN when a score was
  if (top == -std::numeric_limits<T>::infinity()) {
    *factor = T(0);
    *lse = top;
    return;
  }
  const T weight = l == T(0) ? T(0) : std::exp(m - top);
  const T denominator = l * weight + std::exp(sink - top);
  *factor = weight / denominator;
  *lse = top + std::log(denominator);
}

// Calls write(pointer) with the output's first element typed as the caller's storage: the input dtype,
// or float32 when 16-bit inputs asked for float32 output.
template <class Vec, class Write>
void with_output(const AttnParams& p, const RowBlock& block, int64_t r, Write write) {
  using S = typename Vec::S;
  if constexpr (!std::is_same_v<S, typename Vec::T>) {
    if (p.out_float32) return write(p.out.row<float>(block.batch, block.head(r), block.query(r)));
  }
  write(p.out.row<S>(block.batch, block.head(r), block.query(r)));
}

// Normalised output and logsumexp of row r, from its accumulators.
template <class Vec>
void emit_row(const AttnParams& p, const RowBlock& block, int64_t r, const typename Vec::T* o, int64_t o_col,
              typename Vec::T m, typename Vec::T l) {
  using T = typename Vec::T;
  T inv_sum, lse;
  finish_row(p, block.head(r), m, l, &inv_sum, &lse);
  with_output<Vec>(p, block, r, [&](auto* out_row) {
    for (int64_t e = 0; e < p.value_dim; ++e) narrow(out_row + e * p.out.col_stride, o[e * o_col] * inv_sum);
  });
  if (p.lse.data) *p.lse.row<T>(block.batch, block.head(r), block.query(r)) = lse;
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
