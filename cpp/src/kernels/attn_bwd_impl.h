// The fused attention backward pass (FlashAttention-2 style), one template like the forward pass and
// built from the same pieces: the score tile, the masks, the micro-kernel, the transposes.
//
// Per (query block, key block) tile, with P recomputed from the saved logsumexp (no Lq x Lk buffer); for
// dot-product scores:
//   S^T  = K . Q^T (scaled, masked)          P^T = exp(S^T - lse)
//   dP^T = V . dO^T                          dS^T = P^T o (dP^T - D),  D_i = rowsum(dO_i o O_i)
//   dV  += P . dO        dK += dS . (scale Q)        dQ^T += K^T . dS^T   (dQ = scale dQ^T^T)
// All five products are strided_times_packed: K and V are broadcast from the caller's memory, the
// query-side operands are packed once per query block. Additive scores share everything but dK / dQ,
// which additive_gradient_tile computes together with the gradient of the score weights.
//
// Work items own (batch, kv head, key chunk): they accumulate dK and dV of their keys over every query
// head of the kv head's group and every query block, so no two threads ever write the same gradient.
// dQ of a query block is complete after the item's key loop; with several chunks per kv head each chunk
// writes its dQ to its own slice and a final pass sums the slices in chunk order. The number of chunks
// depends on the shape only, never on the thread count, so the gradients are bit-identical at any
// num_threads.
#pragma once

#include "kernels/common.h"
#include "kernels/masks.h"
#include "kernels/query_products.h"
#include "kernels/scores.h"
#include "kernels/switches.h"
#include "kernels/tile_kernel.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// The keys of one work item: [begin, end) of kv head `kv_head` of batch entry `batch`, key chunk `chunk`.
struct KeyChunk {
  int64_t batch, kv_head, chunk, begin, end;
};

template <class Vec>
struct BackwardPlan {
  using T = typename Vec::T;
  const AttnParams* p;
  int64_t group;            // query heads per kv head
  int64_t q_blocks;
  int64_t lanes;            // query lanes per block, a multiple of W
  int64_t dim_pad, value_dim_pad;
  int64_t chunks;           // key chunks per kv head
  int64_t keys_per_chunk;   // a multiple of kBlockK
  T* scratch;
  int64_t scratch_per_thread;
  T* dq_partials;           // chunks > 1: (batch, kv head, chunk, group * Lq, D)
  T* dw_partials;           // additive scores: (work item, D), summed in item order at the end

  int64_t items() const { return p->batch * p->heads_kv * chunks; }

  // Work items are ordered batch, kv head, chunk.
  KeyChunk key_chunk(int64_t item) const {
    const int64_t chunk = item % chunks;
    const int64_t batch = item / chunks / p->heads_kv;
    const int64_t begin = chunk * keys_per_chunk;
    return {batch, (item / chunks) % p->heads_kv, chunk, begin, min_i64(p->len_k_of(batch), begin + keys_per_chunk)};
  }

  // Elements of the dQ slices (none with one chunk: each work item then writes dq itself).
  int64_t dq_partials_size() const {
    return chunks > 1 ? p->batch * p->heads_kv * chunks * group * p->len_q * p->head_dim : 0;
  }

  T* dq_partial(int64_t batch, int64_t kv_head, int64_t chunk, int64_t head_in_group, int64_t query) const {
    return dq_partials +
           ((((batch * p->heads_kv + kv_head) * chunks + chunk) * group + head_in_group) * p->len_q + query) * p->head_dim;
  }
};

// Scratch of one thread; every tile is lanes wide and 64-byte aligned (all sizes multiples of W).
template <class Vec>
struct BackwardScratch {
  using T = typename Vec::T;
  T *q_t, *q_rows, *do_t, *do_rows, *s_t, *dp_t, *cap_grad, *z_t, *dq_t, *lse, *delta, *dk, *dv;

  static int64_t size(const BackwardPlan<Vec>& plan) {
    const AttnParams& p = *plan.p;
    return plan.lanes * (2 * p.head_dim + p.value_dim + 4 * kBlockK + 2) + plan.lanes * (plan.dim_pad + plan.value_dim_pad) +
           plan.keys_per_chunk * (plan.dim_pad + plan.value_dim_pad);
  }

