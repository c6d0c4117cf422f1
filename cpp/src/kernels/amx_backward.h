// The bfloat16 backward pass on AMX tiles. Included after attn_bwd_impl.h and amx_attention.h by the two
// amx translation units, which instantiate it with NativeTiles and ModelTiles.
//
// The structure is the vector backward's (attn_bwd_impl.h): work items over (batch, kv head, key chunk),
// query blocks of kBlockQ lanes, key blocks of kBlockK, P recomputed from the saved logsumexp, the same
// masks, band, ALiBi, soft-capping and dropout, D = rowsum(dO o O), dQ slices summed in chunk order; so
// the gradients are bit-identical at any thread count. Only the five products move to the matrix unit,
// each C (rows x cols, fp32) += A (rows x depth, bf16 rows) . B (depth/2 x cols, bf16 pairs):
//   S^T  (keys x lanes) = K rows  (keys x D)      . Q^T pairs  (D/2 x lanes)
//   dP^T (keys x lanes) = V rows  (keys x Dv)     . dO^T pairs (Dv/2 x lanes)
//   dV   (keys x Dv)   += P rows  (keys x lanes)  . dO pairs   (lanes/2 x Dv)
//   dK   (keys x D)    += dS rows (keys x lanes)  . Q pairs    (lanes/2 x D)     (times scale in fp32)
//   dQ^T (D x lanes)   += K^T     (D x keys)      . dS^T pairs (keys/2 x lanes)  (times scale in fp32)
// K, V and Q, dO are exact in bfloat16. P and dS are fp32 values: as operands they are split into two
// bfloat16 planes (hi + lo, split_planes), so each of their three products costs two tile products and
// the gradients keep the vector backward's fp32 accuracy. Rounding them to one bfloat16 plane (torch's
// bfloat16 backward does) measured 1.4-1.6x the mean error of the fp32 backward on the oracle cases of
// tests/test_half.py, beyond its 1.25x bound. The scale stays in fp32 (a pre-scaled bfloat16 Q would
// round once more).
//
// Padding: K and V rows of an item are packed once into zero-padded panels (16 rows past the chunk, depth
// to 32), and K^T beside them; a key block's last partial depth chunk of K^T comes from a zero-padded
// copy, so keys outside the block never meet the products (a NaN there cannot leak in through 0 * NaN).
// Rows of P / dS past the block's keys and lanes past its queries are zero, so the accumulator rows they
// touch (dK / dV rows of the next keys, padding) only ever gain +0.
#pragma once

#include "kernels/amx_attention.h"
#include "kernels/attn_bwd_impl.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// The sizes of the tile operands of one work item, in elements (all multiples of 16: 64-byte rows).
struct TileBackwardShape {
  int64_t lanes;        // query lanes of a block (a multiple of 16): the cols of S^T, dP^T, dQ^T
  int64_t lane_depth;   // lanes rounded up to 32: the depth of dV and dK
  int64_t d_depth;      // D rounded up to 32: the depth of S^T
  int64_t v_depth;      // Dv rounded up to 32: the depth of dP^T
  int64_t d_cols;       // D rounded up to 16: the cols of dK, the rows of dQ^T and K^T
  int64_t v_cols;       // Dv rounded up to 16: the cols of dV
  int64_t panel_rows;   // keys_per_chunk + 16: K / V rows and dK / dV rows (a C tile of 16 past any key)
  int64_t keys;         // keys_per_chunk: the columns of K^T
};

// The scratch of one thread, carved from one aligned block; every region starts on 64 bytes.
constexpr int kGradPlanes = 2;  // bfloat16 planes of the P and dS operands (see the top of the file)

struct TileBackwardScratch {
  uint16_t *k_rows, *v_rows, *k_t, *k_t_tail, *p_rows[kGradPlanes], *ds_rows[kGradPlanes];
  uint32_t *q_pairs, *do_pairs, *q_row_pairs, *do_row_pairs, *ds_pairs[kGradPlanes];
  float *q_t, *do_t, *q_rows, *do_rows, *s_t, *dp_t, *cap_grad, *z_t, *dq_t, *lse, *delta, *dk, *dv;

