// The fused attention forward kernel: one template, instantiated once per ISA (the `Vec` policy) and
// dtype. Included by each attn_fwd_<isa>.cpp inside its own namespace (FUSEDATTN_KERNEL_NS), so no
// symbol compiled with one ISA's flags can be picked by the linker for another.
//
// Layout: "queries in lanes". A work item owns a block of up to kBlockQ queries of one (batch, head)
// and streams the keys in blocks of kBlockK:
//
//   S^T (keys x queries)  = K_block (keys x D) . Q^T (D x queries)      Q^T packed once per item
//   online softmax down the key axis: running max m and sum l are vectors over the query lanes, so
//   no horizontal reduction is ever needed
//   O^T (Dv x queries)   += V_block^T (Dv x keys) . P^T (keys x queries)
//
// Both products are the same register-tiled micro-kernel: one operand is broadcast element by element
// straight from the user's K / V (any strides, never packed or copied), the other is a packed
// lane-major tile in L1. The Lq x Lk score matrix never exists; per thread the scratch is
// O(kBlockQ * (D + Dv + kBlockK)).
//
// Scores stay in natural units (Q is pre-multiplied by `scale`, float masks are added as given): a
// padding mask of finfo.min must stay finite, and it would overflow if the scores were kept in log2
// units. Only the difference score - m, which is <= 0, is converted for exp2.
// Invariants of the online softmax (per query row):
//   m = max of the scores seen so far (-inf if none may be attended),
//   l = sum of exp(score - m), O = sum of exp(score - m) * v;
//   a new block with max m' rescales l and O by exp(m - m'); the reference point is 0 instead of m'
//   while m' is -inf, so exp(-inf - (-inf)) is never evaluated; a row with l = 0 outputs 0, lse -inf.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

constexpr double kLog2e = 1.4426950408889634;

// e^(x - reference) for x <= reference, as exp2 of the difference times log2(e).
template <class Vec>
inline typename Vec::V exp_minus(typename Vec::V x, typename Vec::V reference) {
  return Vec::exp2(Vec::mul(Vec::sub(x, reference), Vec::set1(static_cast<typename Vec::T>(kLog2e))));
}

// tanh(x) = (e - 1) / (e + 1) with e = e^(2x). |x| is clamped where tanh rounds to +-1 (9 in float, 20 in
// double) so e stays finite; the absolute error is about one ulp of 1, which is what the additive score
// sum_d w_d tanh(.) accumulates anyway. NaN passes through the clamp (x is the second operand).
template <class Vec>
inline typename Vec::V tanh_vec(typename Vec::V x) {
  using T = typename Vec::T;
  const T limit = sizeof(T) == 4 ? T(9) : T(20);
  const typename Vec::V clamped = Vec::max(Vec::set1(-limit), Vec::min(Vec::set1(limit), x));
  const typename Vec::V e = Vec::exp2(Vec::mul(clamped, Vec::set1(static_cast<T>(2 * kLog2e))));
  return Vec::div(Vec::sub(e, Vec::set1(T(1))), Vec::add(e, Vec::set1(T(1))));
}

// Score policies: how one depth step k of a score tile combines a broadcast element a (from K) with a
// vector b (from Q^T), how `a` is read, and what happens to a finished accumulator. The P.V product is
// always DotScore (or, for native bfloat16 pairs, its paired counterpart in bf16_pairs.h).
struct WidenedOperand {  // `a` is one element of the caller's storage, widened to the compute type
  template <class Vec, class A>
  static typename Vec::V broadcast(const A* a) {
    return Vec::set1(widen(*a));
  }
  template <class Vec>
  static typename Vec::V finish(typename Vec::V acc, const typename Vec::T*) {
    return acc;
  }
};

struct DotScore : WidenedOperand {
  template <class Vec>
  static typename Vec::V depth_weight(const typename Vec::T*, int64_t) {
    return Vec::zero();
  }
  template <class Vec>
  static typename Vec::V combine(typename Vec::V acc, typename Vec::V a, typename Vec::V b, typename Vec::V) {
    return Vec::fmadd(a, b, acc);
  }
};

