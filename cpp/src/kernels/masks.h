// Which keys a row sees and how its scores are biased: the rows of a work item (RowBlock), the mask
// policies (switches.h picks one), the causal / sliding-window band, ALiBi, dropout.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// The rows of a work item: `heads` consecutive query heads x queries [q0, q0 + nq) of one batch entry.
// Prefill items hold one head and up to kBlockQ queries; decode items hold every query head that shares
// one kv head (grouped-query attention), so each K/V element is read once for the whole group, or every kv
// head of a long paged sequence (DimLanes::heads_per_item).
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

// Narrows [*begin, *end) to the keys some row of the block may see.
inline void visible_keys(const AttnParams& p, const RowBlock& block, int64_t* begin, int64_t* end) {
  if (!p.windowed) return;
  const int64_t first = first_visible_key(p, block.batch, block.q0);
  const int64_t last = last_visible_key(p, block.batch, block.q0 + block.nq - 1);
  if (first > *begin) *begin = first;
  if (last + 1 < *end) *end = last + 1;
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
