// The forward pass's plan and dispatch: make_plan for a layout, one work item, the merge of key splits,
// ForwardCall (plan + buffers), and the pass that picks the layout.
#pragma once

#include "fusedattn/limits.h"
#include "kernels/prefill.h"
#include "kernels/switches.h"
#include "kernels/decode.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// One work item: the rows of one row block against the keys of one split.
template <class Vec, class Mask, class Score, class Layout>
void forward_item(const ForwardPlan<Vec>& plan, int64_t item, int thread_id) {
  using T = typename Vec::T;
  const RowBlock block = plan.row_block(item / plan.k_splits);
  if (block.nq <= 0) return;
  const int64_t split = item % plan.k_splits;
  const Accumulators<T> acc = plan.accumulators(item, thread_id);
  plan.reset(acc);
  int64_t k_begin, k_end;
  plan.key_range(block, split, &k_begin, &k_end);
  if (k_begin < k_end)
    Layout::template run<Vec, Mask, Score>(plan, block, k_begin, k_end, acc,
                                          plan.scratch + thread_id * plan.scratch_per_thread);
  if (plan.k_splits == 1) Layout::emit(plan, block, acc);  // else the merge normalises and writes
}

// Combines the k_splits partial results of one row block: weights exp(m_s - M), M the largest m_s.
template <class Vec>
void merge_splits(const ForwardPlan<Vec>& plan, int64_t block_index) {
  using T = typename Vec::T;
  const RowBlock block = plan.row_block(block_index);
  if (block.nq <= 0) return;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T merged[kMaxHeadDim];  // one output row (Dv <= kMaxHeadDim) on the stack
  for (int64_t r = 0; r < block.rows(); ++r) {
    T global_max = neg_inf;
    for (int64_t s = 0; s < plan.k_splits; ++s) {
      const T m = plan.accumulators(block_index * plan.k_splits + s, 0).m[r];
      if (m > global_max || m != m) global_max = m;  // NaN wins, so it propagates to the output
    }
    const T reference = global_max == neg_inf ? T(0) : global_max;
    T total = 0;
    for (int64_t e = 0; e < plan.p->value_dim; ++e) merged[e] = T(0);
    for (int64_t s = 0; s < plan.k_splits; ++s) {
      const Accumulators<T> part = plan.accumulators(block_index * plan.k_splits + s, 0);
      const T weight = std::exp(part.m[r] - reference);
      total += part.l[r] * weight;
      for (int64_t e = 0; e < plan.p->value_dim; ++e) merged[e] += part.o[r * plan.o_row + e * plan.o_col] * weight;
    }
    // global_max, not reference: a row no split saw has m = -inf, and then its lse is the sink itself.
    emit_row<Vec>(*plan.p, block, r, merged, 1, global_max, total);
  }
}

// The work decomposition of one call: row blocks, key splits and per-thread scratch sizes.
template <class Vec, class Layout>
ForwardPlan<Vec> make_plan(const AttnParams& p, bool may_split_keys) {
  using T = typename Vec::T;
  constexpr int W = Vec::W;
  constexpr bool kDecode = std::is_same_v<Layout, DimLanes>;
  ForwardPlan<Vec> plan{};
  plan.p = &p;
  plan.decode = kDecode;
  plan.q_blocks = ceil_div(p.len_q, kBlockQ);
  plan.dim_pad = round_up(p.head_dim, W);
  if constexpr (kDecode) {
    plan.decode_heads = DimLanes::heads_per_item(p);
    plan.row_blocks = p.batch * (p.heads_q / plan.decode_heads);
    plan.rows = plan.decode_heads * p.len_q;
    plan.value_dim_pad = round_up(p.value_dim, W);
    plan.o_row = plan.value_dim_pad;
    plan.o_col = 1;
  } else {
    plan.row_blocks = p.batch * p.heads_q * plan.q_blocks;
    plan.rows = round_up(min_i64(p.len_q, kBlockQ), W);  // lanes
    plan.value_dim_pad = round_up(p.value_dim, Layout::kValueRowMultiple);
    plan.o_row = 1;
    plan.o_col = plan.rows;
  }

  // Too few row blocks to occupy many threads (decoding): split the keys too, several chunks per thread
  // so that uneven chunk costs even out, and merge the partial results by their logsumexp. The split is
  // a function of the shape alone, never of num_threads, so any thread count gives the same bits:
  // kSplitItems items (4 per thread up to 16 threads), none shorter than kMinSplitKeys keys (a split
  // costs a partial output row and its merge, noise against that many keys).
  // Decode counts batch x kv heads whatever the row blocks, so that paged and contiguous K / V split alike
  // and give the same bits. A long paged item holds every kv head of a sequence, though, so counted that way one
  // sequence with 8 kv heads made 8 paged items and left every thread beyond 8 idle: long caches are split
  // further, up to kSplitItems per batch entry, in splits of at least kLongSplitKeys keys (where an item's
  // start, its first unprefetched rows and its merge stay small: paged and contiguous decode within noise of
  // the 8-split plan at 2 threads, 8 kv heads x 32768 and 131072 keys, AMD EPYC Zen 1; more threads not
  // measured).
  constexpr int64_t kSplitItems = 64, kMinSplitKeys = 512, kLongSplitKeys = 2048;
  const int64_t units = kDecode ? p.batch * p.heads_kv : plan.row_blocks;
  // Splits that bring `items` (work items before splitting) to kSplitItems, each of at least min_keys keys.
  auto splits_for = [&](int64_t items, int64_t min_keys) {
    return items >= kSplitItems ? 1 : min_i64(ceil_div(kSplitItems, std::max<int64_t>(items, 1)), p.len_k / min_keys);
  };
  int64_t wanted = splits_for(units, kMinSplitKeys);
  if (kDecode) wanted = std::max(wanted, splits_for(p.batch, kLongSplitKeys));
  plan.k_splits = 1;
  plan.keys_per_split = round_up(p.len_k > 0 ? p.len_k : 1, kBlockK);
  if (may_split_keys && wanted > 1) {
    plan.keys_per_split = round_up(ceil_div(p.len_k, wanted), kBlockK);
    plan.k_splits = ceil_div(p.len_k, plan.keys_per_split);
  }

  const int64_t align = 64 / sizeof(T);
  plan.accumulator_size = round_up(plan.rows * (plan.value_dim_pad + 2), align);
  const int64_t tiles = round_up(Layout::template scratch_size<Vec>(p, plan.rows), align);
  plan.scratch_per_thread = tiles + (plan.k_splits > 1 ? 0 : plan.accumulator_size);
  return plan;
}