struct AdditiveScore : WidenedOperand {  // sum_d w_d tanh(q_d + k_d), Keras AdditiveAttention / Bahdanau
  template <class Vec>
  static typename Vec::V depth_weight(const typename Vec::T* weight, int64_t k) {
    return Vec::set1(weight[k]);
  }
  template <class Vec>
  static typename Vec::V combine(typename Vec::V acc, typename Vec::V a, typename Vec::V b, typename Vec::V w) {
    return Vec::fmadd(w, tanh_vec<Vec>(Vec::add(a, b)), acc);
  }
};

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;  // keys per score tile: S^T is kBlockK x kBlockQ, 16 KiB in fp32
constexpr int64_t kMaxMergeDim = 512;  // the largest Dv, so the merge can keep one output row on the stack

// ---------------------------------------------------------------------------------------------------
// Micro-kernel: c[r][lane] (+)= sum_k a(r, k) * b[k][lane] for `kRows` rows and kVecs vectors of lanes
// (or, with AdditiveScore, sum_k w_k tanh(a(r, k) + b[k][lane])),
// all accumulators in registers. a(r, k) = a[r * a_row_stride + k * a_depth_stride] is broadcast, so `a`
// can be the user's K or V in any layout; b and c are packed, aligned, `b_stride`/`c_stride` apart.
// `score_data` is the Score policy's constant operand (AdditiveScore's w, a paired product's scale).
// kAccumulate is a template parameter, not a flag: a run-time choice here made GCC shuttle the
// accumulators through the stack around the loop.
template <class Vec, class Score, bool kAccumulate, int kRows, int kVecs, class A>
inline void tile_kernel(int64_t depth, const A* a, int64_t a_row_stride, int64_t a_depth_stride,
                        const typename Vec::T* b, int64_t b_stride, typename Vec::T* c, int64_t c_stride,
                        const typename Vec::T* score_data) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  V acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) {
      if constexpr (kAccumulate)
        acc[r][v] = Vec::load(c + r * c_stride + v * W);
      else
        acc[r][v] = Vec::zero();
    }
  // depth >= 1 always (D >= 1, a key block holds >= 1 key); a do-while tells GCC so, and spares the
  // prologue that parks every accumulator on the stack for the zero-trip case.
  int64_t k = 0;
  do {
    const typename Vec::T* b_row = b + k * b_stride;
    const A* a_col = a + k * a_depth_stride;
    V b_vec[kVecs];
    for (int v = 0; v < kVecs; ++v) b_vec[v] = Vec::load(b_row + v * W);
    const V w = Score::template depth_weight<Vec>(score_data, k);
    for (int r = 0; r < kRows; ++r) {
      const V a_bcast = Score::template broadcast<Vec>(a_col + r * a_row_stride);
      for (int v = 0; v < kVecs; ++v) acc[r][v] = Score::template combine<Vec>(acc[r][v], a_bcast, b_vec[v], w);
    }
  } while (++k < depth);
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) Vec::store(c + r * c_stride + v * W, Score::template finish<Vec>(acc[r][v], score_data));
}

// Run-time (rows, vecs) -> the compile-time tile, for the edges of a panel.
template <class Vec, class Score, bool kAccumulate, int kRows, int kVecs = Vec::kTileVecs, class... Args>
inline void tile_kernel_vecs(int vecs, Args... args) {
  if constexpr (kVecs > 1) {
    if (vecs < kVecs) return tile_kernel_vecs<Vec, Score, kAccumulate, kRows, kVecs - 1>(vecs, args...);
  }
  tile_kernel<Vec, Score, kAccumulate, kRows, kVecs>(args...);
}

template <class Vec, class Score, bool kAccumulate, int kRows = Vec::kTileRows, class... Args>
inline void tile_kernel_any(int rows, int vecs, Args... args) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return tile_kernel_any<Vec, Score, kAccumulate, kRows - 1>(rows, vecs, args...);
  }
  tile_kernel_vecs<Vec, Score, kAccumulate, kRows>(vecs, args...);
}

