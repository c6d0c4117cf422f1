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
// Scores are kept in log2 units (Q is pre-multiplied by scale * log2(e)), so exp becomes exp2.
// Invariants of the online softmax (per query lane):
//   m = max of the scores seen so far (-inf if none may be attended),
//   l = sum of exp2(score - m), O = sum of exp2(score - m) * v;
//   a new block with max m' rescales l and O by exp2(m - m'); the reference point is 0 instead of m'
//   while m' is -inf, so exp2(-inf - (-inf)) is never evaluated; a row with l = 0 outputs 0, lse -inf.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

constexpr int64_t kBlockQ = 64;  // queries per work item: the lanes of the score tile
constexpr int64_t kBlockK = 64;  // keys per score tile: S^T is kBlockK x kBlockQ, 16 KiB in fp32

// ---------------------------------------------------------------------------------------------------
// Micro-kernel: c[r][lane] (+)= sum_k a(r, k) * b[k][lane] for `kRows` rows and kVecs vectors of lanes,
// all accumulators in registers. a(r, k) = a[r * a_row_stride + k * a_depth_stride] is broadcast, so `a`
// can be the user's K or V in any layout; b and c are packed, aligned, `b_stride`/`c_stride` apart.
template <class Vec, int kRows, int kVecs>
inline void tile_kernel(int64_t depth, const typename Vec::T* a, int64_t a_row_stride, int64_t a_depth_stride,
                        const typename Vec::T* b, int64_t b_stride, typename Vec::T* c, int64_t c_stride,
                        bool accumulate) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  V acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = accumulate ? Vec::load(c + r * c_stride + v * W) : Vec::zero();
  for (int64_t k = 0; k < depth; ++k) {
    const typename Vec::T* b_row = b + k * b_stride;
    const typename Vec::T* a_col = a + k * a_depth_stride;
    V b_vec[kVecs];
    for (int v = 0; v < kVecs; ++v) b_vec[v] = Vec::load(b_row + v * W);
    for (int r = 0; r < kRows; ++r) {
      const V a_bcast = Vec::set1(a_col[r * a_row_stride]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] = Vec::fmadd(a_bcast, b_vec[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) Vec::store(c + r * c_stride + v * W, acc[r][v]);
}

// Run-time (rows, vecs) -> the compile-time tile, for the edges of a panel.
template <class Vec, int kRows, int kVecs = Vec::kTileVecs, class... Args>
inline void tile_kernel_vecs(int vecs, Args... args) {
  if constexpr (kVecs > 1) {
    if (vecs < kVecs) return tile_kernel_vecs<Vec, kRows, kVecs - 1>(vecs, args...);
  }
  tile_kernel<Vec, kRows, kVecs>(args...);
}

template <class Vec, int kRows = Vec::kTileRows, class... Args>
inline void tile_kernel_any(int rows, int vecs, Args... args) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return tile_kernel_any<Vec, kRows - 1>(rows, vecs, args...);
  }
  tile_kernel_vecs<Vec, kRows>(vecs, args...);
}

