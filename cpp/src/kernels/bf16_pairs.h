// Native bfloat16 products for CPUs with AVX512-BF16: vdpbf16ps multiplies two bf16 pairs per fp32 lane
// and accumulates in fp32. Included after attn_fwd_impl.h by the avx512bf16 translation unit only, where it
// specialises QueryProducts for bfloat16 storage with dot-product scores; everything else (softmax, masks,
// the band, dropout, the output) is the shared kernel.
//
// vdpbf16ps works on pairs along the depth of a product, so both operands come in pairs:
//   S^T  = K . Q^T     depth D:    K pairs (k[2t], k[2t+1]) are broadcast straight from the caller's rows
//                                  when they are contiguous and D is even (else packed once per tile);
//                                  Q^T is packed once per work item as [D/2][lanes] pairs.
//   O^T += V^T . P^T   depth keys: P^T is rounded to bf16 as [keys/2][lanes] pairs (torch's CPU flash
//                                  attention rounds P to bf16 for this product too); V is packed per tile
//                                  as [keys/2][Dv] pairs with two AVX-512BW word permutes.
// Scores are scaled in fp32 as they leave the registers: pre-scaling Q in bf16 would round once more.
// vdpbf16ps treats bf16 subnormals (below 1.2e-38) as zero: far below anything attention can resolve.
#pragma once

#include "kernels/query_products.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// Two bfloat16 values adjacent along a product's depth, the first in the low half of the 32-bit lane.
struct Bf16Pair {
  uint16_t first, second;
};

// The Score policy of a paired product (see tile_kernel): `score_data` points at the fp32 scale when
// kScaled.
template <bool kScaled>
struct PairedDot {
  template <class Vec>
  static __m512 depth_weight(const float*, int64_t) {
    return _mm512_setzero_ps();
  }
  template <class Vec>
  static __m512 broadcast(const Bf16Pair* a) {
    uint32_t bits;
    std::memcpy(&bits, a, sizeof bits);  // K's rows may sit at any even address: no aligned 32-bit read
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(bits)));
  }
  template <class Vec>
  static __m512 combine(__m512 acc, __m512 a, __m512 b, __m512) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
  template <class Vec>
  static __m512 finish(__m512 acc, const float* scale) {
    if constexpr (kScaled) return _mm512_mul_ps(acc, _mm512_set1_ps(*scale));
    return acc;
  }
};

struct Bf16PairProducts {
  static constexpr int64_t kKeyPairs = kBlockK / 2;

  static int64_t dim_pairs(const AttnParams& p) { return (p.head_dim + 1) / 2; }
  static int64_t value_stride(const AttnParams& p) { return round_up(p.value_dim, 32); }  // whole word permutes
  static int64_t key_stride(const AttnParams& p) { return round_up(dim_pairs(p), 16); }  // packed K, in pairs

  // The products' scratch, in float-sized units: Q^T pairs | P^T pairs | V pairs | K pairs (used when K
  // cannot be read in place). Offsets first, so that the size and the pointers come from one layout.
  struct Offsets {
    int64_t p_pairs, v_pairs, k_pairs, end;
  };
  static Offsets offsets(const AttnParams& p, int64_t lanes) {
    Offsets o;
    o.p_pairs = dim_pairs(p) * lanes;
    o.v_pairs = o.p_pairs + kKeyPairs * lanes;
    o.k_pairs = o.v_pairs + kKeyPairs * value_stride(p);
    o.end = o.k_pairs + kBlockK * key_stride(p);
    return o;
  }
  struct Regions {
    float* q_pairs;
    float* p_pairs;
    Bf16Pair* v_pairs;
    Bf16Pair* k_pairs;
  };
  static Regions regions(const AttnParams& p, int64_t lanes, float* packed) {
    const Offsets o = offsets(p, lanes);
    return {packed, packed + o.p_pairs, reinterpret_cast<Bf16Pair*>(packed + o.v_pairs),
            reinterpret_cast<Bf16Pair*>(packed + o.k_pairs)};
  }

  template <class Vec>
  static int64_t scratch_size(const AttnParams& p, int64_t lanes) {
    return offsets(p, lanes).end;
  }