  // Walks the regions in order; with base == nullptr it only counts (bytes).
  static int64_t carve(const TileBackwardShape& s, char* base, TileBackwardScratch* out) {
    int64_t used = 0;
    auto take = [&](int64_t bytes) {
      char* start = base ? base + used : nullptr;
      used += round_up(bytes, 64);
      return start;
    };
    const int64_t lanes = s.lanes;
    TileBackwardScratch r{};
    r.k_rows = reinterpret_cast<uint16_t*>(take(2 * s.panel_rows * s.d_depth));
    r.v_rows = reinterpret_cast<uint16_t*>(take(2 * s.panel_rows * s.v_depth));
    r.k_t = reinterpret_cast<uint16_t*>(take(2 * s.d_cols * s.keys));
    r.k_t_tail = reinterpret_cast<uint16_t*>(take(2 * s.d_cols * kTileDepth));
    for (int plane = 0; plane < kGradPlanes; ++plane) {
      r.p_rows[plane] = reinterpret_cast<uint16_t*>(take(2 * kBlockK * s.lane_depth));
      r.ds_rows[plane] = reinterpret_cast<uint16_t*>(take(2 * kBlockK * s.lane_depth));
      r.ds_pairs[plane] = reinterpret_cast<uint32_t*>(take(4 * kBlockK / 2 * lanes));
    }
    r.q_pairs = reinterpret_cast<uint32_t*>(take(4 * s.d_depth / 2 * lanes));
    r.do_pairs = reinterpret_cast<uint32_t*>(take(4 * s.v_depth / 2 * lanes));
    r.q_row_pairs = reinterpret_cast<uint32_t*>(take(4 * s.lane_depth / 2 * s.d_cols));
    r.do_row_pairs = reinterpret_cast<uint32_t*>(take(4 * s.lane_depth / 2 * s.v_cols));
    r.q_t = reinterpret_cast<float*>(take(4 * s.d_depth * lanes));
    r.do_t = reinterpret_cast<float*>(take(4 * s.v_depth * lanes));
    r.q_rows = reinterpret_cast<float*>(take(4 * lanes * s.d_cols));
    r.do_rows = reinterpret_cast<float*>(take(4 * lanes * s.v_cols));
    r.s_t = reinterpret_cast<float*>(take(4 * kBlockK * lanes));
    r.dp_t = reinterpret_cast<float*>(take(4 * kBlockK * lanes));
    r.cap_grad = reinterpret_cast<float*>(take(4 * kBlockK * lanes));
    r.z_t = reinterpret_cast<float*>(take(4 * kBlockK * lanes));
    r.dq_t = reinterpret_cast<float*>(take(4 * s.d_cols * lanes));
    r.lse = reinterpret_cast<float*>(take(4 * lanes));
    r.delta = reinterpret_cast<float*>(take(4 * lanes));
    r.dk = reinterpret_cast<float*>(take(4 * s.panel_rows * s.d_cols));
    r.dv = reinterpret_cast<float*>(take(4 * s.panel_rows * s.v_cols));
    if (out) *out = r;
    return used;
  }
};

template <class Vec>
struct TileBackwardPlan {
  BackwardPlan<Vec> base;  // the vector backward's plan: chunks, dQ slices (its scratch fields unused)
  TileBackwardShape shape;
  char* scratch;
  int64_t scratch_per_thread;  // bytes
};

// The K and V rows of keys [begin, begin + shape.panel_rows) (zero from `end` on and past D / Dv), and
// K^T (d_cols x keys) from them.
template <class Vec>
void pack_key_panels(const AttnParams& p, const TileBackwardShape& s, int64_t batch, int64_t kv_head, int64_t begin,
                     int64_t end, const TileBackwardScratch& w) {
  using S = typename Vec::S;
  float* row = w.s_t;  // kBlockK * lanes >= 1024 floats, free until the key loop (D, Dv <= 512)
  uint16_t* k_planes[1] = {w.k_rows};
  uint16_t* v_planes[1] = {w.v_rows};
  for (int64_t j = 0; j < s.panel_rows; ++j) {
    const bool live = begin + j < end;
    if (live) widen_row(p.k.row<const S>(batch, kv_head, begin + j), p.head_dim, p.k.col_stride, row);
    pack_row<Bf16Encoding, 1>(row, live ? p.head_dim : 0, s.d_depth, k_planes, j * s.d_depth);
    if (live) widen_row(p.v.row<const S>(batch, kv_head, begin + j), p.value_dim, p.v.col_stride, row);
    pack_row<Bf16Encoding, 1>(row, live ? p.value_dim : 0, s.v_depth, v_planes, j * s.v_depth);
  }
  for (int64_t d = 0; d < s.d_cols; ++d)
    for (int64_t j = 0; j < s.keys; ++j) w.k_t[d * s.keys + j] = w.k_rows[j * s.d_depth + d];
}

