// The two products of a queries-in-lanes tile, S^T = K . Q^T and O^T += V^T . P^T, as a policy:
// QueryProducts<Vec, Score>::type. WidenedProducts computes them in the compute type from the caller's
// storage; bf16_pairs.h specialises the policy with native bfloat16 dot products for the CPUs that have
// them. The backward pass packs its queries and computes its scores with WidenedProducts too.
#pragma once

#include "kernels/tile_kernel.h"
#include "kernels/scores.h"
#include "kernels/masks.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// Scores and P.V in the compute type, K and V broadcast element by element from the caller's memory.
struct WidenedProducts {
  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t lanes) {
    return lanes * p.head_dim;  // Q^T
  }

  // Q^T (D x lanes), pre-scaled; padding lanes are zero so they stay finite and are never stored.
  template <class Vec>
  static void pack_queries(const AttnParams& p, const RowBlock& block, int64_t lanes, typename Vec::T* q_t) {
    using T = typename Vec::T;
    const int64_t dim = p.head_dim;
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t i = block.nq; i < lanes; ++i) q_t[d * lanes + i] = T(0);
    transpose_copy<Vec>(block.nq, dim, p.q.row<const typename Vec::S>(block.batch, block.head0, block.q0), p.q.row_stride,
                        p.q.col_stride, q_t, lanes, 1);
    const typename Vec::V scale = Vec::set1(static_cast<T>(p.scale));
    for (int64_t e = 0; e < dim * lanes; e += Vec::W) Vec::store(q_t + e, Vec::mul(Vec::load(q_t + e), scale));
  }

  // Scaled S^T, nothing else applied.
  template <class Vec, class Score>
  static void scores(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                     const typename Vec::T* q_t, typename Vec::T* s_t) {
    const int64_t kv_head = block.head0 / (p.heads_q / p.heads_kv);
    strided_times_packed<Vec, Score, /*kAccumulate=*/false>(nk, lanes, p.head_dim,
                                                            p.k.row<const typename Vec::S>(block.batch, kv_head, k0),
                                                            p.k.row_stride, p.k.col_stride, q_t, s_t,
                                                            static_cast<const typename Vec::T*>(p.score_weight));
  }

  // O^T (Dv x lanes) += V^T . P^T
  template <class Vec>
  static void accumulate_values(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                                const typename Vec::T* p_t, typename Vec::T*, typename Vec::T* o_t) {
    const int64_t kv_head = block.head0 / (p.heads_q / p.heads_kv);
    strided_times_packed<Vec, DotScore, /*kAccumulate=*/true>(p.value_dim, lanes, nk,
                                                              p.v.row<const typename Vec::S>(block.batch, kv_head, k0),
                                                              p.v.col_stride, p.v.row_stride, p_t, o_t);
  }
};

// K and V tiles copied into the compute type first, each key row found through row(): int8 K / V
// dequantised in the copy (K = k_scale * k8, V = v_scale * v8), and paged K / V, whose tiles may cross
// block edges. A tile is copied once per work item and key block and serves every query lane; the
// cache itself is never copied whole.
struct PackedKvProducts {
  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t lanes) {
    return lanes * p.head_dim + kBlockK * (p.head_dim + p.value_dim);  // Q^T | K tile | V tile
  }

  template <class Vec>
  static void pack_queries(const AttnParams& p, const RowBlock& block, int64_t lanes, typename Vec::T* packed) {
    WidenedProducts::pack_queries<Vec>(p, block, lanes, packed);
  }

  template <class Vec, class Score>
  static void scores(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                     typename Vec::T* packed, typename Vec::T* s_t) {
    typename Vec::T* k_tile = packed + lanes * p.head_dim;
    pack_rows<Vec>(p.k, p.k_scale, p, block, k0, nk, p.head_dim, k_tile);
    strided_times_packed<Vec, Score, /*kAccumulate=*/false>(nk, lanes, p.head_dim, k_tile, p.head_dim, 1, packed, s_t,
                                                            static_cast<const typename Vec::T*>(p.score_weight));
  }

  template <class Vec>
  static void accumulate_values(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                                const typename Vec::T* p_t, typename Vec::T* packed, typename Vec::T* o_t) {
    typename Vec::T* v_tile = packed + lanes * p.head_dim + kBlockK * p.head_dim;
    pack_rows<Vec>(p.v, p.v_scale, p, block, k0, nk, p.value_dim, v_tile);
    strided_times_packed<Vec, DotScore, /*kAccumulate=*/true>(p.value_dim, lanes, nk, v_tile, 1, p.value_dim, p_t, o_t);
  }

 private:
  // tile[j * width + e] = element e of key k0 + j, dequantised.
  template <class Vec>
  static void pack_rows(const StridedTensor& t, const StridedTensor& scales, const AttnParams& p, const RowBlock& block,
                        int64_t k0, int64_t nk, int64_t width, typename Vec::T* tile) {
    using T = typename Vec::T;
    using S = KvStorage<Vec>;
    const int64_t kv_head = block.head0 / (p.heads_q / p.heads_kv);
    for_rows<const S>(t, block.batch, kv_head, k0, nk, [&](int64_t j, const S* source) {
      T* row = tile + j * width;
      if (t.col_stride == 1) {
        widen_contiguous(source, width, row);
      } else {
        for (int64_t e = 0; e < width; ++e) row[e] = widen(source[e * t.col_stride]);
      }
      if constexpr (kInt8Kv<Vec>) {
        const T scale = static_cast<T>(*scales.row<const float>(block.batch, kv_head, k0 + j));
        for (int64_t e = 0; e < width; ++e) row[e] *= scale;
      }
    });
  }
};

// The products of a call's tiles: int8 K / V are always dequantised through PackedKvProducts (and
// QueryLanes::run sends paged K / V there too); everything else widens in the micro-kernel.
template <class Vec, class Score>
struct QueryProducts {
  using type = std::conditional_t<kInt8Kv<Vec>, PackedKvProducts, WidenedProducts>;
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
