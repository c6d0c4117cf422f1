// The prefill forward pass on AMX tiles. Included after attn_fwd_impl.h and amx_tiles.h by the two amx
// translation units, which instantiate it with NativeTiles and ModelTiles.
//
// The layout is the vector path's "queries in lanes" (attn_fwd_impl.h), so the online softmax, the
// masks, the band, ALiBi, soft-capping, dropout, the key splits and the output are that path's code; only
// the two products of a tile move to the matrix unit:
//   S^T (keys x lanes)   = K panel (keys x D, A tiles)    . Q^T pairs (D/2 x lanes, B tiles)
//   O^T (Dv x lanes)    += V^T panel (Dv x keys, A tiles) . P^T pairs (keys/2 x lanes, B tiles)
// K and V^T are packed once per (batch, kv head) into zero-padded 16-bit panels shared by every query
// block and every query head of its group (KvPanels); Q^T is packed once per work item, P^T per key
// block. Scores are scaled in fp32 as they leave the tiles (pre-scaling a 16-bit Q would round once more).
//
// Precision: an operand is one or two 16-bit planes (hi, and lo = x - hi). A float16 value is exactly
// hi + lo in bfloat16 (11 significant bits within 2 x 8), so three bf16 products (hi.hi + hi.lo + lo.hi;
// lo.lo is below 2^-16 relative) give float16 inputs fp32-accurate scores; float32 inputs get ~2^-16
// (precision="high", bf16x3) or one product at bf16's 2^-9 (precision="medium"). bfloat16 inputs need one
// plane; P is rounded to bf16 for P.V as torch does.
#pragma once

#include "kernels/amx_tiles.h"
#include "kernels/forward.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// ---------------------------------------------------------------------------------------------------
// 16-bit encodings of fp32 vectors: 16 values, each in the low half of a 32-bit lane.
struct Bf16Encoding {
  static __m512i encode(__m512 x) {  // round to nearest even; a NaN stays a (quiet) NaN
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  }
  static __m512 decode(__m512i halves) { return _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16)); }
  template <class Tiles, int kC, int kA, int kB>
  static void dot() { Tiles::template dot_bf16<kC, kA, kB>(); }
};

struct Fp16Encoding {
  static __m512i encode(__m512 x) {
    return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static __m512 decode(__m512i halves) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(halves)); }
  template <class Tiles, int kC, int kA, int kB>
  static void dot() { Tiles::template dot_fp16<kC, kA, kB>(); }
};

// x as kPlanes 16-bit planes whose sum is x to twice the encoding's precision: hi, then lo = x - hi. A
// non-finite x (or one whose hi overflows) becomes hi = 0, lo = x: a product sums hi.hi + hi.lo + lo.hi, so
// x then meets only the other operand's hi plane, and inf * p stays inf instead of inf + inf * 0 = NaN.
template <class Encoding, int kPlanes>
inline void split_planes(__m512 x, __m512i planes[]) {
  static_assert(kPlanes == 1 || kPlanes == 2, "an operand is one or two planes");
  planes[0] = Encoding::encode(x);
  if constexpr (kPlanes == 2) {
    const __m512 hi = Encoding::decode(planes[0]);
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(hi, hi), _mm512_setzero_ps(), _CMP_EQ_OQ);
    planes[1] = _mm512_mask_mov_epi32(Encoding::encode(x), finite, Encoding::encode(_mm512_sub_ps(x, hi)));
    planes[0] = _mm512_maskz_mov_epi32(finite, planes[0]);
  }
}

// The precision of the tile products: the encoding, and the planes of each operand. A product
// sums plane pairs (a, b) with a + b <= 1: hi.hi, hi.lo, lo.hi.
template <class Encoding_, int kScorePlanes_, int kValuePlanes_, int kProbPlanes_>
struct TileMode {
  using Encoding = Encoding_;
  static constexpr int kScorePlanes = kScorePlanes_;  // Q and K
  static constexpr int kValuePlanes = kValuePlanes_;  // V
  static constexpr int kProbPlanes = kProbPlanes_;    // P
};
using Bf16Tiles = TileMode<Bf16Encoding, 1, 1, 1>;    // bfloat16 inputs; float32 "medium"
using Bf16x3Tiles = TileMode<Bf16Encoding, 2, 2, 2>;  // float16 (exact) and float32 "high"
// float16 on AMX-FP16: Q, K, V exact; P rounded to float16 for P.V, as torch's float16 path rounds it to
// the input dtype (one plane also keeps inf * p = inf: a split P would add inf * 0 through its lo plane).
using Fp16Tiles = TileMode<Fp16Encoding, 1, 1, 1>;