// C (rows x lanes) (+)= A (rows x depth, strided, broadcast) . B (depth x lanes, packed), combined by Score.
template <class Vec, class Score, bool kAccumulate, class A>
void strided_times_packed(int64_t rows, int64_t lanes, int64_t depth, const A* a,
                          int64_t a_row_stride, int64_t a_depth_stride, const typename Vec::T* b,
                          typename Vec::T* c, const typename Vec::T* score_data = nullptr) {
  constexpr int W = Vec::W;
  const int64_t vecs = lanes / W;
  for (int64_t r = 0; r < rows; r += Vec::kTileRows) {
    const int tile_rows = static_cast<int>(min_i64(Vec::kTileRows, rows - r));
    for (int64_t v = 0; v < vecs; v += Vec::kTileVecs) {
      const int tile_vecs = static_cast<int>(min_i64(Vec::kTileVecs, vecs - v));
      tile_kernel_any<Vec, Score, kAccumulate>(tile_rows, tile_vecs, depth, a + r * a_row_stride, a_row_stride,
                                               a_depth_stride, b + v * W, lanes, c + r * lanes + v * W, lanes,
                                               score_data);
    }
  }
}

// dst(c, r) = src(r, c) for a rows x cols matrix; element (r, c) of a matrix lives at
// base + r * row_stride + c * col_stride. Whole W x W blocks go through the ISA's register transpose when
// both sides hold the compute type and are contiguous along c / r; the edges, other layouts and 16-bit
// storage are converted one by one.
template <class Vec, class Src, class Dst>
void transpose_copy(int64_t rows, int64_t cols, const Src* src, int64_t src_row, int64_t src_col, Dst* dst,
                    int64_t dst_row, int64_t dst_col) {
  constexpr int W = Vec::W;
  using T = typename Vec::T;
  int64_t full_rows = 0, full_cols = 0;
  if constexpr (std::is_same_v<Src, T> && std::is_same_v<Dst, T>) {
    if (src_col == 1 && dst_col == 1) {
      full_rows = rows / W * W;
      full_cols = cols / W * W;
      for (int64_t r = 0; r < full_rows; r += W)
        for (int64_t c = 0; c < full_cols; c += W)
          Vec::transpose(src + r * src_row + c, src_row, dst + c * dst_row + r, dst_row);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first_col = r < full_rows ? full_cols : 0;
    for (int64_t c = first_col; c < cols; ++c)
      narrow(dst + c * dst_row + r * dst_col, static_cast<T>(widen(src[r * src_row + c * src_col])));
  }
}

// ---------------------------------------------------------------------------------------------------
// The rows of a work item: `heads` consecutive query heads x queries [q0, q0 + nq) of one batch entry.
// Prefill items hold one head and up to kBlockQ queries; decode items hold every query head that shares
// one kv head (grouped-query attention), so each K/V element is read once for the whole group.
struct RowBlock {
  int64_t batch, head0, heads, q0, nq;
  int64_t rows() const { return heads * nq; }
  int64_t head(int64_t r) const { return head0 + r / nq; }
  int64_t query(int64_t r) const { return q0 + r % nq; }
};

// Mask policies: restrict a tile of scaled scores, score(r, j) = scores[r * row_stride + j * key_stride].
struct NoMask {
  template <class T>
  static void apply(const AttnParams&, const RowBlock&, int64_t, int64_t, T*, int64_t, int64_t) {}
};

struct BoolMask {  // numpy bool (one byte): true = may attend
  template <class T>
  static void apply(const AttnParams& p, const RowBlock& block, int64_t k0, int64_t nk, T* scores,
                    int64_t row_stride, int64_t key_stride) {
    for (int64_t r = 0; r < block.rows(); ++r) {
      const uint8_t* allowed =
          p.mask.row<const uint8_t>(block.batch, block.head(r), block.query(r)) + k0 * p.mask.col_stride;
      for (int64_t j = 0; j < nk; ++j)
        if (!allowed[j * p.mask.col_stride])
          scores[r * row_stride + j * key_stride] = -std::numeric_limits<T>::infinity();
    }
  }
};

struct AdditiveMask {  // same dtype as the scores, added after scaling
  template <class T>
  static void apply(const AttnParams& p, const RowBlock& block, int64_t k0, int64_t nk, T* scores,
                    int64_t row_stride, int64_t key_stride) {
    for (int64_t r = 0; r < block.rows(); ++r) {
      const T* bias = p.mask.row<const T>(block.batch, block.head(r), block.query(r)) + k0 * p.mask.col_stride;
      for (int64_t j = 0; j < nk; ++j) scores[r * row_stride + j * key_stride] += bias[j * p.mask.col_stride];
    }
  }
};

// The band of keys row r may see (causal attention, sliding windows): [first, last] in key positions.
inline int64_t first_visible_key(const AttnParams& p, int64_t batch, int64_t query) {
  return query + p.diagonal_offset_of(batch) - p.window_left;
}
inline int64_t last_visible_key(const AttnParams& p, int64_t batch, int64_t query) {
  return query + p.diagonal_offset_of(batch) + p.window_right;
}

// Hides the keys outside each row's band. Tiles wholly outside every row's band are never computed
// (key_range), tiles wholly inside need nothing; only tiles crossing a band edge get here.
template <class T>
void apply_window(const AttnParams& p, const RowBlock& block, int64_t k0, int64_t nk, T* scores, int64_t row_stride,
                  int64_t key_stride) {
  if (!p.windowed) return;
  const int64_t last_query = block.q0 + block.nq - 1;
  if (k0 >= first_visible_key(p, block.batch, last_query) && k0 + nk - 1 <= last_visible_key(p, block.batch, block.q0))
    return;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < block.rows(); ++r) {
    const int64_t first = first_visible_key(p, block.batch, block.query(r)) - k0;
    const int64_t last = last_visible_key(p, block.batch, block.query(r)) - k0;
    for (int64_t j = 0; j < nk; ++j)
      if (j < first || j > last) scores[r * row_stride + j * key_stride] = neg_inf;
  }
}

