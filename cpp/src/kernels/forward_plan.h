// The work decomposition of a forward call: row blocks, key splits, and where each work item's scratch and
// accumulators live. make_plan (forward.h) fills it for a layout.
#pragma once

#include "kernels/common.h"
#include "kernels/masks.h"
#include "kernels/softmax.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

template <class Vec>
struct ForwardPlan {
  using T = typename Vec::T;
  const AttnParams* p;
  bool decode;             // layout: DimLanes (decode) or QueryLanes (prefill)
  int64_t q_blocks;        // prefill: ceil(Lq / kBlockQ)
  int64_t row_blocks;      // prefill: batch * Hq * q_blocks; decode: batch * Hq / decode_heads
  int64_t decode_heads;    // decode: query heads per row block
  int64_t rows;            // rows of the accumulators: lanes (prefill) or group * Lq (decode)
  int64_t o_row, o_col;    // accumulator layout
  int64_t dim_pad, value_dim_pad;
  int64_t k_splits;        // > 1: keys split across work items and merged by logsumexp (flash-decoding)
  int64_t keys_per_split;  // a multiple of kBlockK
  T* scratch;              // per thread: the layout's tiles, then (when k_splits == 1) the accumulators
  int64_t scratch_per_thread;
  T* partials;             // k_splits > 1: the accumulators of every work item, kept for the merge
  int64_t accumulator_size;
  const void* shared = nullptr;  // operands a layout packs once per call for every item (amx: K, V panels)

  RowBlock row_block(int64_t index) const {
    if (decode) {  // decode_heads query heads: whole kv groups (see DimLanes::heads_per_item)
      const int64_t items_per_batch = p->heads_q / decode_heads;
      return {index / items_per_batch, (index % items_per_batch) * decode_heads, decode_heads, 0, p->len_q};
    }
    const int64_t q_block = index % q_blocks;
    const int64_t q0 = q_block * kBlockQ;
    const int64_t batch = index / q_blocks / p->heads_q;
    // nq <= 0: a block past the end of a shorter sequence of a packed batch; it does nothing.
    return {batch, (index / q_blocks) % p->heads_q, 1, q0, min_i64(kBlockQ, p->len_q_of(batch) - q0)};
  }

  void reset(const Accumulators<T>& acc) const {
    for (int64_t r = 0; r < rows; ++r) {
      acc.m[r] = -std::numeric_limits<T>::infinity();
      acc.l[r] = T(0);
    }
    for (int64_t e = 0; e < rows * value_dim_pad; ++e) acc.o[e] = T(0);
  }

  // The keys [*begin, *end) a split of a row block visits: tiles outside every row's band are never
  // computed.
  void key_range(const RowBlock& block, int64_t split, int64_t* begin, int64_t* end) const {
    *begin = split * keys_per_split;
    *end = min_i64(p->len_k_of(block.batch), *begin + keys_per_split);
    visible_keys(*p, block, begin, end);
  }

  Accumulators<T> accumulators(int64_t item, int thread_id) const {
    T* base = k_splits > 1 ? partials + item * accumulator_size
                           : scratch + thread_id * scratch_per_thread + scratch_per_thread - accumulator_size;
    return {base, base + rows * value_dim_pad, base + rows * value_dim_pad + rows};
  }
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