// ---------------------------------------------------------------------------------------------------
// Packing. Rows of 16-bit planes (A operands) and rows of pairs (B operands), from fp32 sources.

// dst[plane][c] for c < width (a multiple of 16): the planes of src[c], zero past `count`.
template <class Encoding, int kPlanes>
inline void pack_row(const float* src, int64_t count, int64_t width, uint16_t* const dst[], int64_t offset) {
  for (int64_t c = 0; c < width; c += 16) {
    const __mmask16 valid = count - c >= 16 ? __mmask16(0xFFFF) : count > c ? __mmask16((1u << (count - c)) - 1) : 0;
    __m512i planes[kPlanes];
    split_planes<Encoding, kPlanes>(_mm512_maskz_loadu_ps(valid, src + c), planes);
    for (int plane = 0; plane < kPlanes; ++plane)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[plane] + offset + c), _mm512_cvtepi32_epi16(planes[plane]));
  }
}

// Pair row t of dst = rows (2t, 2t + 1) of src (src_rows x cols fp32, `src_stride` apart; rows past
// src_rows are zero), for t < pair_rows; cols a multiple of 16.
template <class Encoding, int kPlanes>
inline void pack_pairs(const float* src, int64_t src_stride, int64_t src_rows, int64_t pair_rows, int64_t cols,
                       uint32_t* const dst[], int64_t dst_stride) {
  const __m512i low_half = _mm512_set1_epi32(0xFFFF);
  for (int64_t t = 0; t < pair_rows; ++t)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512 even = 2 * t < src_rows ? _mm512_loadu_ps(src + 2 * t * src_stride + c) : _mm512_setzero_ps();
      const __m512 odd = 2 * t + 1 < src_rows ? _mm512_loadu_ps(src + (2 * t + 1) * src_stride + c) : _mm512_setzero_ps();
      __m512i even_planes[kPlanes], odd_planes[kPlanes];
      split_planes<Encoding, kPlanes>(even, even_planes);
      split_planes<Encoding, kPlanes>(odd, odd_planes);
      for (int plane = 0; plane < kPlanes; ++plane)
        _mm512_storeu_si512(dst[plane] + t * dst_stride + c,
                            _mm512_or_si512(_mm512_slli_epi32(odd_planes[plane], 16),
                                            _mm512_and_si512(even_planes[plane], low_half)));
    }
}

// dst[0, count) = src[0, count) widened to fp32 (any storage, any stride).
template <class S>
inline void widen_row(const S* src, int64_t count, int64_t stride, float* dst) {
  if (stride == 1) return widen_contiguous(src, count, dst);
  for (int64_t i = 0; i < count; ++i) dst[i] = widen(src[i * stride]);
}

// K and V^T of kv heads [first, first + count) (units: batch * Hkv + kv head), as 16-bit planes:
//   K panel   (k_rows x d_pad):   row j = key j; k_rows = Lk + 16, so the four key tiles of any block
//             starting at any key stay inside; d_pad = D rounded up to the tile depth (32);
//   V^T panel (v_rows x v_cols):  row e = value dim e, column j = key j; v_rows = Dv rounded up to 16.
// Padding is zero: padded depth contributes 0, padded keys give score rows the softmax never reads.
template <class Mode>
struct KvPanels {
  static constexpr int kScorePlanes = Mode::kScorePlanes, kValuePlanes = Mode::kValuePlanes;
  int64_t k_rows, d_pad, v_rows, v_cols, per_unit;  // per_unit in uint16 elements
  int64_t first = 0;
  uint16_t* data = nullptr;

  explicit KvPanels(const AttnParams& p)
      : k_rows(p.len_k + kTileRows),
        d_pad(round_up(p.head_dim, kTileDepth)),
        v_rows(round_up(p.value_dim, kTileRows)),
        v_cols(round_up(p.len_k > 0 ? p.len_k : 1, 16)),
        per_unit(k_rows * d_pad * kScorePlanes + v_rows * v_cols * kValuePlanes) {}

  uint16_t* k_plane(int64_t unit, int plane) const {
    return data + (unit - first) * per_unit + plane * k_rows * d_pad;
  }
  uint16_t* v_plane(int64_t unit, int plane) const {
    return data + (unit - first) * per_unit + kScorePlanes * k_rows * d_pad + plane * v_rows * v_cols;
  }