  BackwardScratch(const BackwardPlan<Vec>& plan, int thread_id) {
    const AttnParams& p = *plan.p;
    const int64_t lanes = plan.lanes;
    T* next = plan.scratch + thread_id * plan.scratch_per_thread;
    auto take = [&next](int64_t count) {
      T* start = next;
      next += count;
      return start;
    };
    q_t = take(p.head_dim * lanes);
    q_rows = take(lanes * plan.dim_pad);
    do_t = take(p.value_dim * lanes);
    do_rows = take(lanes * plan.value_dim_pad);
    s_t = take(kBlockK * lanes);
    dp_t = take(kBlockK * lanes);
    cap_grad = take(kBlockK * lanes);
    z_t = take(kBlockK * lanes);
    dq_t = take(p.head_dim * lanes);
    lse = take(lanes);
    delta = take(lanes);
    dk = take(plan.keys_per_chunk * plan.dim_pad);
    dv = take(plan.keys_per_chunk * plan.value_dim_pad);
  }
};

// Copies rows x cols (strided, any storage type) into a zero-padded row-major buffer of rows_pad x
// cols_pad, times factor.
template <class T, class S>
void pack_rows(int64_t rows, int64_t cols, const S* src, int64_t src_row, int64_t src_col, T factor, T* dst,
               int64_t rows_pad, int64_t cols_pad) {
  for (int64_t r = 0; r < rows_pad; ++r)
    for (int64_t c = 0; c < cols_pad; ++c)
      dst[r * cols_pad + c] = (r < rows && c < cols) ? widen(src[r * src_row + c * src_col]) * factor : T(0);
}

// Per lane of a query block: the logsumexp (+inf where a row attends nothing or is padding, so that its
// P is exp(-inf) = 0) and D = rowsum(dO o O).
template <class Vec>
void pack_row_statistics(const AttnParams& p, const RowBlock& block, int64_t lanes, typename Vec::T* lse_out,
                         typename Vec::T* delta_out) {
  using T = typename Vec::T;
  using S = typename Vec::S;
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < lanes; ++i) {
    lse_out[i] = inf;
    delta_out[i] = T(0);
    if (i >= block.nq) continue;
    const T lse = *p.lse.row<const T>(block.batch, block.head0, block.q0 + i);
    lse_out[i] = lse == -inf ? inf : lse;
    const S* out_row = p.out.row<const S>(block.batch, block.head0, block.q0 + i);
    const S* dout_row = p.dout.row<const S>(block.batch, block.head0, block.q0 + i);
    T delta = 0;
    for (int64_t e = 0; e < p.value_dim; ++e)
      delta += widen(dout_row[e * p.dout.col_stride]) * widen(out_row[e * p.out.col_stride]);
    delta_out[i] = delta;
  }
}

// Everything about one query block that the key loop reads: Q^T, scale * Q rows, dO^T, dO rows, the
// logsumexp (+inf where a row attends nothing or is padding, so that its P is exp(-inf) = 0) and D.
template <class Vec>
void pack_query_block(const BackwardPlan<Vec>& plan, const RowBlock& block, const BackwardScratch<Vec>& w) {
  using T = typename Vec::T;
  using S = typename Vec::S;
  const AttnParams& p = *plan.p;
  const int64_t lanes = plan.lanes, nq = block.nq;
  WidenedProducts::pack_queries<Vec>(p, block, lanes, w.q_t);
  pack_rows<T>(nq, p.head_dim, p.q.row<const S>(block.batch, block.head0, block.q0), p.q.row_stride, p.q.col_stride,
               static_cast<T>(p.scale), w.q_rows, lanes, plan.dim_pad);
  for (int64_t e = 0; e < p.value_dim; ++e)
    for (int64_t i = nq; i < lanes; ++i) w.do_t[e * lanes + i] = T(0);
  const S* dout = p.dout.row<const S>(block.batch, block.head0, block.q0);
  transpose_copy<Vec>(nq, p.value_dim, dout, p.dout.row_stride, p.dout.col_stride, w.do_t, lanes, 1);
  pack_rows<T>(nq, p.value_dim, dout, p.dout.row_stride, p.dout.col_stride, T(1), w.do_rows, lanes, plan.value_dim_pad);
  pack_row_statistics<Vec>(p, block, lanes, w.lse, w.delta);
}