// Everything about one query block that the key loop reads: Q^T pairs, Q row pairs, dO^T pairs, dO row
// pairs (all zero in the padding lanes), the logsumexp (+inf where a row attends nothing or is padding,
// so that its P is exp(-inf) = 0) and D.
template <class Vec>
void pack_query_tiles(const AttnParams& p, const TileBackwardShape& s, const RowBlock& block,
                      const TileBackwardScratch& w) {
  using S = typename Vec::S;
  const int64_t lanes = s.lanes, nq = block.nq;
  const S* q = p.q.row<const S>(block.batch, block.head0, block.q0);
  const S* dout = p.dout.row<const S>(block.batch, block.head0, block.q0);
  for (int64_t e = 0; e < p.head_dim * lanes; ++e) w.q_t[e] = 0.0f;
  for (int64_t e = 0; e < p.value_dim * lanes; ++e) w.do_t[e] = 0.0f;
  transpose_copy<Vec>(nq, p.head_dim, q, p.q.row_stride, p.q.col_stride, w.q_t, lanes, 1);
  transpose_copy<Vec>(nq, p.value_dim, dout, p.dout.row_stride, p.dout.col_stride, w.do_t, lanes, 1);
  pack_rows<float>(nq, p.head_dim, q, p.q.row_stride, p.q.col_stride, 1.0f, w.q_rows, lanes, s.d_cols);
  pack_rows<float>(nq, p.value_dim, dout, p.dout.row_stride, p.dout.col_stride, 1.0f, w.do_rows, lanes, s.v_cols);
  uint32_t* q_pairs[1] = {w.q_pairs};
  uint32_t* do_pairs[1] = {w.do_pairs};
  uint32_t* q_row_pairs[1] = {w.q_row_pairs};
  uint32_t* do_row_pairs[1] = {w.do_row_pairs};
  pack_pairs<Bf16Encoding, 1>(w.q_t, lanes, p.head_dim, s.d_depth / 2, lanes, q_pairs, lanes);
  pack_pairs<Bf16Encoding, 1>(w.do_t, lanes, p.value_dim, s.v_depth / 2, lanes, do_pairs, lanes);
  pack_pairs<Bf16Encoding, 1>(w.q_rows, s.d_cols, nq, s.lane_depth / 2, s.d_cols, q_row_pairs, s.d_cols);
  pack_pairs<Bf16Encoding, 1>(w.do_rows, s.v_cols, nq, s.lane_depth / 2, s.v_cols, do_row_pairs, s.v_cols);
  pack_row_statistics<Vec>(p, block, lanes, w.lse, w.delta);
}