// ALiBi: score -= slope(head) * |i + diagonal_offset - j|, FlashAttention's (bottom-right) alignment by default.
template <class T>
void apply_alibi(const AttnParams& p, const RowBlock& block, int64_t k0, int64_t nk, T* scores, int64_t row_stride,
                 int64_t key_stride) {
  if (!p.alibi_slopes) return;
  const T* slopes = static_cast<const T*>(p.alibi_slopes) + block.batch * p.alibi_batch_stride;
  for (int64_t r = 0; r < block.rows(); ++r) {
    const T slope = slopes[block.head(r)];
    const int64_t diagonal = block.query(r) + p.diagonal_offset_of(block.batch) - k0;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t distance = diagonal > j ? diagonal - j : j - diagonal;
      scores[r * row_stride + j * key_stride] -= slope * static_cast<T>(distance);
    }
  }
}

// Logit soft-capping of `count` contiguous scores: s -> cap * tanh(s / cap). Applied before any bias or
// mask, so masked positions stay at -inf (zero probability).
template <class Vec>
void apply_softcap(typename Vec::T* scores, int64_t count, typename Vec::T cap) {
  using T = typename Vec::T;
  const typename Vec::V cap_vec = Vec::set1(cap), inv_cap = Vec::set1(T(1) / cap);
  int64_t e = 0;
  for (; e + Vec::W <= count; e += Vec::W)
    Vec::storeu(scores + e, Vec::mul(cap_vec, tanh_vec<Vec>(Vec::mul(Vec::loadu(scores + e), inv_cap))));
  for (; e < count; ++e) scores[e] = cap * std::tanh(scores[e] / cap);
}

// Dropout's keep/drop decision for one element: murmur3's 32-bit finaliser over the seed and the
// element's (batch * Hq + head, query, key) position. Written with plain uint32 arithmetic so that the
// compiler vectorises the loop over a tile row; python/fusedattn/reference.py computes the same bits.
inline uint32_t dropout_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

inline uint32_t dropout_hash(uint64_t seed, uint32_t batch_head, uint32_t query, uint32_t key) {
  const uint32_t h = dropout_mix(static_cast<uint32_t>(seed) ^ (batch_head * 0xC2B2AE3Du) ^ (query * 0x9E3779B1u));
  return dropout_mix(h ^ static_cast<uint32_t>(seed >> 32) ^ (key * 0x85EBCA77u));
}