// Additive scores s = sum_d w_d t_d with t_d = tanh(q_d + k_d): ds/dq_d = ds/dk_d = w_d (1 - t_d^2) and
// ds/dw_d = t_d. One tile's contributions to dQ^T, dK and dw, recomputing each t once; the dK terms need
// one horizontal sum per (key, d), a small cost next to the lanes/W tanh evaluations beside it.
template <class Vec>
void additive_gradient_tile(const AttnParams& p, int64_t lanes, int64_t nk, const typename Vec::S* keys,
                            const typename Vec::T* q_t, const typename Vec::T* ds_t, typename Vec::T* dq_t,
                            typename Vec::T* dk_rows, int64_t dk_stride, typename Vec::T* dw) {
  using T = typename Vec::T;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  const T* weight = static_cast<const T*>(p.score_weight);
  const V one = Vec::set1(T(1));
  for (int64_t d = 0; d < p.head_dim; ++d) {
    const V w_d = Vec::set1(weight[d]);
    V dw_sum = Vec::zero();
    for (int64_t j = 0; j < nk; ++j) {
      const V key = Vec::set1(widen(keys[j * p.k.row_stride + d * p.k.col_stride]));
      V g_sum = Vec::zero();
      for (int64_t lane = 0; lane < lanes; lane += W) {
        const V ds = Vec::load(ds_t + j * lanes + lane);
        const V t = tanh_vec<Vec>(Vec::add(key, Vec::load(q_t + d * lanes + lane)));
        const V g = Vec::mul(ds, Vec::sub(one, Vec::mul(t, t)));
        Vec::store(dq_t + d * lanes + lane, Vec::fmadd(w_d, g, Vec::load(dq_t + d * lanes + lane)));
        g_sum = Vec::add(g_sum, g);
        dw_sum = Vec::fmadd(ds, t, dw_sum);
      }
      dk_rows[j * dk_stride + d] += weight[d] * Vec::reduce_add(g_sum);
    }
    dw[d] += Vec::reduce_add(dw_sum);
  }
}

// One tile's softmax backward, from its scaled scores S^T (s_t) and dP^T = V . dO^T (dp_t), nk x lanes:
// soft-capping, bias, mask and band as in the forward, then P^T = exp(S^T - lse) times the dropout factor Z
// into s_t and dS^T = P o (dP o Z - D) (times the soft-cap derivative) into dp_t. cap_grad and z_t are
// scratch of the same size; lse (+inf on rows that attend nothing) and delta are per lane.
template <class Vec, class Mask>
void score_gradients(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                     typename Vec::T* s_t, typename Vec::T* dp_t, typename Vec::T* cap_grad, typename Vec::T* z_t,
                     const typename Vec::T* lse, const typename Vec::T* delta) {
  using T = typename Vec::T;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  soft_cap<Vec>(p, nk * lanes, s_t);
  // Soft-capping scales the score's gradient by d(cap tanh(s / cap))/ds = 1 - (capped / cap)^2.
  if (p.softcap > 0)
    for (int64_t e = 0; e < nk * lanes; ++e) {
      const T ratio = s_t[e] / static_cast<T>(p.softcap);
      cap_grad[e] = T(1) - ratio * ratio;
    }
  restrict_scores<Mask>(p, block, k0, nk, s_t, /*row_stride=*/1, /*key_stride=*/lanes);
  // With dropout (factor Z: 0 or 1 / (1 - p)), dV takes P o Z and dS = P o (dP o Z - D).
  const bool dropout = p.dropout_p > 0;
  if (dropout) {
    // Padding lanes get factor 0 too: the additive gradients sum over every lane.
    for (int64_t e = 0; e < nk * lanes; ++e) z_t[e] = T(0);
    apply_dropout(p, block, k0, nk, z_t, /*row_stride=*/1, /*key_stride=*/lanes, /*factor_only=*/true);
  }
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t lane = 0; lane < lanes; lane += W) {
      const int64_t e = j * lanes + lane;
      const V prob = exp_minus<Vec>(Vec::load(s_t + e), Vec::load(lse + lane));
      V dprob = Vec::load(dp_t + e);
      V kept = prob;
      if (dropout) {
        const V factor = Vec::load(z_t + e);
        dprob = Vec::mul(dprob, factor);
        kept = Vec::mul(prob, factor);
      }
      V ds = Vec::mul(prob, Vec::sub(dprob, Vec::load(delta + lane)));
      if (p.softcap > 0) ds = Vec::mul(ds, Vec::load(cap_grad + e));
      Vec::store(s_t + e, kept);
      Vec::store(dp_t + e, ds);
    }
}

