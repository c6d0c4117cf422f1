// attention_weights(): the probabilities themselves, from the prefill layout's score tiles.
#pragma once

#include "kernels/forward.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// attention_weights(): the same score tiles twice, first for each row's max and sum, then to write
// exp(score - max) / sum. The probabilities are the output here, so they are materialised on purpose.
template <class Vec, class Mask, class Score>
void weights_item(const ForwardPlan<Vec>& plan, int64_t item, int thread_id) {
  using T = typename Vec::T;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  const AttnParams& p = *plan.p;
  const RowBlock block = plan.row_block(item);
  if (block.nq <= 0) return;
  const int64_t lanes = plan.rows;
  const Accumulators<T> acc = plan.accumulators(item, thread_id);
  plan.reset(acc);
  int64_t k_begin, k_end;
  plan.key_range(block, 0, &k_begin, &k_end);
  T* q_t = plan.scratch + thread_id * plan.scratch_per_thread;
  T* s_t = q_t + p.head_dim * lanes;
  WidenedProducts::pack_queries<Vec>(p, block, lanes, q_t);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    const int64_t nk = min_i64(kBlockK, k_end - k0);
    QueryLanes::score_tile<Vec, Mask, Score>(p, block, lanes, k0, nk, q_t, s_t);
    softmax_update<Vec>(lanes, nk, s_t, acc, /*value_dim=*/0);
  }
  for (int64_t i = 0; i < lanes; ++i) {  // rows attending nothing stay all 0; a sink only lowers the rest
    T lse;
    finish_row(p, block.head0, acc.m[i], acc.l[i], &acc.l[i], &lse);
    acc.m[i] = acc.m[i] == -std::numeric_limits<T>::infinity() ? T(0) : acc.m[i];
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    const int64_t nk = min_i64(kBlockK, k_end - k0);
    QueryLanes::score_tile<Vec, Mask, Score>(p, block, lanes, k0, nk, q_t, s_t);
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t lane = 0; lane < lanes; lane += W) {
        const V prob = exp_minus<Vec>(Vec::load(s_t + j * lanes + lane), Vec::load(acc.m + lane));
        Vec::store(s_t + j * lanes + lane, Vec::mul(prob, Vec::load(acc.l + lane)));
      }
    transpose_copy<Vec>(nk, block.nq, s_t, lanes, 1,
                        p.weights.row<typename Vec::S>(block.batch, block.head0, block.q0) + k0 * p.weights.col_stride,
                        p.weights.row_stride, p.weights.col_stride);
  }
}

// The weights pass for switches.h.
template <class Vec, class Mask, class Score>
struct WeightsPass {
  static void run(const AttnParams& p) {
    using T = typename Vec::T;
    ForwardPlan<Vec> plan = make_plan<Vec, QueryLanes>(p, /*may_split_keys=*/false);
    AlignedBuffer scratch(sizeof(T) * plan.scratch_per_thread * p.num_threads);
    plan.scratch = static_cast<T*>(scratch.data);
    parallel_for(
        plan.row_blocks, p.num_threads,
        [](void* context, int64_t item, int thread_id) {
          weights_item<Vec, Mask, Score>(*static_cast<const ForwardPlan<Vec>*>(context), item, thread_id);
        },
        &plan);
  }
};

template <template <class> class VecFor>
void weights(const AttnParams& p) {
  run_pass_for_dtype<VecFor, WeightsPass>(p);
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
