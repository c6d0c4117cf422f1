// The decode layout (DimLanes): one or a few queries against a long K / V, the head dimension in lanes.
#pragma once

#include "kernels/common.h"
#include "kernels/forward_plan.h"
#include "kernels/masks.h"
#include "kernels/scores.h"
#include "kernels/softmax.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// Decode layout: few queries, so the head dimension is in lanes. Each score is a dot product over D
// (four keys at a time, for four independent FMA chains), the softmax runs along a row of keys, and
// o(r, :) += p(r, j) * v(j, :) keeps up to kOutVecs vectors of the output row in registers. Every K/V
// element is loaded once per group of query rows, which is what a memory-bound decode step needs.
struct DimLanes {
  static constexpr int kDotKeys = 4;
  static constexpr int kOutVecs = 8;
  static constexpr int64_t kPackKeys = 16;  // keys widened at a time: 8 KiB of fp32 rows at D = 128

  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t rows) {
    const int64_t dim_pad = round_up(p.head_dim, Vec::W), value_dim_pad = round_up(p.value_dim, Vec::W);
    // row pointers of a chunk | scaled Q rows | scores | widened K chunk | widened V chunk (each kv head of
    // the item) | int8 scales
    const int64_t kv_count = heads_per_item(p) / (p.heads_q / p.heads_kv);
    return pointer_slots<typename Vec::T>(kv_count) + rows * dim_pad + rows * kBlockK + kv_count * kPackKeys * (dim_pad + value_dim_pad) + 2 * p.heads_kv * kBlockK;
  }

  // Scratch elements (T) that hold a chunk's row pointers, a whole number of 64-byte lines so that the
  // scaled Q rows after them stay aligned.
  template <class T>
  static int64_t pointer_slots(int64_t kv_count) {
    const int64_t bytes = kv_count * kPackKeys * static_cast<int64_t>(sizeof(const T*));
    return round_up(ceil_div(bytes, static_cast<int64_t>(sizeof(T))), 64 / static_cast<int64_t>(sizeof(T)));
  }

  // Query heads per work item: one kv group, or every kv head of a batch entry when K / V are paged
  // (a pool block holds all kv heads of its tokens: reading them together reads the block in order).
  static int64_t heads_per_item(const AttnParams& p) { return p.k.paged() || p.v.paged() ? p.heads_q : p.heads_q / p.heads_kv; }

  // Makes keys [k0, k0 + nk) of kv heads [kv_first, kv_first + kv_count) of K or V readable with
  // aligned-width vector loads: rows[g * kPackKeys + j] is key k0 + j of kv head kv_first + g, in place
  // when rows are contiguous, a whole number of vectors and in the compute type, else widened (16-bit,
  // int8) into zero-padded scratch. One pointer per key, so a paged tensor's block edges fall anywhere.
  // Widening runs token by token, every head of a token in turn: in a paged pool that is address order
  // (a block holds all heads of its tokens), which the hardware prefetchers follow; head by head, the
  // 128-byte int8 rows a block stride apart stalled the loads (77% of int8 paged decode, Zen 4).
  template <class Vec>
  static void rows_for_vectors(const StridedTensor& t, int64_t batch, int64_t kv_first, int64_t kv_count, int64_t k0,
                               int64_t nk, int64_t width, int64_t width_pad, typename Vec::T* pack,
                               const typename Vec::T** rows) {
    using T = typename Vec::T;
    using S = KvStorage<Vec>;
    if constexpr (std::is_same_v<S, T>) {
      if (t.col_stride == 1 && width == width_pad) {
        for (int64_t g = 0; g < kv_count; ++g)
          for_rows<const T>(t, batch, kv_first + g, k0, nk, [&](int64_t j, const T* row) { rows[g * kPackKeys + j] = row; });
        return;
      }
    }
    for (int64_t g = 0; g < kv_count; ++g)
      for_rows<const S>(t, batch, kv_first + g, k0, nk, [&](int64_t j, const S* source) {
        rows[g * kPackKeys + j] = reinterpret_cast<const T*>(source);  // widened below, in token order
      });
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t g = 0; g < kv_count; ++g) {
        const S* source = reinterpret_cast<const S*>(rows[g * kPackKeys + j]);
        T* row = pack + (g * kPackKeys + j) * width_pad;
        if (t.col_stride == 1) {
          widen_contiguous(source, width, row);
        } else {
          for (int64_t e = 0; e < width; ++e) row[e] = widen(source[e * t.col_stride]);
        }
        for (int64_t e = width; e < width_pad; ++e) row[e] = T(0);
        rows[g * kPackKeys + j] = row;
      }
  }

  // The per-key scales of int8 K or V for keys [k0, k0 + nk).
  template <class T>
  static void key_scales(const StridedTensor& scales, int64_t batch, int64_t kv_head, int64_t k0, int64_t nk, T* out) {
    for_rows<const float>(scales, batch, kv_head, k0, nk, [&](int64_t j, const float* scale) { out[j] = static_cast<T>(*scale); });
  }

  template <class Vec, int kKeys>
  static void dot_keys(const typename Vec::T* q_row, const typename Vec::T* const* keys, int64_t vecs,
                       typename Vec::T* scores) {
    using V = typename Vec::V;
    V acc[kKeys];
    for (int t = 0; t < kKeys; ++t) acc[t] = Vec::zero();
    // Key by key, each row front to back: the order the hardware prefetcher follows (interleaving the
    // four rows chunk by chunk measured 2x slower on Zen 4). The chains still overlap out of order.
    for (int t = 0; t < kKeys; ++t)
      for (int64_t c = 0; c < vecs; ++c)
        acc[t] = Vec::fmadd(Vec::load(q_row + c * Vec::W), Vec::loadu(keys[t] + c * Vec::W), acc[t]);
    for (int t = 0; t < kKeys; ++t) scores[t] = Vec::reduce_add(acc[t]);
  }

  template <class Vec, int kVecs>
  static void accumulate_values(const typename Vec::T* probs, int64_t nk, const typename Vec::T* const* values,
                                int64_t offset, typename Vec::T* out) {
    using V = typename Vec::V;
    V acc[kVecs];
    for (int c = 0; c < kVecs; ++c) acc[c] = Vec::load(out + c * Vec::W);
    for (int64_t j = 0; j < nk; ++j) {
      const V prob = Vec::set1(probs[j]);
      for (int c = 0; c < kVecs; ++c) acc[c] = Vec::fmadd(prob, Vec::loadu(values[j] + offset + c * Vec::W), acc[c]);
    }
    for (int c = 0; c < kVecs; ++c) Vec::store(out + c * Vec::W, acc[c]);
  }

  template <class Vec, int kVecs = kOutVecs>
  static void accumulate_values_any(int64_t vecs, const typename Vec::T* probs, int64_t nk,
                                    const typename Vec::T* const* values, int64_t offset, typename Vec::T* out) {
    if constexpr (kVecs > 1) {
      if (vecs < kVecs) return accumulate_values_any<Vec, kVecs - 1>(vecs, probs, nk, values, offset, out);
    }
    accumulate_values<Vec, kVecs>(probs, nk, values, offset, out);
  }

  template <class Vec, class Mask, class Score>
  static void run(const ForwardPlan<Vec>& plan, const RowBlock& block, int64_t k_begin, int64_t k_end,
                  const Accumulators<typename Vec::T>& acc, typename Vec::T* scratch) {
    static_assert(std::is_same_v<Score, DotScore>, "the decode layout computes dot-product scores only");
    using T = typename Vec::T;
    using V = typename Vec::V;
    constexpr int W = Vec::W;
    const AttnParams& p = *plan.p;
    const int64_t rows = block.rows(), dim = p.head_dim, dim_pad = plan.dim_pad, value_dim_pad = plan.value_dim_pad;
    const int64_t group = p.heads_q / p.heads_kv, group_rows = group * block.nq;
    const int64_t kv_first = block.head0 / group, kv_count = block.heads / group;
    const T scale = static_cast<T>(p.scale);
    const T** rows_of_chunk = reinterpret_cast<const T**>(scratch);  // [kv head of the item][key of the chunk]
    T* q_rows = scratch + pointer_slots<T>(kv_count);
    T* scores = q_rows + rows * dim_pad;
    T* k_pack = scores + rows * kBlockK;
    T* v_pack = k_pack + kv_count * kPackKeys * dim_pad;
    T* k_scales = v_pack + kv_count * kPackKeys * value_dim_pad;  // [kv head of the item][key of the block]
    T* v_scales = k_scales + p.heads_kv * kBlockK;
    const T neg_inf = -std::numeric_limits<T>::infinity();

    for (int64_t r = 0; r < rows; ++r) {
      const typename Vec::S* q_row = p.q.row<const typename Vec::S>(block.batch, block.head(r), block.query(r));
      for (int64_t d = 0; d < dim; ++d) q_rows[r * dim_pad + d] = widen(q_row[d * p.q.col_stride]) * scale;
      for (int64_t d = dim; d < dim_pad; ++d) q_rows[r * dim_pad + d] = T(0);
    }

    // Keys in chunks of kPackKeys, every kv head of the item inside a chunk: a widened chunk stays in L1
    // for all rows of its group, and a paged item sweeps each pool block (all kv heads of a few
    // tokens, contiguous) once, instead of one head's rows a block stride apart.
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
      const int64_t nk = min_i64(kBlockK, k_end - k0), nk_pad = round_up(nk, W);
      for (int64_t j0 = 0; j0 < nk; j0 += kPackKeys) {
        const int64_t nj = min_i64(kPackKeys, nk - j0);
        rows_for_vectors<Vec>(p.k, block.batch, kv_first, kv_count, k0 + j0, nj, dim, dim_pad, k_pack, rows_of_chunk);
        for (int64_t g = 0; g < kv_count; ++g) {
          const T* const* keys = rows_of_chunk + g * kPackKeys;
          for (int64_t r = g * group_rows; r < (g + 1) * group_rows; ++r) {
            T* row_scores = scores + r * kBlockK + j0;
            int64_t j = 0;
            for (; j + kDotKeys <= nj; j += kDotKeys)
              dot_keys<Vec, kDotKeys>(q_rows + r * dim_pad, keys + j, dim_pad / W, row_scores + j);
            for (; j < nj; ++j) dot_keys<Vec, 1>(q_rows + r * dim_pad, keys + j, dim_pad / W, row_scores + j);
          }
        }
      }
      if constexpr (kInt8Kv<Vec>) {
        for (int64_t g = 0; g < kv_count; ++g) {
          key_scales(p.k_scale, block.batch, kv_first + g, k0, nk, k_scales + g * kBlockK);
          key_scales(p.v_scale, block.batch, kv_first + g, k0, nk, v_scales + g * kBlockK);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* row_scores = scores + r * kBlockK;
        if constexpr (kInt8Kv<Vec>) {  // before soft-capping: the cap acts on the dequantised score
          const T* row_scales = k_scales + r / group_rows * kBlockK;
          for (int64_t j = 0; j < nk; ++j) row_scores[j] *= row_scales[j];
        }
        if (p.softcap > 0) apply_softcap<Vec>(row_scores, nk, static_cast<T>(p.softcap));
        for (int64_t j = nk; j < nk_pad; ++j) row_scores[j] = neg_inf;  // whole vectors below; exp(-inf) = 0
      }
      restrict_scores<Mask>(p, block, k0, nk, scores, /*row_stride=*/kBlockK, /*key_stride=*/1);

      for (int64_t r = 0; r < rows; ++r) {
        T* row_scores = scores + r * kBlockK;
        V block_max = Vec::set1(neg_inf);
        for (int64_t j = 0; j < nk_pad; j += W) block_max = Vec::max(block_max, Vec::load(row_scores + j));
        const T old_max = acc.m[r], candidate = Vec::reduce_max(block_max);
        const T new_max = candidate > old_max ? candidate : old_max;
        const T reference = new_max == neg_inf ? T(0) : new_max;
        V block_sum = Vec::zero();
        const V reference_vec = Vec::set1(reference);
        for (int64_t j = 0; j < nk_pad; j += W) {
          const V prob = exp_minus<Vec>(Vec::load(row_scores + j), reference_vec);
          Vec::store(row_scores + j, prob);
          block_sum = Vec::add(block_sum, prob);
        }
        T sum = acc.l[r];
        if (!(old_max == new_max)) {
          const T rescale = std::exp(old_max - reference);
          sum *= rescale;
          const V rescale_vec = Vec::set1(rescale);
          for (int64_t e = 0; e < value_dim_pad; e += W)
            Vec::store(acc.o + r * value_dim_pad + e, Vec::mul(Vec::load(acc.o + r * value_dim_pad + e), rescale_vec));
        }
        acc.l[r] = sum + Vec::reduce_add(block_sum);
        acc.m[r] = new_max;
        if (p.dropout_p > 0) apply_dropout(p, RowBlock{block.batch, block.head(r), 1, block.query(r), 1}, k0, nk, row_scores, 0, 1);
        if constexpr (kInt8Kv<Vec>) {  // after the row's sum: v's scale weighs the value, not the probability
          const T* row_scales = v_scales + r / group_rows * kBlockK;
          for (int64_t j = 0; j < nk; ++j) row_scores[j] *= row_scales[j];
        }
      }

      for (int64_t j0 = 0; j0 < nk; j0 += kPackKeys) {
        const int64_t nj = min_i64(kPackKeys, nk - j0);
        rows_for_vectors<Vec>(p.v, block.batch, kv_first, kv_count, k0 + j0, nj, p.value_dim, value_dim_pad, v_pack,
                              rows_of_chunk);
        for (int64_t g = 0; g < kv_count; ++g) {
          const T* const* values = rows_of_chunk + g * kPackKeys;
          for (int64_t r = g * group_rows; r < (g + 1) * group_rows; ++r)
            for (int64_t c = 0; c < value_dim_pad / W; c += kOutVecs)
              accumulate_values_any<Vec>(min_i64(kOutVecs, value_dim_pad / W - c), scores + r * kBlockK + j0, nj, values,
                                         c * W, acc.o + r * value_dim_pad + c * W);
        }
      }
    }
  }

  template <class Vec>
  static void emit(const ForwardPlan<Vec>& plan, const RowBlock& block, const Accumulators<typename Vec::T>& acc) {
    for (int64_t r = 0; r < block.rows(); ++r)
      emit_row<Vec>(*plan.p, block, r, acc.o + r * plan.o_row, plan.o_col, acc.m[r], acc.l[r]);
  }
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
