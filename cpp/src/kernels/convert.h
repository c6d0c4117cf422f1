// Loads and stores between the caller's storage type S and the compute type: identity for float and
// double; bfloat16 and float16 widen to float on load and round to nearest-even on store. Included
// inside each kernel's ISA namespace; float16 uses the F16C instructions where the TU is built with them.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float widen(int8_t x) { return static_cast<float>(x); }  // quantised K / V, before its scale

inline void narrow(float* dst, float x) { *dst = x; }
inline void narrow(double* dst, double x) { *dst = x; }
inline void narrow(BFloat16* dst, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN: keep it a (quiet) NaN, which truncation might not
    dst->bits = static_cast<uint16_t>((bits >> 16) | 0x0040u);
    return;
  }
  dst->bits = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
}

#ifdef __F16C__
inline float widen(Float16 x) { return _cvtsh_ss(x.bits); }
inline void narrow(Float16* dst, float x) { dst->bits = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
#else
inline float widen(Float16 x) {
  const uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf / NaN
  } else if (exponent == 0) {                       // zero / subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  } else {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline void narrow(Float16* dst, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7FFFFFFFu;
  uint32_t half;
  if (magnitude > 0x7F800000u) {
    half = 0x7E00u;  // NaN
  } else if (magnitude >= 0x477FF000u) {
    half = 0x7C00u;  // rounds to infinity (>= 65520)
  } else if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half, mantissa = round(|x| * 2^24)
    float absolute;
    std::memcpy(&absolute, &magnitude, sizeof absolute);
    half = static_cast<uint32_t>(std::nearbyint(absolute * 16777216.0f));
  } else {  // normal: rebias the exponent, round the mantissa to nearest even at bit 13
    half = ((magnitude + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13) - (112u << 10);
  }
  dst->bits = static_cast<uint16_t>(sign | half);
}
#endif

// dst[i] = widen(src[i]) for `count` contiguous elements: the decode layout's K / V rows, the memory-bound
// path, where a scalar conversion per element would cost more than reading the element did.
template <class S, class T>
inline void widen_contiguous(const S* src, int64_t count, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = widen(src[i]);
}

// One vector of floats from contiguous 16-bit or int8 storage: bfloat16 is the high half of a float
// (widen the words, shift them up), float16 converts (F16C), int8 sign-extends and converts (exact: it
// fits float's mantissa).
#if defined(__AVX512F__)
constexpr int kWidenLanes = 16;
inline __m512 widen_vector(const BFloat16* src) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
}
inline __m512 widen_vector(const Float16* src) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
inline __m512 widen_vector(const int8_t* src) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}
#elif defined(__AVX2__) && defined(__F16C__)
constexpr int kWidenLanes = 8;
inline __m256 widen_vector(const BFloat16* src) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))), 16));
}
inline __m256 widen_vector(const Float16* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
inline __m256 widen_vector(const int8_t* src) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))));
}
#else
constexpr int kWidenLanes = 0;  // no vector widening on this ISA
#endif

// Vec::W contiguous elements of storage S as one vector of the compute type: a plain load when S is
// the compute type, else widened in registers (a scalar loop where the ISA has no vector widening).
template <class Vec, class S>
inline typename Vec::V load_widened(const S* src) {
  using T = typename Vec::T;
  if constexpr (std::is_same_v<S, T>) {
    return Vec::loadu(src);
  } else if constexpr (std::is_same_v<T, float> && Vec::W == kWidenLanes) {
    return widen_vector(src);
  } else {  // float64 compute, or the scalar path
    alignas(64) T lanes[Vec::W];
    for (int i = 0; i < Vec::W; ++i) lanes[i] = static_cast<T>(widen(src[i]));
    return Vec::load(lanes);
  }
}

// How the decode loops read a K / V row of storage S: kElements contiguous elements at a time, as kVecs
// vectors of the compute type. The lanes may hold the elements in another order than memory's, which only
// the query row (arranged to match, lane_of) and the output's registers (natural_to_lanes / lanes_to_natural
// around a run of keys) need to know. Natural order, one vector at a time, for every storage but AVX2
// bfloat16 (below).
template <class Vec, class S, class = void>
struct RowReader {
  using V = typename Vec::V;
  static constexpr int kElements = Vec::W, kVecs = 1;
  static void load(const S* src, V* out) { out[0] = load_widened<Vec>(src); }
  static int64_t lane_of(int64_t element) { return element; }
  static void natural_to_lanes(V*) {}
  static void lanes_to_natural(V*) {}
};

#if defined(__AVX2__)
// AVX2 bfloat16: two in-lane word unpacks against zero widen 16 elements, one op per 8 elements where the
// zero-extension across 128-bit lanes and the shift cost two (the widening bound bfloat16 decode on Zen 1).
// Vector 0 holds elements 0-3 | 8-11, vector 1 elements 4-7 | 12-15 (each 128-bit lane's low then high
// words).
template <class Vec>
struct RowReader<Vec, BFloat16, std::enable_if_t<Vec::W == 8 && std::is_same_v<typename Vec::T, float>>> {
  using V = __m256;
  static constexpr int kElements = 16, kVecs = 2;
  static void load(const BFloat16* src, V* out) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), words));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), words));
  }
  static int64_t lane_of(int64_t element) {
    const int64_t e = element % kElements;
    return element - e + (e / 4 % 2) * 8 + e / 8 * 4 + e % 4;
  }
  // Elements 0-7 | 8-15 <-> the load's order: swapping the middle 128-bit halves, its own inverse.
  static void natural_to_lanes(V* v) {
    const V first = v[0];
    v[0] = _mm256_permute2f128_ps(first, v[1], 0x20);
    v[1] = _mm256_permute2f128_ps(first, v[1], 0x31);
  }
  static void lanes_to_natural(V* v) { natural_to_lanes(v); }
};
#endif

#if defined(__AVX512F__)
template <class S>
inline void widen_contiguous_vectors(const S* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) _mm512_storeu_ps(dst + i, widen_vector(src + i));
  for (; i < count; ++i) dst[i] = widen(src[i]);
}
#elif defined(__AVX2__) && defined(__F16C__)
template <class S>
inline void widen_contiguous_vectors(const S* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, widen_vector(src + i));
  for (; i < count; ++i) dst[i] = widen(src[i]);
}
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
inline void widen_contiguous(const BFloat16* src, int64_t count, float* dst) { widen_contiguous_vectors(src, count, dst); }
inline void widen_contiguous(const Float16* src, int64_t count, float* dst) { widen_contiguous_vectors(src, count, dst); }
inline void widen_contiguous(const int8_t* src, int64_t count, float* dst) { widen_contiguous_vectors(src, count, dst); }
#endif

// The compute type and the vector policy of a storage type: 16-bit storage computes in float.
template <class Base, class Storage>
struct WithStorage : Base {
  using S = Storage;
};

// K and V stored as int8 with per-key scales (AttnParams::kv_int8), q and out as Base says.
template <class Base>
struct WithInt8Kv : Base {
  using KvS = int8_t;
};

// The storage type of K and V: Vec::KvS where a policy sets it (WithInt8Kv), else q's storage Vec::S.
template <class Vec, class = void>
struct KvStorageOf {
  using type = typename Vec::S;
};
template <class Vec>
struct KvStorageOf<Vec, std::void_t<typename Vec::KvS>> {
  using type = typename Vec::KvS;
};
template <class Vec>
using KvStorage = typename KvStorageOf<Vec>::type;
template <class Vec>
constexpr bool kInt8Kv = std::is_same_v<KvStorage<Vec>, int8_t>;

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
