// Prefill layout: queries in lanes (see attn_fwd_impl.h). A work item streams the keys of one row block in
// tiles of kBlockK; each tile's products are the QueryProducts policy (query_products.h).
#pragma once

#include "kernels/common.h"
#include "kernels/forward_plan.h"
#include "kernels/masks.h"
#include "kernels/query_products.h"
#include "kernels/scores.h"
#include "kernels/softmax.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

struct QueryLanes {
  static constexpr int64_t kValueRowMultiple = 1;  // rows of O^T: Dv, rounded up to this

  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t lanes);  // below the class

  // S^T (nk x lanes) for keys [k0, k0 + nk) from the packed Q^T: the scores, biased, masked and
  // restricted to the band.
  template <class Vec, class Mask, class Score>
  static void score_tile(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                         const typename Vec::T* q_t, typename Vec::T* s_t) {
    raw_scores<Vec, Score>(p, block, lanes, k0, nk, q_t, s_t);
    restrict_scores<Mask>(p, block, k0, nk, s_t, /*row_stride=*/1, /*key_stride=*/lanes);
  }

  // S^T before any bias or mask: the scores, soft-capped when asked.
  template <class Vec, class Score>
  static void raw_scores(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                         const typename Vec::T* q_t, typename Vec::T* s_t) {
    WidenedProducts::scores<Vec, Score>(p, block, lanes, k0, nk, q_t, s_t);
    soft_cap<Vec>(p, nk * lanes, s_t);
  }


  // Paged K / V are read a key row at a time (PackedKvProducts); the other products stride across rows.
  template <class Vec, class Mask, class Score>
  static void run(const ForwardPlan<Vec>& plan, const RowBlock& block, int64_t k_begin, int64_t k_end,
                  const Accumulators<typename Vec::T>& acc, typename Vec::T* scratch) {
    using Products = typename QueryProducts<Vec, Score>::type;
    if constexpr (!std::is_same_v<Products, PackedKvProducts>) {
      if (plan.p->k.paged() || plan.p->v.paged())
        return run_products<Vec, Mask, Score, PackedKvProducts>(plan, block, k_begin, k_end, acc, scratch);
    }
    run_products<Vec, Mask, Score, Products>(plan, block, k_begin, k_end, acc, scratch);
  }

  template <class Vec, class Mask, class Score, class Products>
  static void run_products(const ForwardPlan<Vec>& plan, const RowBlock& block, int64_t k_begin, int64_t k_end,
                           const Accumulators<typename Vec::T>& acc, typename Vec::T* scratch) {
    using T = typename Vec::T;
    const AttnParams& p = *plan.p;
    const int64_t lanes = plan.rows;
    T* s_t = scratch;
    T* packed = s_t + kBlockK * lanes;
    Products::template pack_queries<Vec>(p, block, lanes, packed);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
      const int64_t nk = min_i64(kBlockK, k_end - k0);
      Products::template scores<Vec, Score>(p, block, lanes, k0, nk, packed, s_t);
      soft_cap<Vec>(p, nk * lanes, s_t);
      restrict_scores<Mask>(p, block, k0, nk, s_t, /*row_stride=*/1, /*key_stride=*/lanes);
      softmax_update<Vec>(lanes, nk, s_t, acc, p.value_dim);
      // Dropout acts on P after the row statistics: the sum (and lse) is of the undropped probabilities.
      if (p.dropout_p > 0) apply_dropout(p, block, k0, nk, s_t, /*row_stride=*/1, /*key_stride=*/lanes);
      Products::template accumulate_values<Vec>(p, block, lanes, k0, nk, s_t, packed, acc.o);
    }
  }

  // Normalises O^T in place (one multiply per lane vector) and transposes it into the output rows.
  template <class Vec>
  static void emit(const ForwardPlan<Vec>& plan, const RowBlock& block, const Accumulators<typename Vec::T>& acc) {
    using T = typename Vec::T;
    constexpr int W = Vec::W;
    const AttnParams& p = *plan.p;
    const int64_t lanes = plan.rows;
    for (int64_t i = 0; i < lanes; ++i) {
      T lse;
      finish_row(p, block.head0, acc.m[i], acc.l[i], &acc.l[i], &lse);
      if (p.lse.data && i < block.nq) *p.lse.row<T>(block.batch, block.head0, block.q0 + i) = lse;
    }
    for (int64_t e = 0; e < p.value_dim; ++e)
      for (int64_t lane = 0; lane < lanes; lane += W)
        Vec::store(acc.o + e * lanes + lane, Vec::mul(Vec::load(acc.o + e * lanes + lane), Vec::load(acc.l + lane)));
    with_output<Vec>(p, block, 0, [&](auto* out) {
      transpose_copy<Vec>(p.value_dim, block.nq, acc.o, lanes, 1, out, p.out.row_stride, p.out.col_stride);
    });
  }
};


template <class Vec>
int64_t QueryLanes::scratch_size(const AttnParams& p, int64_t lanes) {
  // S^T | the products' packed operands (the widest of the policies this Vec may use)
  const int64_t widened = WidenedProducts::scratch_size<Vec>(p, lanes);
  const int64_t dot = QueryProducts<Vec, DotScore>::type::template scratch_size<Vec>(p, lanes);
  const int64_t packed = PackedKvProducts::scratch_size<Vec>(p, lanes);
  const int64_t widest = dot > widened ? dot : widened;
  return lanes * kBlockK + (packed > widest ? packed : widest);
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