// Multiplies the probabilities of a tile by the dropout factor (0 or 1 / (1 - p)); with `factor_only`
// writes the factors themselves instead (the backward pass needs them apart).
template <class T>
void apply_dropout(const AttnParams& p, const RowBlock& block, int64_t k0, int64_t nk, T* probs, int64_t row_stride,
                   int64_t key_stride, bool factor_only = false) {
  const uint32_t threshold = static_cast<uint32_t>(p.dropout_p * 4294967296.0);
  const T keep_scale = static_cast<T>(1.0 / (1.0 - p.dropout_p));
  for (int64_t j = 0; j < nk; ++j) {
    const uint32_t key = static_cast<uint32_t>(p.k_start + k0 + j);
    for (int64_t r = 0; r < block.rows(); ++r) {
      const uint32_t batch_head = static_cast<uint32_t>(block.batch * p.heads_q + block.head(r));
      const uint32_t query = static_cast<uint32_t>(p.q_start + block.query(r));
      const T factor = dropout_hash(p.dropout_seed, batch_head, query, key) >= threshold ? keep_scale : T(0);
      T& element = probs[r * row_stride + j * key_stride];
      element = factor_only ? factor : element * factor;
    }
  }
}

// Everything after the raw scores, in order: ALiBi bias, the mask, the band.
template <class Mask, class T>
void restrict_scores(const AttnParams& p, const RowBlock& block, int64_t k0, int64_t nk, T* scores, int64_t row_stride,
                     int64_t key_stride) {
  apply_alibi(p, block, k0, nk, scores, row_stride, key_stride);
  Mask::apply(p, block, k0, nk, scores, row_stride, key_stride);
  apply_window(p, block, k0, nk, scores, row_stride, key_stride);
}

// ---------------------------------------------------------------------------------------------------

// Narrows [*begin, *end) to the keys some row of the block may see.
inline void visible_keys(const AttnParams& p, const RowBlock& block, int64_t* begin, int64_t* end) {
  if (!p.windowed) return;
  const int64_t first = first_visible_key(p, block.batch, block.q0);
  const int64_t last = last_visible_key(p, block.batch, block.q0 + block.nq - 1);
  if (first > *begin) *begin = first;
  if (last + 1 < *end) *end = last + 1;
}

// Per-row softmax state of one work item: the unnormalised output o(r, e) = o[r * o_row + e * o_col],
// the running max m[r] and the running sum l[r].
template <class T>
struct Accumulators {
  T* o;
  T* m;
  T* l;
};