// The steps of a work item, shared by the vector backward (backward_item) and the tile backward
// (amx_backward.h); only the query-block packing and the products of a key block differ between them.

// dQ of one query block: dQ^T (D x lanes) times the scale, transposed into dq, or into the item's slice
// when the keys are split into chunks.
template <class Vec>
void write_dq(const BackwardPlan<Vec>& plan, const KeyChunk& keys, int64_t head_in_group, const RowBlock& block,
              typename Vec::T* dq_t) {
  using T = typename Vec::T;
  using S = typename Vec::S;
  const AttnParams& p = *plan.p;
  const int64_t lanes = plan.lanes, dim = p.head_dim;
  const typename Vec::V scale = Vec::set1(static_cast<T>(p.scale));
  for (int64_t e = 0; e < dim * lanes; e += Vec::W) Vec::store(dq_t + e, Vec::mul(Vec::load(dq_t + e), scale));
  if (plan.chunks == 1)
    transpose_copy<Vec>(dim, block.nq, dq_t, lanes, 1, p.dq.row<S>(block.batch, block.head0, block.q0), p.dq.row_stride,
                        p.dq.col_stride);
  else
    transpose_copy<Vec>(dim, block.nq, dq_t, lanes, 1,
                        plan.dq_partial(block.batch, keys.kv_head, keys.chunk, head_in_group, block.q0), dim, 1);
}

// The (query head of the group, query block) loop of a work item. For each query block: dQ^T
// (dq_rows x lanes) is zeroed, pack(block) prepares the query side when some of the chunk's keys are
// visible, tile(block, k0, nk) runs each visible key block, and write_dq writes the block's dQ.
template <class Vec, class Pack, class Tile>
void for_each_query_block(const BackwardPlan<Vec>& plan, const KeyChunk& keys, typename Vec::T* dq_t, int64_t dq_rows,
                          Pack pack, Tile tile) {
  const AttnParams& p = *plan.p;
  for (int64_t g = 0; g < plan.group; ++g) {
    const int64_t head = keys.kv_head * plan.group + g;
    for (int64_t q_block = 0; q_block < plan.q_blocks; ++q_block) {
      const int64_t q0 = q_block * kBlockQ;
      const RowBlock block{keys.batch, head, 1, q0, min_i64(kBlockQ, p.len_q_of(keys.batch) - q0)};
      if (block.nq <= 0) break;  // past the end of a shorter sequence of a packed batch
      int64_t k_begin = keys.begin, k_end = keys.end;
      visible_keys(p, block, &k_begin, &k_end);
      fill_zero(dq_t, dq_rows * plan.lanes);
      if (k_begin < k_end) pack(block);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) tile(block, k0, min_i64(kBlockK, k_end - k0));
      write_dq(plan, keys, g, block, dq_t);
    }
  }
}

// dK and dV of the chunk's keys, from rows `dk_stride` / `dv_stride` apart, narrowed to the caller's
// storage; each dK element goes through finish_dk first.
template <class Vec, class FinishDk>
void write_key_gradients(const AttnParams& p, const KeyChunk& keys, const typename Vec::T* dk, int64_t dk_stride,
                         const typename Vec::T* dv, int64_t dv_stride, FinishDk finish_dk) {
  using S = typename Vec::S;
  for (int64_t j = keys.begin; j < keys.end; ++j) {
    S* dk_row = p.dk.row<S>(keys.batch, keys.kv_head, j);
    S* dv_row = p.dv.row<S>(keys.batch, keys.kv_head, j);
    for (int64_t d = 0; d < p.head_dim; ++d)
      narrow(dk_row + d * p.dk.col_stride, finish_dk(dk[(j - keys.begin) * dk_stride + d]));
    for (int64_t e = 0; e < p.value_dim; ++e)
      narrow(dv_row + e * p.dv.col_stride, dv[(j - keys.begin) * dv_stride + e]);
  }
}