// One key block of one query block on the tiles: S^T and dP^T, the vector backward's score gradients, then
// dV, dK (unscaled) and dQ^T^T from P and dS in kGradPlanes bfloat16 planes.
template <class Tiles, class Vec, class Mask>
void tile_backward_block(const AttnParams& p, const TileBackwardShape& s, const TileBackwardScratch& w,
                         const KeyChunk& keys, const RowBlock& block, int64_t k0, int64_t nk) {
  constexpr int W = Vec::W;
  static_assert(W == kTileCols, "the vector lanes are the C tile's 16 columns");
  const int64_t lanes = s.lanes;
  const int64_t rows = round_up(nk, kTileRows), depth = round_up(nk, kTileDepth), offset = k0 - keys.begin;
  const uint32_t* q_pairs[1] = {w.q_pairs};
  const uint32_t* do_pairs[1] = {w.do_pairs};
  const uint32_t* q_row_pairs[1] = {w.q_row_pairs};
  const uint32_t* do_row_pairs[1] = {w.do_row_pairs};
  const uint32_t* ds_pairs[2] = {w.ds_pairs[0], w.ds_pairs[1]};
  // S^T and dP^T: rows past nk come from the panels' zero rows (or the next keys) and are never read.
  auto k_at = [&](int64_t, const uint16_t** a, int64_t* stride) {
    a[0] = w.k_rows + offset * s.d_depth;
    *stride = s.d_depth;
  };
  tile_product<Tiles, Bf16Tiles, 1, 1, /*kAccumulate=*/false>(rows, lanes, s.d_depth, k_at, q_pairs, lanes, w.s_t,
                                                               lanes);
  auto v_at = [&](int64_t, const uint16_t** a, int64_t* stride) {
    a[0] = w.v_rows + offset * s.v_depth;
    *stride = s.v_depth;
  };
  tile_product<Tiles, Bf16Tiles, 1, 1, /*kAccumulate=*/false>(rows, lanes, s.v_depth, v_at, do_pairs, lanes, w.dp_t,
                                                               lanes);
  const __m512 scale = _mm512_set1_ps(static_cast<float>(p.scale));
  for (int64_t e = 0; e < nk * lanes; e += W) Vec::store(w.s_t + e, Vec::mul(Vec::load(w.s_t + e), scale));
  score_gradients<Vec, Mask>(p, block, lanes, k0, nk, w.s_t, w.dp_t, w.cap_grad, w.z_t, w.lse, w.delta);
  // P and dS as A rows (keys x lanes; zero rows past nk, zero depth past lanes), dS^T as pairs (zero
  // pair rows past nk); each in kGradPlanes bfloat16 planes.
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t count = j < nk ? lanes : 0;
    pack_row<Bf16Encoding, kGradPlanes>(w.s_t + j * lanes, count, s.lane_depth, w.p_rows, j * s.lane_depth);
    pack_row<Bf16Encoding, kGradPlanes>(w.dp_t + j * lanes, count, s.lane_depth, w.ds_rows, j * s.lane_depth);
  }
  pack_pairs<Bf16Encoding, kGradPlanes>(w.dp_t, lanes, nk, depth / 2, lanes, w.ds_pairs, lanes);

  auto p_at = [&](int64_t, const uint16_t** a, int64_t* stride) {
    for (int plane = 0; plane < kGradPlanes; ++plane) a[plane] = w.p_rows[plane];
    *stride = s.lane_depth;
  };
  tile_product<Tiles, Bf16Tiles, kGradPlanes, 1, /*kAccumulate=*/true>(
      rows, s.v_cols, s.lane_depth, p_at, do_row_pairs, s.v_cols, w.dv + offset * s.v_cols, s.v_cols);
  auto ds_at = [&](int64_t, const uint16_t** a, int64_t* stride) {
    for (int plane = 0; plane < kGradPlanes; ++plane) a[plane] = w.ds_rows[plane];
    *stride = s.lane_depth;
  };
  tile_product<Tiles, Bf16Tiles, kGradPlanes, 1, /*kAccumulate=*/true>(
      rows, s.d_cols, s.lane_depth, ds_at, q_row_pairs, s.d_cols, w.dk + offset * s.d_cols, s.d_cols);
  // K^T's last partial depth chunk: a zero-padded copy of its `tail` keys.
  const int64_t tail = nk % kTileDepth;
  if (tail) {
    const int64_t first = offset + nk - tail;
    for (int64_t d = 0; d < s.d_cols; ++d)
      for (int64_t j = 0; j < kTileDepth; ++j)
        w.k_t_tail[d * kTileDepth + j] = j < tail ? w.k_t[d * s.keys + first + j] : 0;
  }
  auto kt_at = [&](int64_t d, const uint16_t** a, int64_t* stride) {
    const bool partial = tail && d + kTileDepth > nk;
    a[0] = partial ? w.k_t_tail - d : w.k_t + offset;
    *stride = partial ? kTileDepth : s.keys;
  };
  tile_product<Tiles, Bf16Tiles, 1, kGradPlanes, /*kAccumulate=*/true>(s.d_cols, lanes, depth, kt_at, ds_pairs, lanes,
                                                                        w.dq_t, lanes);
}