template <class Vec>
struct ForwardPlan {
  using T = typename Vec::T;
  const AttnParams* p;
  bool decode;             // layout: DimLanes (decode) or QueryLanes (prefill)
  int64_t q_blocks;        // prefill: ceil(Lq / kBlockQ)
  int64_t row_blocks;      // prefill: batch * Hq * q_blocks; decode: batch * Hkv
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
    if (decode) {
      const int64_t group = p->heads_q / p->heads_kv;
      return {index / p->heads_kv, (index % p->heads_kv) * group, group, 0, p->len_q};
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

// The logsumexp of a row from its accumulators; -inf when it may attend nothing (l == 0).
template <class T>
T row_lse(T m, T l) {
  return l == T(0) ? -std::numeric_limits<T>::infinity() : m + std::log(l);
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
  // l == 0: the row may attend nothing; its o is 0, so a factor of 0 gives the output 0.
  const T inv_sum = l == T(0) ? T(0) : T(1) / l;
  with_output<Vec>(p, block, r, [&](auto* out_row) {
    for (int64_t e = 0; e < p.value_dim; ++e) narrow(out_row + e * p.out.col_stride, o[e * o_col] * inv_sum);
  });
  if (p.lse.data) *p.lse.row<T>(block.batch, block.head(r), block.query(r)) = row_lse(m, l);
}

// ---------------------------------------------------------------------------------------------------
// Prefill layout: queries in lanes (see the top of this file). The two products of a tile are a policy,
// QueryProducts<Vec, Score>::type: WidenedProducts computes them in the compute type from the caller's
// storage; bf16_pairs.h specialises it with native bfloat16 dot products for the CPUs that have them.

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

template <class Vec, class Score>
struct QueryProducts {
  using type = WidenedProducts;
};

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

  template <class Vec>
  static void soft_cap(const AttnParams& p, int64_t count, typename Vec::T* s_t) {
    if (p.softcap > 0) apply_softcap<Vec>(s_t, count, static_cast<typename Vec::T>(p.softcap));
  }

  // Online softmax down the key axis: folds S^T into the running max / sum, turns it into P^T in place
  // and rescales the value_dim rows of O^T (none when only the statistics are wanted).
  template <class Vec>
  static void softmax_update(int64_t lanes, int64_t nk, typename Vec::T* s_t, const Accumulators<typename Vec::T>& acc,
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

  template <class Vec, class Mask, class Score>
  static void run(const ForwardPlan<Vec>& plan, const RowBlock& block, int64_t k_begin, int64_t k_end,
                  const Accumulators<typename Vec::T>& acc, typename Vec::T* scratch) {
    using T = typename Vec::T;
    using Products = typename QueryProducts<Vec, Score>::type;
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
      if (p.lse.data && i < block.nq) *p.lse.row<T>(block.batch, block.head0, block.q0 + i) = row_lse(acc.m[i], acc.l[i]);
      acc.l[i] = acc.l[i] == T(0) ? T(0) : T(1) / acc.l[i];  // l == 0: attends nothing, o is 0, output 0
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
  return lanes * kBlockK + (dot > widened ? dot : widened);
}

// ---------------------------------------------------------------------------------------------------
// Decode layout: few queries, so the head dimension is in lanes. Each score is a dot product over D
// (four keys at a time, for four independent FMA chains), the softmax runs along a row of keys, and
// o(r, :) += p(r, j) * v(j, :) keeps up to kOutVecs vectors of the output row in registers. Every K/V
// element is loaded once per group of query rows, which is what a memory-bound decode step needs.
struct DimLanes {
  static constexpr int kDotKeys = 4;
  static constexpr int kOutVecs = 8;

  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t rows) {
    const int64_t dim_pad = round_up(p.head_dim, Vec::W), value_dim_pad = round_up(p.value_dim, Vec::W);
    // scaled Q rows | scores | packed K block | packed V block
    return rows * dim_pad + rows * kBlockK + kBlockK * dim_pad + kBlockK * value_dim_pad;
  }

  // Makes a block of K or V readable with aligned-width vector loads: used in place when rows are
  // contiguous, a whole number of vectors and in the compute type, else copied into zero-padded scratch.
  template <class Vec>
  static const typename Vec::T* rows_for_vectors(const StridedTensor& t, const RowBlock& block, int64_t kv_head,
                                                 int64_t k0, int64_t nk, int64_t width, int64_t width_pad,
                                                 typename Vec::T* pack, int64_t* stride) {
    using T = typename Vec::T;
    using S = typename Vec::S;
    const S* first = t.row<const S>(block.batch, kv_head, k0);
    if constexpr (std::is_same_v<S, T>) {
      if (t.col_stride == 1 && width == width_pad) {
        *stride = t.row_stride;
        return first;
      }
    }
    for (int64_t j = 0; j < nk; ++j) {  // 16-bit storage is widened here, once per element
      if (t.col_stride == 1) {
        widen_contiguous(first + j * t.row_stride, width, pack + j * width_pad);
      } else {
        for (int64_t e = 0; e < width; ++e) pack[j * width_pad + e] = widen(first[j * t.row_stride + e * t.col_stride]);
      }
      for (int64_t e = width; e < width_pad; ++e) pack[j * width_pad + e] = T(0);
    }
    *stride = width_pad;
    return pack;
  }

  template <class Vec, int kKeys>
  static void dot_keys(const typename Vec::T* q_row, const typename Vec::T* keys, int64_t key_stride,
                       int64_t vecs, typename Vec::T* scores) {
    using V = typename Vec::V;
    V acc[kKeys];
    for (int t = 0; t < kKeys; ++t) acc[t] = Vec::zero();
    // Key by key, each row front to back: the order the hardware prefetcher follows (interleaving the
    // four rows chunk by chunk measured 2x slower on Zen 4). The chains still overlap out of order.
    for (int t = 0; t < kKeys; ++t)
      for (int64_t c = 0; c < vecs; ++c)
        acc[t] = Vec::fmadd(Vec::load(q_row + c * Vec::W), Vec::loadu(keys + t * key_stride + c * Vec::W), acc[t]);
    for (int t = 0; t < kKeys; ++t) scores[t] = Vec::reduce_add(acc[t]);
  }

  template <class Vec, int kVecs>
  static void accumulate_values(const typename Vec::T* probs, int64_t nk, const typename Vec::T* values,
                                int64_t value_stride, typename Vec::T* out) {
    using V = typename Vec::V;
    V acc[kVecs];
    for (int c = 0; c < kVecs; ++c) acc[c] = Vec::load(out + c * Vec::W);
    for (int64_t j = 0; j < nk; ++j) {
      const V prob = Vec::set1(probs[j]);
      for (int c = 0; c < kVecs; ++c) acc[c] = Vec::fmadd(prob, Vec::loadu(values + j * value_stride + c * Vec::W), acc[c]);
    }
    for (int c = 0; c < kVecs; ++c) Vec::store(out + c * Vec::W, acc[c]);
  }

  template <class Vec, int kVecs = kOutVecs>
  static void accumulate_values_any(int64_t vecs, const typename Vec::T* probs, int64_t nk,
                                    const typename Vec::T* values, int64_t value_stride, typename Vec::T* out) {
    if constexpr (kVecs > 1) {
      if (vecs < kVecs) return accumulate_values_any<Vec, kVecs - 1>(vecs, probs, nk, values, value_stride, out);
    }
    accumulate_values<Vec, kVecs>(probs, nk, values, value_stride, out);
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
    const int64_t kv_head = block.head0 / (p.heads_q / p.heads_kv);
    const T scale = static_cast<T>(p.scale);
    T* q_rows = scratch;
    T* scores = q_rows + rows * dim_pad;
    T* k_pack = scores + rows * kBlockK;
    T* v_pack = k_pack + kBlockK * dim_pad;
    const T neg_inf = -std::numeric_limits<T>::infinity();

    for (int64_t r = 0; r < rows; ++r) {
      const typename Vec::S* q_row = p.q.row<const typename Vec::S>(block.batch, block.head(r), block.query(r));
      for (int64_t d = 0; d < dim; ++d) q_rows[r * dim_pad + d] = widen(q_row[d * p.q.col_stride]) * scale;
      for (int64_t d = dim; d < dim_pad; ++d) q_rows[r * dim_pad + d] = T(0);
    }

    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
      const int64_t nk = min_i64(kBlockK, k_end - k0), nk_pad = round_up(nk, W);
      int64_t k_stride, v_stride;
      const T* keys = rows_for_vectors<Vec>(p.k, block, kv_head, k0, nk, dim, dim_pad, k_pack, &k_stride);
      const T* values = rows_for_vectors<Vec>(p.v, block, kv_head, k0, nk, p.value_dim, value_dim_pad, v_pack, &v_stride);

      for (int64_t r = 0; r < rows; ++r) {
        T* row_scores = scores + r * kBlockK;
        int64_t j = 0;
        for (; j + kDotKeys <= nk; j += kDotKeys)
          dot_keys<Vec, kDotKeys>(q_rows + r * dim_pad, keys + j * k_stride, k_stride, dim_pad / W, row_scores + j);
        for (; j < nk; ++j) dot_keys<Vec, 1>(q_rows + r * dim_pad, keys + j * k_stride, k_stride, dim_pad / W, row_scores + j);
        if (p.softcap > 0) apply_softcap<Vec>(row_scores, nk, static_cast<T>(p.softcap));
        for (; j < nk_pad; ++j) row_scores[j] = neg_inf;  // whole vectors below; padding weighs exp(-inf) = 0
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
        for (int64_t c = 0; c < value_dim_pad / W; c += kOutVecs)
          accumulate_values_any<Vec>(min_i64(kOutVecs, value_dim_pad / W - c), row_scores, nk, values + c * W,
                                     v_stride, acc.o + r * value_dim_pad + c * W);
      }
    }
  }

  template <class Vec>
  static void emit(const ForwardPlan<Vec>& plan, const RowBlock& block, const Accumulators<typename Vec::T>& acc) {
    for (int64_t r = 0; r < block.rows(); ++r)
      emit_row<Vec>(*plan.p, block, r, acc.o + r * plan.o_row, plan.o_col, acc.m[r], acc.l[r]);
  }
};

// ---------------------------------------------------------------------------------------------------

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
    QueryLanes::softmax_update<Vec>(lanes, nk, s_t, acc, /*value_dim=*/0);
  }
  for (int64_t i = 0; i < lanes; ++i) {
    acc.l[i] = acc.l[i] == T(0) ? T(0) : T(1) / acc.l[i];  // rows attending nothing stay all 0
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

// Combines the k_splits partial results of one row block: weights exp(m_s - M), M the largest m_s.
template <class Vec>
void merge_splits(const ForwardPlan<Vec>& plan, int64_t block_index) {
  using T = typename Vec::T;
  const RowBlock block = plan.row_block(block_index);
  if (block.nq <= 0) return;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T merged[kMaxMergeDim];
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
    emit_row<Vec>(*plan.p, block, r, merged, 1, reference, total);
  }
}