  // A row of `t` is then `width / 2` pairs in memory, each starting at an even element.
  static bool pairs_in_place(const StridedTensor& t, int64_t width) {
    return t.col_stride == 1 && width % 2 == 0 && t.row_stride % 2 == 0;
  }

  // Q^T as [D/2][lanes] pairs, unscaled; padding lanes (and the odd D's last half pair) are zero.
  template <class Vec>
  static void pack_queries(const AttnParams& p, const RowBlock& block, int64_t lanes, float* packed) {
    const int64_t pairs = dim_pairs(p);
    float* q_words = regions(p, lanes, packed).q_pairs;  // the pairs as 32-bit words, for the transposes
    Bf16Pair* q_pairs = reinterpret_cast<Bf16Pair*>(q_words);
    const BFloat16* q = p.q.row<const BFloat16>(block.batch, block.head0, block.q0);
    for (int64_t t = 0; t < pairs; ++t)
      for (int64_t i = block.nq; i < lanes; ++i) q_pairs[t * lanes + i] = Bf16Pair{0, 0};
    int64_t full_rows = 0, full_pairs = 0;
    if (pairs_in_place(p.q, p.head_dim)) {  // whole 16 x 16 blocks of pairs are a 32-bit transpose
      full_rows = block.nq / 16 * 16;
      full_pairs = pairs / 16 * 16;
      for (int64_t i = 0; i < full_rows; i += 16)
        for (int64_t t = 0; t < full_pairs; t += 16)
          Vec::transpose(reinterpret_cast<const float*>(q + i * p.q.row_stride + 2 * t), p.q.row_stride / 2,
                         q_words + t * lanes + i, lanes);
    }
    for (int64_t i = 0; i < block.nq; ++i) {
      const BFloat16* row = q + i * p.q.row_stride;
      for (int64_t t = i < full_rows ? full_pairs : 0; t < pairs; ++t)
        q_pairs[t * lanes + i] = pair_of(row, 2 * t, p.head_dim, p.q.col_stride);
    }
  }