// One work item: keys [keys.begin, keys.end) of (batch, kv_head) against every query of the group; the
// vector backward's steps (attn_bwd_impl.h) with the tiles' packing and products.
template <class Tiles, class Vec, class Mask>
void tile_backward_item(const TileBackwardPlan<Vec>& tplan, int64_t item, int thread_id) {
  const BackwardPlan<Vec>& plan = tplan.base;
  const TileBackwardShape& s = tplan.shape;
  const AttnParams& p = *plan.p;
  const KeyChunk keys = plan.key_chunk(item);
  TileBackwardScratch w;
  TileBackwardScratch::carve(s, tplan.scratch + thread_id * tplan.scratch_per_thread, &w);
  fill_zero(w.dk, s.panel_rows * s.d_cols);
  fill_zero(w.dv, s.panel_rows * s.v_cols);
  if (keys.begin < keys.end) pack_key_panels<Vec>(p, s, keys.batch, keys.kv_head, keys.begin, keys.end, w);
  Tiles::configure();
  auto pack = [&](const RowBlock& block) { pack_query_tiles<Vec>(p, s, block, w); };
  auto tile = [&](const RowBlock& block, int64_t k0, int64_t nk) {
    tile_backward_block<Tiles, Vec, Mask>(p, s, w, keys, block, k0, nk);
  };
  // dQ^T is s.d_cols x lanes; s.lanes is plan.lanes whenever there is a query block (Lq >= 1).
  for_each_query_block(plan, keys, w.dq_t, s.d_cols, pack, tile);
  Tiles::release();
  const float scale_k = static_cast<float>(p.scale);
  write_key_gradients<Vec>(p, keys, w.dk, s.d_cols, w.dv, s.v_cols, [scale_k](float x) { return x * scale_k; });
}

template <class Tiles, class Vec, class Mask>
void run_backward_tiles(const AttnParams& p) {
  TileBackwardPlan<Vec> tplan{};
  BackwardPlan<Vec>& plan = tplan.base;
  plan = plan_backward<Vec>(p);  // the vector backward's chunks: the same decomposition, by shape alone

  TileBackwardShape& s = tplan.shape;
  s.lanes = plan.lanes > 0 ? plan.lanes : kTileCols;
  s.lane_depth = round_up(s.lanes, kTileDepth);
  s.d_depth = round_up(p.head_dim, kTileDepth);
  s.v_depth = round_up(p.value_dim, kTileDepth);
  s.d_cols = plan.dim_pad;
  s.v_cols = plan.value_dim_pad;
  s.keys = plan.keys_per_chunk;
  s.panel_rows = plan.keys_per_chunk + kTileRows;
  tplan.scratch_per_thread = TileBackwardScratch::carve(s, nullptr, nullptr);
  AlignedBuffer scratch(tplan.scratch_per_thread * p.num_threads);
  tplan.scratch = static_cast<char*>(scratch.data);
  AlignedBuffer partials(sizeof(float) * plan.dq_partials_size());
  plan.dq_partials = static_cast<float*>(partials.data);

  parallel_for(
      plan.items(), p.num_threads,
      [](void* context, int64_t item, int thread_id) {
        tile_backward_item<Tiles, Vec, Mask>(*static_cast<const TileBackwardPlan<Vec>*>(context), item, thread_id);
      },
      &tplan);
  finish_dq(plan);
}

// The bfloat16 backward of dot-product scores on the tiles; false (nothing done) for every other call,
// which the vector backward serves.
template <class Tiles>
bool backward_on_tiles(const AttnParams& p) {
  if (p.dtype != DType::kBFloat16 || p.score_kind != ScoreKind::kDot) return false;
  by_mask_kind(p.mask_kind, [&](auto mask) {
    run_backward_tiles<Tiles, WithStorage<VecAvx512<float>, BFloat16>, decltype(mask)>(p);
  });
  return true;
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