// One forward call: its plan and buffers. run_items() runs a range of work items and may be called for
// consecutive ranges (the amx level packs K and V for a range of kv heads before running their items);
// merge() combines the key splits once every item has run.
template <class Vec, class Layout>
struct ForwardCall {
  using T = typename Vec::T;
  ForwardPlan<Vec> plan;
  AlignedBuffer scratch, partials;

  explicit ForwardCall(const AttnParams& p)
      : plan(make_plan<Vec, Layout>(p, /*may_split_keys=*/true)),
        scratch(sizeof(T) * plan.scratch_per_thread * p.num_threads),
        partials(plan.k_splits > 1 ? sizeof(T) * plan.accumulator_size * plan.row_blocks * plan.k_splits : 0) {
    plan.scratch = static_cast<T*>(scratch.data);
    plan.partials = static_cast<T*>(partials.data);
  }

  int64_t items() const { return plan.row_blocks * plan.k_splits; }

  template <class Mask, class Score>
  void run_items(int64_t begin, int64_t end) {
    struct Range {
      const ForwardPlan<Vec>* plan;
      int64_t begin;
    } range{&plan, begin};
    parallel_for(
        end - begin, plan.p->num_threads,
        [](void* context, int64_t item, int thread_id) {
          const Range& r = *static_cast<const Range*>(context);
          forward_item<Vec, Mask, Score, Layout>(*r.plan, r.begin + item, thread_id);
        },
        &range);
  }

  void merge() {
    if (plan.k_splits == 1) return;
    parallel_for(
        plan.row_blocks, plan.p->num_threads,
        [](void* context, int64_t item, int) { merge_splits<Vec>(*static_cast<const ForwardPlan<Vec>*>(context), item); },
        &plan);
  }
};

template <class Vec, class Mask, class Score, class Layout>
void run_forward(const AttnParams& p) {
  ForwardCall<Vec, Layout> call(p);
  call.template run_items<Mask, Score>(0, call.items());
  call.merge();
}

// Decode (DimLanes) when the queries would fill less than a quarter of the query lanes of a tile.
template <class Vec>
bool use_decode_layout(const AttnParams& p) {
  return !p.seq_len_q && (p.len_q * 4 <= Vec::W || p.len_q == 1);
}

// The forward pass for switches.h: the layout, decode for dot scores of few queries, else prefill.
template <class Vec, class Mask, class Score>
struct ForwardPass {
  static void run(const AttnParams& p) {
    if constexpr (std::is_same_v<Score, DotScore>) {
      if (use_decode_layout<Vec>(p)) return run_forward<Vec, Mask, Score, DimLanes>(p);
    }
    run_forward<Vec, Mask, Score, QueryLanes>(p);
  }
};

template <template <class> class VecFor>
void forward(const AttnParams& p) {
  if (p.kv_int8) return run_pass_for_dtype<VecFor, ForwardPass, WithInt8Kv>(p);
  run_pass_for_dtype<VecFor, ForwardPass>(p);
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