  // Packs one unit; `row` is fp32 scratch of max(d_pad, 256) floats.
  template <class S>
  void pack(const AttnParams& p, int64_t unit, float* row) const {
    const int64_t batch = unit / p.heads_kv, kv_head = unit % p.heads_kv, len = p.len_k_of(batch);
    uint16_t* k[kScorePlanes];
    for (int plane = 0; plane < kScorePlanes; ++plane) k[plane] = k_plane(unit, plane);
    for (int64_t j = 0; j < k_rows; ++j) {
      const int64_t count = j < len ? p.head_dim : 0;
      if (count) widen_row(p.k.row<const S>(batch, kv_head, j), count, p.k.col_stride, row);
      pack_row<typename Mode::Encoding, kScorePlanes>(row, count, d_pad, k, j * d_pad);
    }
    // V^T in 16 x 16 blocks: widen 16 keys' rows, transpose in registers, pack each row of 16 keys.
    uint16_t* vt[kValuePlanes];
    for (int plane = 0; plane < kValuePlanes; ++plane) vt[plane] = v_plane(unit, plane);
    float* block = row;            // 16 keys x 16 dims
    float* block_t = row + 16 * 16;  // 16 dims x 16 keys
    for (int64_t j0 = 0; j0 < v_cols; j0 += 16)
      for (int64_t e0 = 0; e0 < v_rows; e0 += 16) {
        const int64_t dims = min_i64(16, p.value_dim - e0);
        for (int64_t r = 0; r < 16; ++r) {
          for (int64_t e = 0; e < 16; ++e) block[r * 16 + e] = 0.0f;
          if (j0 + r < len && dims > 0)
            widen_row(p.v.row<const S>(batch, kv_head, j0 + r) + e0 * p.v.col_stride, dims, p.v.col_stride, block + r * 16);
        }
        VecAvx512<float>::transpose(block, 16, block_t, 16);
        for (int64_t e = 0; e < 16; ++e)
          pack_row<typename Mode::Encoding, kValuePlanes>(block_t + e * 16, 16, 16, vt, (e0 + e) * v_cols + j0);
      }
  }
  // fp32 scratch of pack(): a widened K row, or two 16 x 16 blocks of V.
  static constexpr int64_t kRowScratch = kMaxHeadDim;  // >= d_pad (D <= kMaxHeadDim, a multiple of 32) and 2 x 256
};

// ---------------------------------------------------------------------------------------------------
// The tile product: C (rows x cols fp32, c_stride floats apart) (+)= A . B over `depth`, where A(r, d) is
// element d of row r of A planes (16-bit, `a_stride` apart) and B is pairs (depth/2 rows x cols words,
// `b_stride` apart). rows, cols: multiples of 16; depth: a multiple of 32. `a_at(d, planes, &stride)`
// gives the A planes for depth chunk [d, d + 32) (the P.V product substitutes a zero-padded copy for its
// last, partial chunk).
//
// Tile registers, 2-2-4 pattern: tmm0-3 the 2 x 2 C tiles, tmm4-5 the two A tiles, tmm6-7 the two B tiles,
// so each depth step loads 2 + 2 tiles for 4 products; a 1-wide edge uses the first row / column only.
template <class Tiles, class Mode, int kAPlanes, int kBPlanes, bool kAccumulate, int kM, int kN, class AAt>
inline void tile_block(int64_t row0, int64_t col0, int64_t depth, AAt a_at, const uint32_t* const b[], int64_t b_stride,
                       float* c, int64_t c_stride) {
  using Encoding = typename Mode::Encoding;
  using I0 = std::integral_constant<int, 0>;
  using I1 = std::integral_constant<int, 1>;
  // f(i, j) over the kM x kN C tiles, with i, j compile-time (tile register numbers are immediates).
  auto each_c = [](auto f) {
    f(I0{}, I0{});
    if constexpr (kN > 1) f(I0{}, I1{});
    if constexpr (kM > 1) f(I1{}, I0{});
    if constexpr (kM > 1 && kN > 1) f(I1{}, I1{});
  };
  auto c_at = [&](int i, int j) { return c + (row0 + 16 * i) * c_stride + col0 + 16 * j; };
  each_c([&](auto i, auto j) {
    constexpr int kC = 2 * decltype(i)::value + decltype(j)::value;
    if constexpr (kAccumulate)
      Tiles::template load<kC>(c_at(i, j), c_stride * 4);
    else
      Tiles::template zero<kC>();
  });
  for (int64_t d = 0; d < depth; d += kTileDepth) {
    const uint16_t* a[2];
    int64_t a_stride;
    a_at(d, a, &a_stride);
    int loaded_a = -1, loaded_b = -1;
    for (int a_plane = 0; a_plane < kAPlanes; ++a_plane)
      for (int b_plane = 0; b_plane < kBPlanes; ++b_plane) {
        if (a_plane + b_plane > 1) continue;  // lo.lo: below the precision the split aims at
        if (loaded_a != a_plane) {
          Tiles::template load<4>(a[a_plane] + row0 * a_stride + d, a_stride * 2);
          if constexpr (kM > 1) Tiles::template load<5>(a[a_plane] + (row0 + 16) * a_stride + d, a_stride * 2);
          loaded_a = a_plane;
        }
        if (loaded_b != b_plane) {
          Tiles::template load<6>(b[b_plane] + d / 2 * b_stride + col0, b_stride * 4);
          if constexpr (kN > 1) Tiles::template load<7>(b[b_plane] + d / 2 * b_stride + col0 + 16, b_stride * 4);
          loaded_b = b_plane;
        }
        each_c([&](auto i, auto j) {
          constexpr int kI = decltype(i)::value, kJ = decltype(j)::value;
          Encoding::template dot<Tiles, 2 * kI + kJ, 4 + kI, 6 + kJ>();
        });
      }
  }
  each_c([&](auto i, auto j) {
    constexpr int kC = 2 * decltype(i)::value + decltype(j)::value;
    Tiles::template store<kC>(c_at(i, j), c_stride * 4);
  });
}

