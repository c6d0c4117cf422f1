// The decode layout (DimLanes): one or a few queries against a long K / V, the head dimension in lanes.
#pragma once

#include "kernels/common.h"
#include "kernels/forward_plan.h"
#include "kernels/masks.h"
#include "kernels/read_ahead.h"
#include "kernels/scores.h"
#include "kernels/softmax.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// Decode layout: few queries, so the head dimension is in lanes. Each score is a dot product over D
// (one FMA chain per key and row, W chains reduced together), the softmax runs along a row of keys, and
// o(r, :) += p(r, j) * v(j, :) accumulates up to kOutVecs vectors of the output row per pass. Every K/V
// element is loaded once per group of query rows, which is what a memory-bound decode step needs.
//
// Where a K / V row is read: in place, a plain load (compute type) or widened in registers (16-bit,
// int8) when one query row or groups of four rows read it (one widened load, four FMAs); widened once
// into scratch for other GQA groups, or when its columns are strided or not a whole number of vectors.
// Rows are addressed by a stride, or key by key through the page table when K / V are paged (a pool
// block may end anywhere).
struct DimLanes {
  // 16: a value row of up to 16 vectors (D = 128 in float32 on AVX2, 256 on AVX-512) is read in one pass
  // over the keys. In passes of 8, each pass read one half of every row of a key block from DRAM, and
  // contiguous float32 one-row decode ran ~1.2x slower; one pass is faster even where 16 accumulators
  // outgrow AVX2's 16 registers and a few live on the stack (16-bit, int8; AMD EPYC Zen 1,
  // docs/performance.md).
  static constexpr int kOutVecs = 16;
  // Largest head dimension, in vectors, with a compiled score loop; beyond it the dimension is a
  // run-time count (D > 256 in float32 on AVX-512, D > 128 on AVX2).
  static constexpr int kMaxScoreVecs = 16;

  // Keys [k0, k0 + nk) of one kv head: key j at first + j * stride, or (paged) at pointers[j] + shift, the
  // pointers listing another kv head's rows of the same keys (a pool token's heads are head_stride apart
  // wherever its block lies, so one list serves every head of an item).
  template <class R>
  struct RowRun {
    const R* first;
    int64_t stride;
    const R* const* pointers;
    int64_t shift = 0;
    ReadAhead* ahead = nullptr;  // told of the keys visited (null: no prefetch)
    FUSEDATTN_ALWAYS_INLINE void visit() const {
      if (ahead) ahead->visit();
    }
  };
  struct Strided {
    template <class R>
    static const R* row(const RowRun<R>& rows, int64_t j) { return rows.first + j * rows.stride; }
  };
  struct Listed {
    template <class R>
    static const R* row(const RowRun<R>& rows, int64_t j) { return rows.pointers[j] + rows.shift; }
  };