  // Scaled S^T (nk x lanes), nothing else applied; `packed` also holds K's pairs when K needs packing.
  template <class Vec, class Score>
  static void scores(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                     float* packed, float* s_t) {
    static_assert(std::is_same_v<Score, DotScore>, "paired bf16 products compute dot-product scores only");
    const int64_t pairs = dim_pairs(p);
    const int64_t kv_head = block.head0 / (p.heads_q / p.heads_kv);
    const BFloat16* k = p.k.row<const BFloat16>(block.batch, kv_head, k0);
    const Bf16Pair* keys;
    int64_t stride;  // in pairs
    if (pairs_in_place(p.k, p.head_dim)) {
      keys = reinterpret_cast<const Bf16Pair*>(k);
      stride = p.k.row_stride / 2;
    } else {  // strided columns, odd D (the last pair would read past the row) or odd row strides
      Bf16Pair* k_pairs = regions(p, lanes, packed).k_pairs;
      stride = key_stride(p);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t t = 0; t < pairs; ++t)
          k_pairs[j * stride + t] = pair_of(k + j * p.k.row_stride, 2 * t, p.head_dim, p.k.col_stride);
      keys = k_pairs;
    }
    const float scale = static_cast<float>(p.scale);
    strided_times_packed<Vec, PairedDot<true>, /*kAccumulate=*/false>(nk, lanes, pairs, keys, stride, 1,
                                                                      regions(p, lanes, packed).q_pairs, s_t, &scale);
  }

  // O^T (Dv x lanes) += V^T . P^T, with P^T and the V tile packed in key pairs.
  template <class Vec>
  static void accumulate_values(const AttnParams& p, const RowBlock& block, int64_t lanes, int64_t k0, int64_t nk,
                                const float* p_t, float* packed, float* o_t) {
    const Regions r = regions(p, lanes, packed);
    pack_probabilities(p_t, nk, lanes, r.p_pairs);
    const int64_t kv_head = block.head0 / (p.heads_q / p.heads_kv);
    pack_values(p, p.v.row<const BFloat16>(block.batch, kv_head, k0), nk, r.v_pairs);
    strided_times_packed<Vec, PairedDot<false>, /*kAccumulate=*/true>(p.value_dim, lanes, (nk + 1) / 2, r.v_pairs, 1,
                                                                      value_stride(p), r.p_pairs, o_t);
  }

 private:
  // Elements (index, index + 1) of a strided bf16 row of `size` elements; past the end reads as zero.
  static Bf16Pair pair_of(const BFloat16* row, int64_t index, int64_t size, int64_t stride) {
    return Bf16Pair{row[index * stride].bits, index + 1 < size ? row[(index + 1) * stride].bits : uint16_t(0)};
  }

  // Word indices of _mm512_permutexvar_epi16 / permutex2var_epi16 that interleave two halves: output word
  // 2i is word i of the first half, 2i + 1 word i of the second (offset by `second`).
  static __m512i interleave_words(int first_base, int second_base) {
    alignas(64) uint16_t index[32];
    for (int i = 0; i < 16; ++i) {
      index[2 * i] = static_cast<uint16_t>(first_base + i);
      index[2 * i + 1] = static_cast<uint16_t>(second_base + i);
    }
    return _mm512_load_si512(index);
  }

  // P^T (nk x lanes, fp32) -> [keys/2][lanes] pairs, rounded to nearest even; an odd last key pairs with 0.
  static void pack_probabilities(const float* p_t, int64_t nk, int64_t lanes, float* p_pairs) {
    const __m512i interleave = interleave_words(0, 16);
    for (int64_t j = 0; j < nk; j += 2)
      for (int64_t lane = 0; lane < lanes; lane += 16) {
        const __m512 even = _mm512_load_ps(p_t + j * lanes + lane);
        const __m512 odd = j + 1 < nk ? _mm512_load_ps(p_t + (j + 1) * lanes + lane) : _mm512_setzero_ps();
        const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // words 0-15 even keys, 16-31 odd
        _mm512_store_ps(p_pairs + j / 2 * lanes + lane,
                        _mm512_castsi512_ps(_mm512_permutexvar_epi16(interleave, halves)));
      }
  }

  // V rows [0, nk) -> [keys/2][value_stride] pairs; an odd last key pairs with 0.
  static void pack_values(const AttnParams& p, const BFloat16* v, int64_t nk, Bf16Pair* v_pairs) {
    const int64_t stride = value_stride(p), dim = p.value_dim;
    if (p.v.col_stride != 1) {
      for (int64_t j = 0; j < nk; j += 2)
        for (int64_t e = 0; e < dim; ++e)
          v_pairs[j / 2 * stride + e] =
              Bf16Pair{v[j * p.v.row_stride + e * p.v.col_stride].bits,
                       j + 1 < nk ? v[(j + 1) * p.v.row_stride + e * p.v.col_stride].bits : uint16_t(0)};
      return;
    }
    const __m512i low = interleave_words(0, 32), high = interleave_words(16, 48);
    for (int64_t j = 0; j < nk; j += 2) {
      const BFloat16* first = v + j * p.v.row_stride;
      for (int64_t e = 0; e < dim; e += 32) {
        // Masked loads never touch the words past the row, so a row ending at a page boundary is safe.
        const __mmask32 columns = dim - e >= 32 ? ~__mmask32(0) : (__mmask32(1) << (dim - e)) - 1;
        const __m512i a = _mm512_maskz_loadu_epi16(columns, first + e);
        const __m512i b = j + 1 < nk ? _mm512_maskz_loadu_epi16(columns, first + p.v.row_stride + e) : _mm512_setzero_si512();
        _mm512_storeu_si512(v_pairs + j / 2 * stride + e, _mm512_permutex2var_epi16(a, low, b));
        _mm512_storeu_si512(v_pairs + j / 2 * stride + e + 16, _mm512_permutex2var_epi16(a, high, b));
      }
    }
  }
};

template <>
struct QueryProducts<WithStorage<VecAvx512<float>, BFloat16>, DotScore> {
  using type = Bf16PairProducts;
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