template <class Tiles, class Mode, int kAPlanes, int kBPlanes, bool kAccumulate, class AAt>
inline void tile_product(int64_t rows, int64_t cols, int64_t depth, AAt a_at, const uint32_t* const b[], int64_t b_stride,
                         float* c, int64_t c_stride) {
  for (int64_t r = 0; r < rows; r += 32)
    for (int64_t n = 0; n < cols; n += 32) {
      const bool two_rows = rows - r > 16, two_cols = cols - n > 16;
      if (two_rows && two_cols)
        tile_block<Tiles, Mode, kAPlanes, kBPlanes, kAccumulate, 2, 2>(r, n, depth, a_at, b, b_stride, c, c_stride);
      else if (two_rows)
        tile_block<Tiles, Mode, kAPlanes, kBPlanes, kAccumulate, 2, 1>(r, n, depth, a_at, b, b_stride, c, c_stride);
      else if (two_cols)
        tile_block<Tiles, Mode, kAPlanes, kBPlanes, kAccumulate, 1, 2>(r, n, depth, a_at, b, b_stride, c, c_stride);
      else
        tile_block<Tiles, Mode, kAPlanes, kBPlanes, kAccumulate, 1, 1>(r, n, depth, a_at, b, b_stride, c, c_stride);
    }
}

// ---------------------------------------------------------------------------------------------------
// The layout: QueryLanes with its two products on the tiles.
template <class Tiles, class Mode>
struct AmxQueryLanes : QueryLanes {
  static constexpr int64_t kValueRowMultiple = kTileRows;  // O^T tiles are 16 value rows
  static constexpr int kScorePlanes = Mode::kScorePlanes, kValuePlanes = Mode::kValuePlanes,
                       kProbPlanes = Mode::kProbPlanes;
  using Encoding = typename Mode::Encoding;