  // Query heads per work item: one kv group, or every kv head of a batch entry when K / V are paged (a pool
  // block holds all kv heads of its tokens: its heads are read while the block is in cache). Paged K / V too
  // short for their keys to be split (make_plan: under 512) and fewer sequences than threads stay per kv
  // group: with one item per sequence, one sequence's decode ran on one thread (2 threads, 8 kv heads, Intel
  // Xeon: 256 keys 115-143 -> 95-98 us, 511 keys 285-314 -> 182-189; on one thread the whole-block items stay
  // faster from 512 keys). The rows an item holds change no result bit: each row is computed alike.
  static constexpr int64_t kPagedItemKeys = 512;
  static int64_t heads_per_item(const AttnParams& p) {
    const bool paged = p.k.paged() || p.v.paged();
    const bool whole_blocks = p.len_k >= kPagedItemKeys || p.batch >= p.num_threads;
    return paged && whole_blocks ? p.heads_q : p.heads_q / p.heads_kv;
  }

  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t rows) {
    const int64_t dim_pad = round_up(p.head_dim, Vec::W), value_dim_pad = round_up(p.value_dim, Vec::W);
    const int64_t kv_count = heads_per_item(p) / (p.heads_q / p.heads_kv);
    // row pointers (paged) | scaled Q rows | scores | widened K block | widened V block | int8 scales
    return pointer_slots<typename Vec::T>() + rows * dim_pad + rows * kBlockK + kBlockK * (dim_pad + value_dim_pad) +
           2 * kv_count * kBlockK;
  }

  // Scratch elements (T) that hold a block's row pointers, whole 64-byte lines so that what follows
  // stays aligned.
  template <class T>
  static int64_t pointer_slots() {
    const int64_t bytes = kBlockK * static_cast<int64_t>(sizeof(const void*));
    return round_up(ceil_div(bytes, static_cast<int64_t>(sizeof(T))), 64 / static_cast<int64_t>(sizeof(T)));
  }

  // Whether rows of t are read where they are: contiguous whole reads (RowReader), and in the compute type, or
  // read by one query row, or by whole groups of kScoreRows rows, where one widened load feeds
  // kScoreRows FMAs (int8 g4 / g8 1.4x faster than widening into scratch first; bfloat16 1.1x, Zen 4).
  // Other groups (2, 3, 5, ...) would widen each element once per row: they widen into scratch.
  template <class Vec>
  static bool read_in_place(const StridedTensor& t, int64_t width, int64_t readers) {
    if (t.col_stride != 1 || width % RowReader<Vec, KvStorage<Vec>>::kElements != 0) return false;
    return std::is_same_v<KvStorage<Vec>, typename Vec::T> || readers == 1 ||
           (Vec::W >= kScoreRows && readers % kScoreRows == 0);
  }

  // Paged rows [k0, k0 + nk) of kv head `head` listed for rows_in_place: once per sweep, not once per head.
  template <class R>
  static void list_rows(const StridedTensor& t, int64_t batch, int64_t head, int64_t k0, int64_t nk, const R** pointers) {
    for_rows<const R>(t, batch, head, k0, nk, [&](int64_t j, const R* row) { pointers[j] = row; });
  }

  // Keys from k0 of kv head `head`, read where they lie: strided, or the rows list_rows() listed for kv head
  // listed_head, shifted.
  template <class R>
  static RowRun<R> rows_in_place(const StridedTensor& t, int64_t batch, int64_t head, int64_t k0, const R* const* listed,
                                 int64_t listed_head) {
    if (!t.paged()) return {t.row<const R>(batch, head, k0), t.row_stride, nullptr};
    return {nullptr, 0, listed, (head - listed_head) * t.head_stride};
  }

  // The same keys widened (or gathered, for strided columns) into zero-padded rows of width_pad.
  template <class Vec>
  static RowRun<typename Vec::T> rows_widened(const StridedTensor& t, int64_t batch, int64_t head, int64_t k0, int64_t nk,
                                              int64_t width, int64_t width_pad, typename Vec::T* pack) {
    using T = typename Vec::T;
    using S = KvStorage<Vec>;
    for_rows<const S>(t, batch, head, k0, nk, [&](int64_t j, const S* source) {
      T* row = pack + j * width_pad;
      if (t.col_stride == 1) {
        widen_contiguous(source, width, row);
      } else {
        for (int64_t e = 0; e < width; ++e) row[e] = widen(source[e * t.col_stride]);
      }
      for (int64_t e = width; e < width_pad; ++e) row[e] = T(0);
    });
    return {pack, width_pad, nullptr};
  }

  // The per-key scales of int8 K or V for keys [k0, k0 + nk) of kv heads [kv_first, kv_first + kv_count): head g's
  // at out[g * kBlockK + j]. Read in memory order: token by token where a token's heads lie side by side (a pool;
  // read head by head, each pass touched every line of the block's scales again), else head by head.
  template <class T>
  static void key_scales(const StridedTensor& scales, int64_t batch, int64_t kv_first, int64_t kv_count, int64_t k0,
                         int64_t nk, T* out) {
    if (scales.head_stride == 1 && kv_count > 1) {
      for_rows<const float>(scales, batch, kv_first, k0, nk, [&](int64_t j, const float* token) {
        for (int64_t g = 0; g < kv_count; ++g) out[g * kBlockK + j] = static_cast<T>(token[g]);
      });
      return;
    }
    for (int64_t g = 0; g < kv_count; ++g)
      for_rows<const float>(scales, batch, kv_first + g, k0, nk,
                            [&](int64_t j, const float* scale) { out[g * kBlockK + j] = static_cast<T>(*scale); });
  }

  // Register budgets. With 16 vector registers (AVX2) the Q row of a score does not stay in registers and a
  // single FMA chain per key waited on its latency (two chains: float32 g1 ~1.1x, Zen 1), and 4 rows x 4
  // vectors of shared-row accumulators spilled to the stack, each FMA a store-load round trip (2 vectors:
  // below). With 32 (AVX-512) one chain and 4 vectors.
  template <class Vec>
  static constexpr bool kFewRegisters = Vec::kRegisters < 32;
  template <class Vec>
  static constexpr int kDotChains = kFewRegisters<Vec> ? 2 : 1;

  // The lanes of q_row * key summed over n vectors (q_row in the key reader's lane order): kDotChains FMA
  // chains, vector c on chain c % kDotChains, the row read front to back.
  template <class Vec, class R>
  static typename Vec::V dot_lanes(const typename Vec::T* q_row, const R* key, int64_t n) {
    using Reader = RowReader<Vec, R>;
    using V = typename Vec::V;
    constexpr int W = Vec::W, kElements = Reader::kElements, kChains = kDotChains<Vec>;
    V acc[kChains];
    for (int a = 0; a < kChains; ++a) acc[a] = Vec::zero();
    for (int64_t c = 0; c < n / Reader::kVecs; ++c) {
      V k[Reader::kVecs];
      Reader::load(key + c * kElements, k);
      for (int i = 0; i < Reader::kVecs; ++i) {
        V& chain = acc[(c * Reader::kVecs + i) % kChains];
        chain = Vec::fmadd(Vec::load(q_row + c * kElements + i * W), k[i], chain);
      }
    }
    for (int a = 1; a < kChains; ++a) acc[0] = Vec::add(acc[0], acc[a]);
    return acc[0];
  }

  // scores[j] = q_row . key j for nk keys, the head dimension kVecs vectors (0: `vecs`, known at run
  // time only). With kVecs a constant the Q row stays in registers and every key gets its own FMA chain,
  // and W keys' sums are reduced together (Vec::sum_each). With a run-time dimension and four keys per
  // call the accumulators lived in memory, one dependent FMA chain at a time: latency-bound (Zen 4).
  template <class Vec, int kVecs, class R, class Addressing>
  static void score_keys(const typename Vec::T* q_row, const RowRun<R>& keys, int64_t nk, int64_t vecs,
                         typename Vec::T* scores) {
    using V = typename Vec::V;
    constexpr int W = Vec::W;
    const int64_t n = kVecs > 0 ? kVecs : vecs;
    auto dot = [&](const R* key) { return dot_lanes<Vec>(q_row, key, n); };
    int64_t j = 0;
    // Key after key, each row front to back: the order the hardware prefetchers follow. Interleaving the
    // W keys' chains vector by vector measured 10-20% slower (Zen 4, float32 and int8, groups 1-8).
    for (; j + W <= nk; j += W) {
      V acc[W];
      for (int t = 0; t < W; ++t) {
        // Once per key, so that the read-ahead's requests come a few at a time. Once per W keys, a
        // paged sweep's lines came 32 at a time (bfloat16, AVX2) and stalled on full miss buffers:
        // paged one-row decode 1.1-1.3x contiguous -> 1.0-1.1x (Zen 1). The Q row kept its registers
        // (fewer stack stores in the AVX2 and AVX-512 score loops than with the visit outside).
        keys.visit();
        acc[t] = dot(Addressing::row(keys, j + t));
      }
      Vec::storeu(scores + j, Vec::sum_each(acc));
    }
    for (; j < nk; ++j) scores[j] = Vec::reduce_add(dot(Addressing::row(keys, j)));
  }

  // Rows of a GQA group scored kScoreRows at a time, W / kScoreRows keys at once: one load of a key
  // vector feeds kScoreRows FMAs and a query vector kKeys (the single-row loop's Q in registers leaves one
  // FMA per key load), and the kScoreRows x kKeys sums are one Vec::sum_each.
  static constexpr int kScoreRows = 4;

  // scores(r, j) = q_rows(r) . key j for row_groups * kScoreRows rows (dim_pad and kBlockK apart).
  template <class Vec, int kVecs, class R, class Addressing>
  static void score_row_groups(const typename Vec::T* q_rows, int64_t dim_pad, int64_t row_groups,
                               const RowRun<R>& keys, int64_t nk, int64_t vecs, typename Vec::T* scores) {
    using T = typename Vec::T;
    using V = typename Vec::V;
    using Reader = RowReader<Vec, R>;
    constexpr int W = Vec::W, kKeys = W / kScoreRows, kElements = Reader::kElements;
    static_assert(kKeys * kScoreRows == W, "a row group's sums fill one vector");
    const int64_t n = kVecs > 0 ? kVecs : vecs;
    int64_t j = 0;
    for (; j + kKeys <= nk; j += kKeys) {
      const R* key[kKeys];
      for (int t = 0; t < kKeys; ++t) key[t] = Addressing::row(keys, j + t);
      for (int64_t g = 0; g < row_groups; ++g) {
        keys.visit();
        const T* q = q_rows + g * kScoreRows * dim_pad;
        V acc[W];  // acc[r * kKeys + t]: row r, key j + t
        for (int a = 0; a < W; ++a) acc[a] = Vec::zero();
        for (int64_t c = 0; c < n / Reader::kVecs; ++c) {
          V k[kKeys][Reader::kVecs];
          for (int t = 0; t < kKeys; ++t) Reader::load(key[t] + c * kElements, k[t]);
          for (int i = 0; i < Reader::kVecs; ++i)
            for (int r = 0; r < kScoreRows; ++r) {
              const V qv = Vec::load(q + r * dim_pad + c * kElements + i * W);
              for (int t = 0; t < kKeys; ++t) acc[r * kKeys + t] = Vec::fmadd(qv, k[t][i], acc[r * kKeys + t]);
            }
        }
        alignas(64) T sums[W];
        Vec::store(sums, Vec::sum_each(acc));
        for (int r = 0; r < kScoreRows; ++r)
          for (int t = 0; t < kKeys; ++t) scores[(g * kScoreRows + r) * kBlockK + j + t] = sums[r * kKeys + t];
      }
    }
    for (int64_t r = 0; r < row_groups * kScoreRows; ++r)
      for (int64_t t = j; t < nk; ++t)
        scores[r * kBlockK + t] = Vec::reduce_add(dot_lanes<Vec>(q_rows + r * dim_pad, Addressing::row(keys, t), n));
  }

  // The score loops compiled for one head dimension: a single row, and groups of kScoreRows rows (null
  // where a vector holds fewer lanes than kScoreRows).
  template <class Vec, class R>
  struct ScoreLoops {
    void (*row)(const typename Vec::T*, const RowRun<R>&, int64_t, int64_t, typename Vec::T*);
    void (*row_groups)(const typename Vec::T*, int64_t, int64_t, const RowRun<R>&, int64_t, int64_t, typename Vec::T*);
  };

  template <class Vec, class R, class Addressing, int kVecs>
  static ScoreLoops<Vec, R> score_loops() {
    if constexpr (Vec::W >= kScoreRows)
      return {&score_keys<Vec, kVecs, R, Addressing>, &score_row_groups<Vec, kVecs, R, Addressing>};
    else
      return {&score_keys<Vec, kVecs, R, Addressing>, nullptr};
  }

  template <class Vec, class R, class Addressing, int kVecs = kMaxScoreVecs>
  static ScoreLoops<Vec, R> score_loops_for(int64_t vecs) {
    if (vecs > kMaxScoreVecs) return score_loops<Vec, R, Addressing, 0>();
    if constexpr (kVecs > 1) {
      if (vecs < kVecs) return score_loops_for<Vec, R, Addressing, kVecs - 1>(vecs);
    }
    return score_loops<Vec, R, Addressing, kVecs>();
  }

  // The scores of `readers` query rows (q_rows, dim_pad apart; scores kBlockK apart) against nk keys:
  // whole groups of kScoreRows rows together, the rest row by row. Float32 rows from DRAM too: with the
  // next rows prefetched (ReadAhead) the order of the loads no longer matters to the hardware
  // prefetchers, and one key load per four FMAs made g4 / g8 1.1-1.3x faster (Zen 4, 2 threads).
  template <class Vec, class R>
  static void score_rows(const ScoreLoops<Vec, R>& loops, const typename Vec::T* q_rows, int64_t dim_pad, int64_t readers,
                         const RowRun<R>& keys, int64_t nk, typename Vec::T* scores) {
    const int64_t vecs = dim_pad / Vec::W;
    int64_t r = 0;
    if (loops.row_groups && readers >= kScoreRows) {
      loops.row_groups(q_rows, dim_pad, readers / kScoreRows, keys, nk, vecs, scores);
      r = readers / kScoreRows * kScoreRows;
    }
    for (; r < readers; ++r) loops.row(q_rows + r * dim_pad, keys, nk, vecs, scores + r * kBlockK);
  }

  // out[:kVecs vectors] += sum_j probs[j] * value j [offset:], the output slice in registers.
  template <class Vec, int kVecs, class R, class Addressing>
  static void accumulate_values(const typename Vec::T* probs, int64_t nk, const RowRun<R>& values, int64_t offset,
                                typename Vec::T* out) {
    using V = typename Vec::V;
    using Reader = RowReader<Vec, R>;
    static_assert(kVecs % Reader::kVecs == 0, "whole reads of the row");
    constexpr int kReads = kVecs / Reader::kVecs;
    V acc[kVecs];
    load_output<Vec, Reader>(out, kVecs, acc);
    for (int64_t j = 0; j < nk; ++j) {
      values.visit();
      const V prob = Vec::set1(probs[j]);
      const R* value = Addressing::row(values, j) + offset;
      FUSEDATTN_UNROLL
      for (int c = 0; c < kReads; ++c) {
        V v[Reader::kVecs];
        Reader::load(value + c * Reader::kElements, v);
        FUSEDATTN_UNROLL
        for (int i = 0; i < Reader::kVecs; ++i)
          acc[c * Reader::kVecs + i] = Vec::fmadd(prob, v[i], acc[c * Reader::kVecs + i]);
      }
    }
    store_output<Vec, Reader>(acc, kVecs, out);
  }

  // `vecs` vectors of an output row into registers in the value reader's lane order, and back.
  template <class Vec, class Reader>
  static void load_output(const typename Vec::T* out, int vecs, typename Vec::V* acc) {
    FUSEDATTN_UNROLL
    for (int c = 0; c < vecs; ++c) acc[c] = Vec::load(out + c * Vec::W);
    FUSEDATTN_UNROLL
    for (int c = 0; c < vecs; c += Reader::kVecs) Reader::natural_to_lanes(acc + c);
  }
  template <class Vec, class Reader>
  static void store_output(typename Vec::V* acc, int vecs, typename Vec::T* out) {
    FUSEDATTN_UNROLL
    for (int c = 0; c < vecs; c += Reader::kVecs) Reader::lanes_to_natural(acc + c);
    FUSEDATTN_UNROLL
    for (int c = 0; c < vecs; ++c) Vec::store(out + c * Vec::W, acc[c]);
  }

  // Rows whose length is a whole number of reads (RowReader<Vec, R>::kElements): vecs is a multiple of its kVecs.
  template <class Vec, class R, class Addressing, int kVecs = kOutVecs>
  static void accumulate_values_any(int64_t vecs, const typename Vec::T* probs, int64_t nk, const RowRun<R>& values,
                                    int64_t offset, typename Vec::T* out) {
    constexpr int kStep = RowReader<Vec, R>::kVecs;
    if constexpr (kVecs > kStep) {
      if (vecs < kVecs) return accumulate_values_any<Vec, R, Addressing, kVecs - kStep>(vecs, probs, nk, values, offset, out);
    }
    accumulate_values<Vec, kVecs, R, Addressing>(probs, nk, values, offset, out);
  }

  // Keys widened at a time for a GQA group's rows: 16 widened rows stay in L1 (8 KiB at D = 128) while
  // every row of the group reads them (int8 g4 / g8 measured 15-25% faster than widening the whole block;
  // in-place float32 rows gained nothing from it, Zen 4). One query row widens the whole block.
  static constexpr int64_t kSharedKeys = 16;
  static int64_t keys_widened_at_a_time(int64_t readers, int64_t nk) { return readers > 1 ? kSharedKeys : nk; }

  // Keys per sweep over a paged item's kv heads (token_bytes: one token's K rows of those heads). A pool
  // block holds all heads of its tokens: a few tokens' heads one after the other read each block in
  // address order; head by head, the whole key block of one head read 512 bytes of every 4 KiB (float32
  // paged g4 1.5x slower than contiguous, Zen 4). A sweep is kSweepBytes, at least kSharedKeys keys: 16
  // float32 keys at D = 128 and 8 heads, as measured on Zen 4; 16-bit and int8 sweeps of 16 keys were
  // mostly per-call cost (with rows listed once, 32 bfloat16 / 64 int8 keys: paged / contiguous bfloat16 g1
  // 1.33-1.43 -> 0.96-1.26, int8 g1 1.25-1.28 -> 1.09-1.17; AMD EPYC Zen 1, 2 threads, docs/performance.md).
  static constexpr int64_t kSweepBytes = 64 * 1024;
  static int64_t keys_per_sweep(int64_t token_bytes) {
    int64_t keys = kSharedKeys;
    while (2 * keys <= kBlockK && 2 * keys * token_bytes <= kSweepBytes) keys *= 2;
    return keys;
  }

  // The scores of `readers` query rows (q_rows, dim_pad apart) against keys [k0, k0 + nk) of one kv head
  // (`listed`: paged K's rows of kv head listed_head, when read in place).
  template <class Vec>
  static void score_head(const AttnParams& p, int64_t batch, int64_t kv_head, int64_t k0, int64_t nk, int64_t dim_pad,
                         bool in_place, const typename Vec::T* q_rows, int64_t readers, typename Vec::T* scores,
                         typename Vec::T* pack, const KvStorage<Vec>* const* listed, int64_t listed_head, ReadAhead* ahead) {
    using S = KvStorage<Vec>;
    const int64_t vecs = dim_pad / Vec::W;
    if (in_place) {
      RowRun<S> keys = rows_in_place<S>(p.k, batch, kv_head, k0, listed, listed_head);
      keys.ahead = ahead;
      const ScoreLoops<Vec, S> loops =
          p.k.paged() ? score_loops_for<Vec, S, Listed>(vecs) : score_loops_for<Vec, S, Strided>(vecs);
      return score_rows<Vec, S>(loops, q_rows, dim_pad, readers, keys, nk, scores);
    }
    const auto loops = score_loops_for<Vec, typename Vec::T, Strided>(vecs);
    const int64_t step = keys_widened_at_a_time(readers, nk);
    for (int64_t j0 = 0; j0 < nk; j0 += step) {
      const int64_t nj = min_i64(step, nk - j0);
      auto keys = rows_widened<Vec>(p.k, batch, kv_head, k0 + j0, nj, p.head_dim, dim_pad, pack);
      keys.ahead = ahead;
      score_rows<Vec, typename Vec::T>(loops, q_rows, dim_pad, readers, keys, nj, scores + j0);
    }
  }

  // kSharedRows rows of a GQA group at once, kSharedVecs vectors of each: one load of a value vector
  // feeds kSharedRows FMAs instead of one (groups of 8 measured 5-10% faster, Zen 4; groups of 4 equal).
  static constexpr int kSharedRows = 4;
  template <class Vec>
  static constexpr int kSharedVecs = kFewRegisters<Vec> ? 2 : 4;

  // out(r, :kSharedVecs vectors) += sum_j probs(r, j) * value j [offset:] for kSharedRows rows.
  template <class Vec, class R, class Addressing>
  static void accumulate_shared_rows(const typename Vec::T* probs, int64_t nk, const RowRun<R>& values, int64_t offset,
                                     typename Vec::T* out, int64_t value_dim_pad) {
    using V = typename Vec::V;
    using Reader = RowReader<Vec, R>;
    static_assert(kSharedVecs<Vec> % Reader::kVecs == 0, "whole reads of the row");
    V acc[kSharedRows][kSharedVecs<Vec>];
    FUSEDATTN_UNROLL
    for (int r = 0; r < kSharedRows; ++r) load_output<Vec, Reader>(out + r * value_dim_pad, kSharedVecs<Vec>, acc[r]);
    for (int64_t j = 0; j < nk; ++j) {
      values.visit();
      const R* value = Addressing::row(values, j) + offset;
      V v[kSharedVecs<Vec>];
      FUSEDATTN_UNROLL
      for (int c = 0; c < kSharedVecs<Vec>; c += Reader::kVecs) Reader::load(value + c * Vec::W, v + c);
      FUSEDATTN_UNROLL
      for (int r = 0; r < kSharedRows; ++r) {
        const V prob = Vec::set1(probs[r * kBlockK + j]);
        FUSEDATTN_UNROLL
        for (int c = 0; c < kSharedVecs<Vec>; ++c) acc[r][c] = Vec::fmadd(prob, v[c], acc[r][c]);
      }
    }
    FUSEDATTN_UNROLL
    for (int r = 0; r < kSharedRows; ++r) store_output<Vec, Reader>(acc[r], kSharedVecs<Vec>, out + r * value_dim_pad);
  }

  template <class Vec, class R, class Addressing>
  static void accumulate_rows(const RowRun<R>& values, int64_t nk, int64_t value_dim_pad, const typename Vec::T* probs,
                              int64_t readers, typename Vec::T* out) {
    constexpr int W = Vec::W;
    const int64_t vecs = value_dim_pad / W, shared_vecs = W > 1 ? vecs / kSharedVecs<Vec> * kSharedVecs<Vec> : 0;
    auto one_row = [&](int64_t r, int64_t first_vec) {
      for (int64_t c = first_vec; c < vecs; c += kOutVecs)
        accumulate_values_any<Vec, R, Addressing>(min_i64(kOutVecs, vecs - c), probs + r * kBlockK, nk, values, c * W,
                                                  out + r * value_dim_pad + c * W);
    };
    int64_t r = 0;
    for (; shared_vecs > 0 && r + kSharedRows <= readers; r += kSharedRows) {
      for (int64_t c = 0; c < shared_vecs; c += kSharedVecs<Vec>)
        accumulate_shared_rows<Vec, R, Addressing>(probs + r * kBlockK, nk, values, c * W, out + r * value_dim_pad + c * W,
                                                   value_dim_pad);
      for (int64_t i = 0; i < kSharedRows; ++i) one_row(r + i, shared_vecs);
    }
    for (; r < readers; ++r) one_row(r, 0);
  }

  // out(r, :) += sum_j probs(r, j) v_j for `readers` rows (probs kBlockK apart, out value_dim_pad apart).
  template <class Vec>
  static void accumulate_head(const AttnParams& p, int64_t batch, int64_t kv_head, int64_t k0, int64_t nk,
                              int64_t value_dim_pad, bool in_place, const typename Vec::T* probs, int64_t readers,
                              typename Vec::T* out, typename Vec::T* pack, const KvStorage<Vec>* const* listed,
                              int64_t listed_head, ReadAhead* ahead) {
    using S = KvStorage<Vec>;
    if (in_place) {
      RowRun<S> values = rows_in_place<S>(p.v, batch, kv_head, k0, listed, listed_head);
      values.ahead = ahead;
      if (p.v.paged()) return accumulate_rows<Vec, S, Listed>(values, nk, value_dim_pad, probs, readers, out);
      return accumulate_rows<Vec, S, Strided>(values, nk, value_dim_pad, probs, readers, out);
    }
    const int64_t step = keys_widened_at_a_time(readers, nk);
    for (int64_t j0 = 0; j0 < nk; j0 += step) {
      const int64_t nj = min_i64(step, nk - j0);
      auto values = rows_widened<Vec>(p.v, batch, kv_head, k0 + j0, nj, p.value_dim, value_dim_pad, pack);
      values.ahead = ahead;
      accumulate_rows<Vec, typename Vec::T, Strided>(values, nj, value_dim_pad, probs + j0, readers, out);
    }
  }

  // Whether a work item prefetches what it reads next (ReadAhead), measured on Zen 4 (2 threads, 8 kv heads
  // x 65536 keys, D = 128): contiguous rows read by one query row stream at memory speed with the hardware
  // prefetchers alone (the requests cost int8 and bfloat16 10-20%); GQA groups gained 10-45%, and a paged
  // pool, whose shuffled blocks no hardware prefetcher follows, 10-35% for one query row and up to 1.5x
  // for groups (float32 g4 23.4 -> 18.5 ms, as fast as contiguous rows). So paged rows and GQA groups
  // always; contiguous one-row streams only where the CPU's prefetchers fall short of the bandwidth
  // (AttnParams::read_ahead_streams, set on Intel CPUs: on the Xeon measured, float32 g1 88% -> 99% of it).
  static bool reads_ahead(const AttnParams& p, int64_t group_rows) {
    return p.k.paged() || p.v.paged() || group_rows > 1 || p.read_ahead_streams;
  }

  // Queues rows [r0, r0 + n) of kv heads [kv_first, kv_first + kv_count) of t, `width` elements of S each, for
  // prefetching. Where a token's heads lie side by side (head_stride is one head's row), as in vLLM's
  // (num_blocks, block_size, Hkv, D) pools and their (num_blocks, block_size, Hkv) int8 scales, the item's heads
  // of a token are one row: the requests follow the pool in address order. Queued head by head, they walked
  // each block once per kv head at the token stride (4 KiB for float32, D = 128, 8 heads), and paged one-row
  // decode ran 1.3-1.8x slower than contiguous; token by token 1.1-1.5x, bfloat16 g4 1.2x -> 1.0x (AMD EPYC
  // Zen 1, 2 threads, contiguous and paged alternating in one process).
  template <class S>
  static void queue_item_rows(ReadAhead& ahead, const StridedTensor& t, int64_t batch, int64_t kv_first, int64_t kv_count,
                              int64_t r0, int64_t n, int64_t width) {
    const int64_t head_span = (width - 1) * t.col_stride + 1;  // elements from a head's first to its last
    constexpr int64_t kBytes = sizeof(S);
    if (t.head_stride == head_span) return queue_rows<S>(ahead, t, batch, kv_first, r0, n, kv_count * head_span * kBytes);
    for (int64_t g = 0; g < kv_count; ++g) queue_rows<S>(ahead, t, batch, kv_first + g, r0, n, head_span * kBytes);
  }

  // Queues rows [r0, r0 + n) of (batch, head) of t, the first row_bytes of each.
  template <class S>
  static void queue_rows(ReadAhead& ahead, const StridedTensor& t, int64_t batch, int64_t head, int64_t r0, int64_t n,
                         int64_t row_bytes) {
    const int64_t stride_bytes = t.row_stride * static_cast<int64_t>(sizeof(S));
    for (int64_t j = 0; j < n;) {
      const int64_t run = rows_in_run(t, r0 + j, n - j);
      ahead.add(t.row<const S>(batch, head, r0 + j), stride_bytes, row_bytes, run);
      j += run;
    }
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
    using S = KvStorage<Vec>;
    const S** listed = reinterpret_cast<const S**>(scratch);  // paged rows read in place: kv head kv_first's
    T* q_rows = scratch + pointer_slots<T>();
    T* scores = q_rows + rows * dim_pad;
    T* k_pack = scores + rows * kBlockK;
    T* v_pack = k_pack + kBlockK * dim_pad;
    T* k_scales = v_pack + kBlockK * value_dim_pad;  // [kv head of the item][key of the block]
    T* v_scales = k_scales + kv_count * kBlockK;
    const T neg_inf = -std::numeric_limits<T>::infinity();
    const bool k_in_place = read_in_place<Vec>(p.k, dim, group_rows);
    const bool v_in_place = read_in_place<Vec>(p.v, p.value_dim, group_rows);
    const int64_t sweep = kv_count > 1 ? keys_per_sweep(kv_count * dim * static_cast<int64_t>(sizeof(S))) : kBlockK;

    // Q rows scaled, each element in the lane where the score loops' K reads put its key element.
    auto q_lane = [&](int64_t d) { return k_in_place ? RowReader<Vec, KvStorage<Vec>>::lane_of(d) : d; };
    for (int64_t r = 0; r < rows; ++r) {
      const typename Vec::S* q_row = p.q.row<const typename Vec::S>(block.batch, block.head(r), block.query(r));
      for (int64_t d = dim; d < dim_pad; ++d) q_rows[r * dim_pad + d] = T(0);
      for (int64_t d = 0; d < dim; ++d) q_rows[r * dim_pad + q_lane(d)] = widen(q_row[d * p.q.col_stride]) * scale;
    }

    // The loops read a sweep's K rows (every kv head of the item), then the next sweep's, ..., then the
    // block's V rows sweep by sweep, then the next block's K: while one is read, the next is prefetched.
    ReadAhead read_ahead;
    ReadAhead* ahead = reads_ahead(p, group_rows) ? &read_ahead : nullptr;
    // scale_keys: int8 scales of keys [first, first + scale_keys) queued too (the next block's, a phase ahead:
    // unrequested, a pool's scales were read at DRAM latency, a block's pool blocks one after the other).
    auto prefetch_next = [&](ReadAhead::Phase phase, const StridedTensor& t, int64_t width, int64_t first, int64_t n,
                             int64_t visits_hint, int64_t scale_keys) {
      ahead->start(phase);
      queue_item_rows<KvStorage<Vec>>(*ahead, t, block.batch, kv_first, kv_count, first, n, width);
      if constexpr (kInt8Kv<Vec>) {
        if (scale_keys > 0) {
          queue_item_rows<float>(*ahead, p.k_scale, block.batch, kv_first, kv_count, first, scale_keys, 1);
          queue_item_rows<float>(*ahead, p.v_scale, block.batch, kv_first, kv_count, first, scale_keys, 1);
        }
      }
      ahead->queued(visits_hint);
    };
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
      const int64_t nk = min_i64(kBlockK, k_end - k0), nk_pad = round_up(nk, W);
      for (int64_t j0 = 0; j0 < nk; j0 += sweep) {
        const int64_t nj = min_i64(sweep, nk - j0);
        if (ahead) {
          if (j0 + sweep < nk)
            prefetch_next(ReadAhead::kScores, p.k, dim, k0 + j0 + sweep, min_i64(sweep, nk - j0 - sweep), nj * kv_count, 0);
          else
            prefetch_next(ReadAhead::kScores, p.v, p.value_dim, k0, min_i64(sweep, nk), nj * kv_count, 0);
        }
        if (k_in_place && p.k.paged()) list_rows<S>(p.k, block.batch, kv_first, k0 + j0, nj, listed);
        for (int64_t g = 0; g < kv_count; ++g) {
          const int64_t r0 = g * group_rows;
          score_head<Vec>(p, block.batch, kv_first + g, k0 + j0, nj, dim_pad, k_in_place, q_rows + r0 * dim_pad,
                          group_rows, scores + r0 * kBlockK + j0, k_pack, listed, kv_first, ahead);
        }
      }
      if constexpr (kInt8Kv<Vec>) {
        key_scales(p.k_scale, block.batch, kv_first, kv_count, k0, nk, k_scales);
        key_scales(p.v_scale, block.batch, kv_first, kv_count, k0, nk, v_scales);
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

      for (int64_t j0 = 0; j0 < nk; j0 += sweep) {
        const int64_t nj = min_i64(sweep, nk - j0);
        if (ahead) {
          if (j0 + sweep < nk)
            prefetch_next(ReadAhead::kValues, p.v, p.value_dim, k0 + j0 + sweep, min_i64(sweep, nk - j0 - sweep), nj * kv_count,
                          0);
          else
            prefetch_next(ReadAhead::kValues, p.k, dim, k0 + kBlockK, min_i64(sweep, k_end - k0 - kBlockK), nj * kv_count,
                          min_i64(kBlockK, k_end - k0 - kBlockK));
        }
        if (v_in_place && p.v.paged()) list_rows<S>(p.v, block.batch, kv_first, k0 + j0, nj, listed);
        for (int64_t g = 0; g < kv_count; ++g) {
          const int64_t r0 = g * group_rows;
          accumulate_head<Vec>(p, block.batch, kv_first + g, k0 + j0, nj, value_dim_pad, v_in_place,
                               scores + r0 * kBlockK + j0, group_rows, acc.o + r0 * value_dim_pad, v_pack, listed, kv_first,
                               ahead);
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