// Owns an aligned buffer through the portable allocator (no std:: template instantiated here).
struct AlignedBuffer {
  void* data = nullptr;
  explicit AlignedBuffer(std::size_t bytes) : data(bytes ? aligned_allocate(bytes) : nullptr) {}
  ~AlignedBuffer() { aligned_free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

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
    plan.row_blocks = p.batch * p.heads_kv;
    plan.rows = (p.heads_q / p.heads_kv) * p.len_q;
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

  // Too few row blocks to occupy every thread (decoding): split the keys too, several chunks per
  // thread so that uneven chunk costs even out, and merge the partial results by their logsumexp.
  plan.k_splits = 1;
  plan.keys_per_split = round_up(p.len_k > 0 ? p.len_k : 1, kBlockK);
  const int threads = p.num_threads;
  if (may_split_keys && threads > 1 && plan.row_blocks < 2 * threads && p.len_k > kBlockK) {
    const int64_t wanted = min_i64(ceil_div(4 * threads, plan.row_blocks), ceil_div(p.len_k, kBlockK));
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

template <class Vec, class Mask, class Score>
void run_weights(const AttnParams& p) {
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

// Decode (DimLanes) when the queries would fill less than a quarter of the query lanes of a tile.
template <class Vec>
bool use_decode_layout(const AttnParams& p) {
  return !p.seq_len_q && (p.len_q * 4 <= Vec::W || p.len_q == 1);
}

// Run-time kinds -> compile-time policies: mask, then score, then (dot scores only) the layout.
template <class Vec, class Mask>
void forward_scored(const AttnParams& p) {
  if (p.score_kind == ScoreKind::kAdditive)
    run_forward<Vec, Mask, AdditiveScore, QueryLanes>(p);
  else if (use_decode_layout<Vec>(p))
    run_forward<Vec, Mask, DotScore, DimLanes>(p);
  else
    run_forward<Vec, Mask, DotScore, QueryLanes>(p);
}

template <class Vec, class Mask>
void weights_scored(const AttnParams& p) {
  if (p.score_kind == ScoreKind::kAdditive)
    run_weights<Vec, Mask, AdditiveScore>(p);
  else
    run_weights<Vec, Mask, DotScore>(p);
}

// MaskKind -> the compile-time mask policy: calls run(Mask{}) with NoMask, BoolMask or AdditiveMask.
template <class Run>
void by_mask_kind(MaskKind kind, Run run) {
  switch (kind) {
    case MaskKind::kNone: return run(NoMask{});
    case MaskKind::kBool: return run(BoolMask{});
    case MaskKind::kAdditive: return run(AdditiveMask{});
  }
}

template <class Vec>
void forward_dtype(const AttnParams& p) {
  by_mask_kind(p.mask_kind, [&](auto mask) { forward_scored<Vec, decltype(mask)>(p); });
}

template <class Vec>
void weights_dtype(const AttnParams& p) {
  by_mask_kind(p.mask_kind, [&](auto mask) { weights_scored<Vec, decltype(mask)>(p); });
}

// DType -> the vector policy, with the storage type for 16-bit inputs (computed in float).
template <template <class> class VecFor, template <class> class Run>
void by_dtype(const AttnParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return Run<VecFor<float>>::run(p);
    case DType::kFloat64: return Run<VecFor<double>>::run(p);
    case DType::kBFloat16: return Run<WithStorage<VecFor<float>, BFloat16>>::run(p);
    case DType::kFloat16: return Run<WithStorage<VecFor<float>, Float16>>::run(p);
  }
}

template <class Vec>
struct RunForward {
  static void run(const AttnParams& p) { forward_dtype<Vec>(p); }
};
template <class Vec>
struct RunWeights {
  static void run(const AttnParams& p) { weights_dtype<Vec>(p); }
};

template <template <class> class VecFor>
void forward(const AttnParams& p) {
  by_dtype<VecFor, RunForward>(p);
}

template <template <class> class VecFor>
void weights(const AttnParams& p) {
  by_dtype<VecFor, RunWeights>(p);
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