  // The per-thread scratch after S^T, in floats: Q^T (fp32, d_pad x lanes) | Q^T pairs (planes) |
  // P^T pairs (planes) | the last partial key chunk of V^T (planes, v_rows x 32 16-bit values).
  struct Regions {
    float* q_t;
    uint32_t* q_pairs[2];
    uint32_t* p_pairs[2];
    uint16_t* v_tail[2];
  };
  static Regions regions(const AttnParams& p, int64_t lanes, float* base) {
    const int64_t d_pad = round_up(p.head_dim, kTileDepth), v_rows = round_up(p.value_dim, kTileRows);
    Regions r{};
    r.q_t = base;
    float* next = base + d_pad * lanes;
    for (int plane = 0; plane < kScorePlanes; ++plane, next += d_pad / 2 * lanes)
      r.q_pairs[plane] = reinterpret_cast<uint32_t*>(next);
    for (int plane = 0; plane < kProbPlanes; ++plane, next += kBlockK / 2 * lanes)
      r.p_pairs[plane] = reinterpret_cast<uint32_t*>(next);
    for (int plane = 0; plane < kValuePlanes; ++plane, next += v_rows * kTileDepth / 2)
      r.v_tail[plane] = reinterpret_cast<uint16_t*>(next);
    return r;
  }
  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t lanes) {
    const int64_t d_pad = round_up(p.head_dim, kTileDepth), v_rows = round_up(p.value_dim, kTileRows);
    return lanes * kBlockK + d_pad * lanes + kScorePlanes * d_pad / 2 * lanes + kProbPlanes * kBlockK / 2 * lanes +
           kValuePlanes * v_rows * kTileDepth / 2;
  }

  template <class Vec, class Mask, class Score>
  static void run(const ForwardPlan<Vec>& plan, const RowBlock& block, int64_t k_begin, int64_t k_end,
                  const Accumulators<float>& acc, float* scratch) {
    static_assert(std::is_same_v<Score, DotScore>, "the tiles compute dot-product scores only");
    const AttnParams& p = *plan.p;
    const KvPanels<Mode>& panels = *static_cast<const KvPanels<Mode>*>(plan.shared);
    const int64_t lanes = plan.rows, d_pad = panels.d_pad, v_rows = panels.v_rows;
    const int64_t unit = block.batch * p.heads_kv + block.head0 / (p.heads_q / p.heads_kv);
    float* s_t = scratch;
    const Regions r = regions(p, lanes, scratch + lanes * kBlockK);

    // Q^T, unscaled, zero in the padding lanes and depth; then its pairs.
    for (int64_t e = 0; e < d_pad * lanes; ++e) r.q_t[e] = 0.0f;
    transpose_copy<Vec>(block.nq, p.head_dim, p.q.row<const typename Vec::S>(block.batch, block.head0, block.q0),
                        p.q.row_stride, p.q.col_stride, r.q_t, lanes, 1);
    pack_pairs<Encoding, kScorePlanes>(r.q_t, lanes, d_pad, d_pad / 2, lanes, r.q_pairs, lanes);

    const uint16_t* k_planes[2] = {panels.k_plane(unit, 0), kScorePlanes > 1 ? panels.k_plane(unit, 1) : nullptr};
    const uint16_t* v_planes[2] = {panels.v_plane(unit, 0), kValuePlanes > 1 ? panels.v_plane(unit, 1) : nullptr};
    const __m512 scale = _mm512_set1_ps(static_cast<float>(p.scale));
    Tiles::configure();
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
      const int64_t nk = min_i64(kBlockK, k_end - k0);
      auto k_at = [&](int64_t, const uint16_t** a, int64_t* stride) {
        a[0] = k_planes[0] + k0 * d_pad;
        a[1] = kScorePlanes > 1 ? k_planes[1] + k0 * d_pad : nullptr;
        *stride = d_pad;
      };
      tile_product<Tiles, Mode, kScorePlanes, kScorePlanes, /*kAccumulate=*/false>(
          round_up(nk, kTileRows), lanes, d_pad, k_at, r.q_pairs, lanes, s_t, lanes);
      for (int64_t e = 0; e < nk * lanes; e += 16) _mm512_store_ps(s_t + e, _mm512_mul_ps(_mm512_load_ps(s_t + e), scale));
      soft_cap<Vec>(p, nk * lanes, s_t);
      restrict_scores<Mask>(p, block, k0, nk, s_t, /*row_stride=*/1, /*key_stride=*/lanes);
      softmax_update<Vec>(lanes, nk, s_t, acc, p.value_dim);
      if (p.dropout_p > 0) apply_dropout(p, block, k0, nk, s_t, /*row_stride=*/1, /*key_stride=*/lanes);

      const int64_t depth = round_up(nk, kTileDepth);
      pack_pairs<Encoding, kProbPlanes>(s_t, lanes, nk, depth / 2, lanes, r.p_pairs, lanes);
      // V^T columns past the block's keys are never read: a partial last chunk comes from a zero-padded
      // copy, so a key outside the block (a NaN or inf in V there) cannot leak in through 0 * inf.
      const int64_t tail = nk % kTileDepth;
      if (tail) {
        const int64_t first = k0 + nk - tail;
        for (int plane = 0; plane < kValuePlanes; ++plane)
          for (int64_t e = 0; e < v_rows; ++e)
            for (int64_t j = 0; j < kTileDepth; ++j)
              r.v_tail[plane][e * kTileDepth + j] = j < tail ? v_planes[plane][e * panels.v_cols + first + j] : 0;
      }
      auto v_at = [&](int64_t d, const uint16_t** a, int64_t* stride) {
        const bool partial = tail && d + kTileDepth > nk;
        for (int plane = 0; plane < kValuePlanes; ++plane)
          a[plane] = partial ? r.v_tail[plane] - d : v_planes[plane] + k0;
        *stride = partial ? kTileDepth : panels.v_cols;
      };
      tile_product<Tiles, Mode, kValuePlanes, kProbPlanes, /*kAccumulate=*/true>(v_rows, lanes, depth, v_at,
                                                                                      r.p_pairs, lanes, acc.o, lanes);
    }
    Tiles::release();
  }
};