// One key block of one query block: S^T and dP^T = V . dO^T, the score gradients, then the products
// dV += P . dO, dK += dS . (scale Q) and dQ^T += K^T . dS^T (additive scores: additive_gradient_tile).
template <class Vec, class Mask, class Score>
void backward_tile(const BackwardPlan<Vec>& plan, const KeyChunk& keys, const RowBlock& block, int64_t k0, int64_t nk,
                   const BackwardScratch<Vec>& w, typename Vec::T* dw) {
  using T = typename Vec::T;
  using S = typename Vec::S;
  const AttnParams& p = *plan.p;
  const int64_t lanes = plan.lanes;
  const S* k_rows = p.k.row<const S>(keys.batch, keys.kv_head, k0);
  WidenedProducts::scores<Vec, Score>(p, block, lanes, k0, nk, w.q_t, w.s_t);
  strided_times_packed<Vec, DotScore, /*kAccumulate=*/false>(nk, lanes, p.value_dim,
                                                             p.v.row<const S>(keys.batch, keys.kv_head, k0),
                                                             p.v.row_stride, p.v.col_stride, w.do_t, w.dp_t);
  score_gradients<Vec, Mask>(p, block, lanes, k0, nk, w.s_t, w.dp_t, w.cap_grad, w.z_t, w.lse, w.delta);
  T* dv_rows = w.dv + (k0 - keys.begin) * plan.value_dim_pad;
  T* dk_rows = w.dk + (k0 - keys.begin) * plan.dim_pad;
  strided_times_packed<Vec, DotScore, /*kAccumulate=*/true>(nk, plan.value_dim_pad, block.nq, w.s_t, lanes, 1,
                                                            w.do_rows, dv_rows);
  if constexpr (std::is_same_v<Score, AdditiveScore>) {
    additive_gradient_tile<Vec>(p, lanes, nk, k_rows, w.q_t, w.dp_t, w.dq_t, dk_rows, plan.dim_pad, dw);
  } else {
    strided_times_packed<Vec, DotScore, /*kAccumulate=*/true>(nk, plan.dim_pad, block.nq, w.dp_t, lanes, 1, w.q_rows,
                                                              dk_rows);
    strided_times_packed<Vec, DotScore, /*kAccumulate=*/true>(p.head_dim, lanes, nk, k_rows, p.k.col_stride,
                                                              p.k.row_stride, w.dp_t, w.dq_t);
  }
}

// One work item: keys [keys.begin, keys.end) of (batch, kv_head) against every query of the group.
template <class Vec, class Mask, class Score>
void backward_item(const BackwardPlan<Vec>& plan, int64_t item, int thread_id) {
  using T = typename Vec::T;
  const AttnParams& p = *plan.p;
  const KeyChunk keys = plan.key_chunk(item);
  const BackwardScratch<Vec> w(plan, thread_id);
  fill_zero(w.dk, plan.keys_per_chunk * plan.dim_pad);
  fill_zero(w.dv, plan.keys_per_chunk * plan.value_dim_pad);
  T* dw = nullptr;  // additive scores: this item's part of the score weights' gradient
  if constexpr (std::is_same_v<Score, AdditiveScore>) {
    dw = plan.dw_partials + item * p.head_dim;
    fill_zero(dw, p.head_dim);
  }
  auto pack = [&](const RowBlock& block) { pack_query_block(plan, block, w); };
  auto tile = [&](const RowBlock& block, int64_t k0, int64_t nk) {
    backward_tile<Vec, Mask, Score>(plan, keys, block, k0, nk, w, dw);
  };
  for_each_query_block(plan, keys, w.dq_t, p.head_dim, pack, tile);
  write_key_gradients<Vec>(p, keys, w.dk, plan.dim_pad, w.dv, plan.value_dim_pad, [](T x) { return x; });
}