// C (rows x lanes) (+)= A (rows x depth, strided, broadcast) . B (depth x lanes, packed).
template <class Vec>
void strided_times_packed(int64_t rows, int64_t lanes, int64_t depth, const typename Vec::T* a,
                          int64_t a_row_stride, int64_t a_depth_stride, const typename Vec::T* b,
                          typename Vec::T* c, bool accumulate) {
  constexpr int W = Vec::W;
  const int64_t vecs = lanes / W;
  for (int64_t r = 0; r < rows; r += Vec::kTileRows) {
    const int tile_rows = static_cast<int>(min_i64(Vec::kTileRows, rows - r));
    for (int64_t v = 0; v < vecs; v += Vec::kTileVecs) {
      const int tile_vecs = static_cast<int>(min_i64(Vec::kTileVecs, vecs - v));
      tile_kernel_any<Vec>(tile_rows, tile_vecs, depth, a + r * a_row_stride, a_row_stride, a_depth_stride,
                           b + v * W, lanes, c + r * lanes + v * W, lanes, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Mask policies: how a tile of log2-scaled scores S^T[key][query] is restricted before the softmax.

struct NoMask {
  template <class T>
  static void apply(const AttnParams&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T*, int64_t) {}
};

struct BoolMask {  // numpy bool (one byte): true = may attend
  template <class T>
  static void apply(const AttnParams& p, int64_t batch, int64_t head, int64_t q0, int64_t nq, int64_t k0,
                    int64_t nk, T* scores, int64_t lanes) {
    for (int64_t i = 0; i < nq; ++i) {
      const uint8_t* allowed = p.mask.row<const uint8_t>(batch, head, q0 + i) + k0 * p.mask.col_stride;
      for (int64_t j = 0; j < nk; ++j)
        if (!allowed[j * p.mask.col_stride]) scores[j * lanes + i] = -std::numeric_limits<T>::infinity();
    }
  }
};

struct AdditiveMask {  // same dtype as the scores, added after scaling (so converted to log2 units)
  template <class T>
  static void apply(const AttnParams& p, int64_t batch, int64_t head, int64_t q0, int64_t nq, int64_t k0,
                    int64_t nk, T* scores, int64_t lanes) {
    const T log2e = static_cast<T>(1.4426950408889634);
    for (int64_t i = 0; i < nq; ++i) {
      const T* bias = p.mask.row<const T>(batch, head, q0 + i) + k0 * p.mask.col_stride;
      for (int64_t j = 0; j < nk; ++j) scores[j * lanes + i] += bias[j * p.mask.col_stride] * log2e;
    }
  }
};

// ---------------------------------------------------------------------------------------------------

template <class Vec>
struct ForwardPlan {
  using T = typename Vec::T;
  const AttnParams* p;
  int64_t q_blocks;        // ceil(Lq / kBlockQ)
  int64_t lanes;           // query lanes per tile, a multiple of W
  int64_t k_splits;        // > 1: keys split across work items and merged by logsumexp (flash-decoding)
  int64_t keys_per_split;  // a multiple of kBlockK
  T scale_log2e;
  T* scratch;              // per thread: Q^T (D x lanes) | S^T (kBlockK x lanes) | O^T (Dv x lanes) | m | l
  int64_t scratch_per_thread;
  T* partials;             // k_splits > 1: per work item O^T (Dv x lanes) | m | l
  int64_t partial_size;
};

// One work item: queries [q0, q0 + nq) of (batch, head) against the keys of one split.
template <class Vec, class Mask>
void forward_item(const ForwardPlan<Vec>& plan, int64_t item, int thread_id) {
  using T = typename Vec::T;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  const AttnParams& p = *plan.p;
  const int64_t split = item % plan.k_splits;
  const int64_t query_block = item / plan.k_splits;
  const int64_t q_block = query_block % plan.q_blocks;
  const int64_t head = (query_block / plan.q_blocks) % p.heads_q;
  const int64_t batch = query_block / plan.q_blocks / p.heads_q;
  const int64_t kv_head = head / (p.heads_q / p.heads_kv);
  const int64_t q0 = q_block * kBlockQ;
  const int64_t nq = min_i64(kBlockQ, p.len_q - q0);
  const int64_t lanes = plan.lanes;
  const int64_t dim = p.head_dim, value_dim = p.value_dim;

  T* q_t = plan.scratch + thread_id * plan.scratch_per_thread;
  T* s_t = q_t + dim * lanes;
  T* o_t = s_t + kBlockK * lanes;
  T* row_max = o_t + value_dim * lanes;
  T* row_sum = row_max + lanes;
  if (plan.k_splits > 1) {
    o_t = plan.partials + item * plan.partial_size;
    row_max = o_t + value_dim * lanes;
    row_sum = row_max + lanes;
  }
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < lanes; ++i) {
    row_max[i] = neg_inf;
    row_sum[i] = T(0);
  }
  for (int64_t e = 0; e < value_dim * lanes; ++e) o_t[e] = T(0);

  int64_t k_begin = split * plan.keys_per_split;
  int64_t k_end = min_i64(p.len_k, k_begin + plan.keys_per_split);
  if (p.causal) k_end = min_i64(k_end, q0 + nq + p.causal_offset);  // keys past the last row's diagonal

  if (k_begin < k_end) {
    // Q^T, pre-scaled into log2 units; padding lanes are zero so they stay finite and are never stored.
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t i = nq; i < lanes; ++i) q_t[d * lanes + i] = T(0);
    for (int64_t i = 0; i < nq; ++i) {
      const T* q_row = p.q.row<const T>(batch, head, q0 + i);
      for (int64_t d = 0; d < dim; ++d) q_t[d * lanes + i] = q_row[d * p.q.col_stride] * plan.scale_log2e;
    }
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    const int64_t nk = min_i64(kBlockK, k_end - k0);
    strided_times_packed<Vec>(nk, lanes, dim, p.k.row<const T>(batch, kv_head, k0), p.k.row_stride,
                              p.k.col_stride, q_t, s_t, /*accumulate=*/false);
    Mask::apply(p, batch, head, q0, nq, k0, nk, s_t, lanes);
    // Only tiles that cross the diagonal need causal masking; the rest are fully visible.
    if (p.causal && k0 + nk - 1 > q0 + p.causal_offset) {
      for (int64_t j = 0; j < nk; ++j) {
        // key k0 + j is hidden from queries q0 + i with i < k0 + j - causal_offset - q0
        const int64_t hidden = min_i64(nq, k0 + j - p.causal_offset - q0);
        for (int64_t i = 0; i < hidden; ++i) s_t[j * lanes + i] = neg_inf;
      }
    }

    for (int64_t lane = 0; lane < lanes; lane += W) {
      T* column = s_t + lane;
      V block_max = Vec::set1(neg_inf);
      for (int64_t j = 0; j < nk; ++j) block_max = Vec::max(block_max, Vec::load(column + j * lanes));
      const V old_max = Vec::load(row_max + lane);
      const V new_max = Vec::max(old_max, block_max);
      const V reference = Vec::neginf_to_zero(new_max);
      V block_sum = Vec::zero();
      for (int64_t j = 0; j < nk; ++j) {
        const V prob = Vec::exp2(Vec::sub(Vec::load(column + j * lanes), reference));
        Vec::store(column + j * lanes, prob);
        block_sum = Vec::add(block_sum, prob);
      }
      V sum = Vec::load(row_sum + lane);
      if (!Vec::all_equal(old_max, new_max)) {  // the common case after the first blocks skips this
        const V rescale = Vec::exp2(Vec::sub(old_max, reference));
        sum = Vec::mul(sum, rescale);
        for (int64_t e = 0; e < value_dim; ++e)
          Vec::store(o_t + e * lanes + lane, Vec::mul(Vec::load(o_t + e * lanes + lane), rescale));
      }
      Vec::store(row_sum + lane, Vec::add(sum, block_sum));
      Vec::store(row_max + lane, new_max);
    }

    strided_times_packed<Vec>(value_dim, lanes, nk, p.v.row<const T>(batch, kv_head, k0), p.v.col_stride,
                              p.v.row_stride, s_t, o_t, /*accumulate=*/true);
  }

  if (plan.k_splits > 1) return;  // the merge normalises and writes
  const T ln2 = static_cast<T>(0.6931471805599453);
  for (int64_t i = 0; i < nq; ++i) {
    // l == 0: the row may attend nothing; its O^T column is 0, so a factor of 0 gives the output 0.
    const T inv_sum = row_sum[i] == T(0) ? T(0) : T(1) / row_sum[i];
    T* out_row = p.out.row<T>(batch, head, q0 + i);
    for (int64_t e = 0; e < value_dim; ++e) out_row[e * p.out.col_stride] = o_t[e * lanes + i] * inv_sum;
    if (p.lse.data)
      *p.lse.row<T>(batch, head, q0 + i) = row_sum[i] == T(0) ? neg_inf : (row_max[i] + std::log2(row_sum[i])) * ln2;
  }
}

// Combines the k_splits partial results of one query block: weights exp2(m_s - M) with M the largest m_s.
template <class Vec>
void merge_splits(const ForwardPlan<Vec>& plan, int64_t query_block) {
  using T = typename Vec::T;
  const AttnParams& p = *plan.p;
  const int64_t q_block = query_block % plan.q_blocks;
  const int64_t head = (query_block / plan.q_blocks) % p.heads_q;
  const int64_t batch = query_block / plan.q_blocks / p.heads_q;
  const int64_t q0 = q_block * kBlockQ;
  const int64_t nq = min_i64(kBlockQ, p.len_q - q0);
  const int64_t lanes = plan.lanes, value_dim = p.value_dim;
  const T* first = plan.partials + query_block * plan.k_splits * plan.partial_size;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < nq; ++i) {
    T global_max = neg_inf;
    for (int64_t s = 0; s < plan.k_splits; ++s) {
      const T m = first[s * plan.partial_size + value_dim * lanes + i];
      if (m > global_max || m != m) global_max = m;  // NaN wins, so it propagates to the output
    }
    const T reference = global_max == neg_inf ? T(0) : global_max;
    T total = 0;
    for (int64_t s = 0; s < plan.k_splits; ++s) {
      const T* part = first + s * plan.partial_size;
      total += part[value_dim * lanes + lanes + i] * std::exp2(part[value_dim * lanes + i] - reference);
    }
    const T inv_total = total == T(0) ? T(0) : T(1) / total;
    T* out_row = p.out.row<T>(batch, head, q0 + i);
    for (int64_t e = 0; e < value_dim; ++e) {
      T acc = 0;
      for (int64_t s = 0; s < plan.k_splits; ++s) {
        const T* part = first + s * plan.partial_size;
        acc += part[e * lanes + i] * std::exp2(part[value_dim * lanes + i] - reference);
      }
      out_row[e * p.out.col_stride] = acc * inv_total;
    }
    if (p.lse.data)
      *p.lse.row<T>(batch, head, q0 + i) =
          total == T(0) ? neg_inf : (reference + std::log2(total)) * static_cast<T>(0.6931471805599453);
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

template <class Vec, class Mask>
void run_forward(const AttnParams& p) {
  using T = typename Vec::T;
  constexpr int W = Vec::W;
  ForwardPlan<Vec> plan{};
  plan.p = &p;
  plan.q_blocks = ceil_div(p.len_q, kBlockQ);
  plan.lanes = round_up(min_i64(p.len_q, kBlockQ), W);
  plan.scale_log2e = static_cast<T>(p.scale * 1.4426950408889634);
  const int threads = p.num_threads;
  const int64_t query_blocks = p.batch * p.heads_q * plan.q_blocks;

  // Too few query blocks to occupy every thread (decoding): split the keys too, several chunks per
  // thread so that uneven chunk costs even out, and merge the partial results by their logsumexp.
  plan.k_splits = 1;
  plan.keys_per_split = round_up(p.len_k > 0 ? p.len_k : 1, kBlockK);
  if (threads > 1 && query_blocks < 2 * threads && p.len_k > kBlockK) {
    const int64_t wanted = min_i64(ceil_div(4 * threads, query_blocks), ceil_div(p.len_k, kBlockK));
    plan.keys_per_split = round_up(ceil_div(p.len_k, wanted), kBlockK);
    plan.k_splits = ceil_div(p.len_k, plan.keys_per_split);
  }

  const int64_t align = 64 / sizeof(T);
  plan.scratch_per_thread = round_up(plan.lanes * (p.head_dim + kBlockK + p.value_dim + 2), align);
  AlignedBuffer scratch(sizeof(T) * plan.scratch_per_thread * threads);
  plan.scratch = static_cast<T*>(scratch.data);
  plan.partial_size = round_up(plan.lanes * (p.value_dim + 2), align);
  AlignedBuffer partials(plan.k_splits > 1 ? sizeof(T) * plan.partial_size * query_blocks * plan.k_splits : 0);
  plan.partials = static_cast<T*>(partials.data);

  parallel_for(
      query_blocks * plan.k_splits, threads,
      [](void* context, int64_t item, int thread_id) {
        forward_item<Vec, Mask>(*static_cast<const ForwardPlan<Vec>*>(context), item, thread_id);
      },
      &plan);
  if (plan.k_splits > 1) {
    parallel_for(
        query_blocks, threads,
        [](void* context, int64_t item, int) { merge_splits<Vec>(*static_cast<const ForwardPlan<Vec>*>(context), item); },
        &plan);
  }
}

template <class Vec>
void forward_dtype(const AttnParams& p) {
  switch (p.mask_kind) {
    case MaskKind::kNone: return run_forward<Vec, NoMask>(p);
    case MaskKind::kBool: return run_forward<Vec, BoolMask>(p);
    case MaskKind::kAdditive: return run_forward<Vec, AdditiveMask>(p);
  }
}

template <template <class> class VecFor>
void forward(const AttnParams& p) {
  if (p.dtype == DType::kFloat32)
    forward_dtype<VecFor<float>>(p);
  else
    forward_dtype<VecFor<double>>(p);
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