// Runs the forward pass on the tiles: kv heads in waves whose panels fit a memory budget, each wave
// packed in parallel, then its work items run (they are contiguous: items are ordered batch, query head,
// query block, split, and a kv head's query heads are consecutive).
template <class Tiles, class Mode, class Vec, class Mask>
void run_forward_tiles(const AttnParams& p) {
  using Layout = AmxQueryLanes<Tiles, Mode>;
  ForwardCall<Vec, Layout> call(p);
  KvPanels<Mode> panels(p);
  constexpr int64_t kPanelBudget = int64_t(64) << 20;  // bytes: far beyond one wave of typical shapes
  const int64_t units = p.batch * p.heads_kv;
  const int64_t fitting = kPanelBudget / (2 * panels.per_unit);
  const int64_t wave = fitting < 1 ? 1 : min_i64(units, fitting);
  AlignedBuffer buffer(sizeof(uint16_t) * panels.per_unit * wave);
  const int64_t row_floats = KvPanels<Mode>::kRowScratch;
  AlignedBuffer rows(sizeof(float) * row_floats * p.num_threads);
  panels.data = static_cast<uint16_t*>(buffer.data);
  call.plan.shared = &panels;
  const int64_t items_per_unit = call.items() / units;
  struct PackContext {
    const AttnParams* p;
    const KvPanels<Mode>* panels;
    float* rows;
    int64_t row_floats;
  } context{&p, &panels, static_cast<float*>(rows.data), row_floats};
  for (panels.first = 0; panels.first < units; panels.first += wave) {
    const int64_t count = min_i64(wave, units - panels.first);
    parallel_for(
        count, p.num_threads,
        [](void* raw, int64_t i, int thread_id) {
          const PackContext& c = *static_cast<const PackContext*>(raw);
          c.panels->template pack<typename Vec::S>(*c.p, c.panels->first + i, c.rows + thread_id * c.row_floats);
        },
        &context);
    call.template run_items<Mask, DotScore>(panels.first * items_per_unit, (panels.first + count) * items_per_unit);
  }
  call.merge();
}

// The tile mode for this call, or nothing (false) when the tiles do not serve it: additive scores,
// the decode layout (memory-bound, it stays on vectors), int8 K / V (dequantised on vectors), float64, float32 "highest", bfloat16 with a
// float32 output (that keeps P in fp32, as the vector path does).
template <class Tiles, class Run>
bool with_tile_mode(const AttnParams& p, Run run) {
  if (p.score_kind != ScoreKind::kDot || p.kv_int8 || use_decode_layout<VecAvx512<float>>(p)) return false;
  switch (p.dtype) {
    case DType::kBFloat16:
      if (p.out_float32) return false;
      run(WithStorage<VecAvx512<float>, BFloat16>{}, Bf16Tiles{});
      return true;
    case DType::kFloat16:
      if constexpr (Tiles::kHasFp16) {
        if (amx_fp16_enabled()) {
          run(WithStorage<VecAvx512<float>, Float16>{}, Fp16Tiles{});
          return true;
        }
      }
      run(WithStorage<VecAvx512<float>, Float16>{}, Bf16x3Tiles{});
      return true;
    case DType::kFloat32:
      if (p.precision == Precision::kHigh) {
        run(VecAvx512<float>{}, Bf16x3Tiles{});
        return true;
      }
      if (p.precision == Precision::kMedium) {
        run(VecAvx512<float>{}, Bf16Tiles{});
        return true;
      }
      return false;
    case DType::kFloat64:
      return false;
  }
  return false;
}

template <class Tiles>
bool forward_on_tiles(const AttnParams& p) {
  return with_tile_mode<Tiles>(p, [&](auto vec, auto mode) {
    by_mask_kind(p.mask_kind, [&](auto mask) {
      run_forward_tiles<Tiles, decltype(mode), decltype(vec), decltype(mask)>(p);
    });
  });
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