// dQ = the sum of the chunks' slices, in chunk order.
template <class Vec>
void sum_dq_chunks(const BackwardPlan<Vec>& plan, int64_t row_index) {
  using T = typename Vec::T;
  const AttnParams& p = *plan.p;
  const int64_t query = row_index % p.len_q;
  const int64_t head = (row_index / p.len_q) % p.heads_q;
  const int64_t batch = row_index / p.len_q / p.heads_q;
  const int64_t kv_head = head / plan.group, g = head % plan.group;
  if (query >= p.len_q_of(batch)) return;
  typename Vec::S* dq_row = p.dq.row<typename Vec::S>(batch, head, query);
  for (int64_t d = 0; d < p.head_dim; ++d) {
    T total = 0;
    for (int64_t c = 0; c < plan.chunks; ++c) total += plan.dq_partial(batch, kv_head, c, g, query)[d];
    narrow(dq_row + d * p.dq.col_stride, total);
  }
}

// The decomposition of a backward call (no buffers): query blocks, lanes, padded dims and key chunks.
template <class Vec>
BackwardPlan<Vec> plan_backward(const AttnParams& p) {
  constexpr int W = Vec::W;
  BackwardPlan<Vec> plan{};
  plan.p = &p;
  plan.group = p.heads_q / p.heads_kv;
  plan.q_blocks = ceil_div(p.len_q, kBlockQ);
  plan.lanes = round_up(min_i64(p.len_q, kBlockQ), W);
  plan.dim_pad = round_up(p.head_dim, W);
  plan.value_dim_pad = round_up(p.value_dim, W);
  // Enough items for a typical machine even with one kv head, decided by the shape alone (determinism).
  constexpr int64_t kTargetItems = 8;
  const int64_t kv_heads = p.batch * p.heads_kv;
  const int64_t key_blocks = ceil_div(p.len_k > 0 ? p.len_k : 1, kBlockK);
  plan.chunks = min_i64(key_blocks, ceil_div(kTargetItems, kv_heads));
  plan.keys_per_chunk = kBlockK * ceil_div(key_blocks, plan.chunks);
  plan.chunks = ceil_div(key_blocks * kBlockK, plan.keys_per_chunk);
  return plan;
}

// Sums the chunks' dQ slices (when there are several) into dq, rows in parallel.
template <class Vec>
void finish_dq(const BackwardPlan<Vec>& plan) {
  if (plan.chunks == 1) return;
  const AttnParams& p = *plan.p;
  parallel_for(
      p.batch * p.heads_q * p.len_q, p.num_threads,
      [](void* context, int64_t row, int) { sum_dq_chunks<Vec>(*static_cast<const BackwardPlan<Vec>*>(context), row); },
      const_cast<BackwardPlan<Vec>*>(&plan));
}

// The backward pass for switches.h.
template <class Vec, class Mask, class Score>
struct BackwardPass {
  static void run(const AttnParams& p) {
    using T = typename Vec::T;
    BackwardPlan<Vec> plan = plan_backward<Vec>(p);
    const int64_t align = 64 / sizeof(T);
    plan.scratch_per_thread = round_up(BackwardScratch<Vec>::size(plan) + 16 * align, align);
    AlignedBuffer scratch(sizeof(T) * plan.scratch_per_thread * p.num_threads);
    plan.scratch = static_cast<T*>(scratch.data);
    AlignedBuffer partials(sizeof(T) * plan.dq_partials_size());
    plan.dq_partials = static_cast<T*>(partials.data);
    const int64_t items = plan.items();
    AlignedBuffer dw_partials(p.score_kind == ScoreKind::kAdditive ? sizeof(T) * items * p.head_dim : 0);
    plan.dw_partials = static_cast<T*>(dw_partials.data);

    parallel_for(
        items, p.num_threads,
        [](void* context, int64_t item, int thread_id) {
          backward_item<Vec, Mask, Score>(*static_cast<const BackwardPlan<Vec>*>(context), item, thread_id);
        },
        &plan);
    if (p.score_kind == ScoreKind::kAdditive) {
      T* dw = static_cast<T*>(p.dscore_weight);
      for (int64_t d = 0; d < p.head_dim; ++d) {
        T total = 0;
        for (int64_t item = 0; item < items; ++item) total += plan.dw_partials[item * p.head_dim + d];
        dw[d] = total;
      }
    }
    finish_dq(plan);
  }
};

template <template <class> class VecFor>
void backward(const AttnParams& p) {
  run_pass_for_dtype<VecFor, BackwardPass>(p);
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
