// Shared by every pass of the vector kernels: integer helpers, the block sizes and the scratch buffer.
// Like every kernel header, included inside the ISA's namespace (FUSEDATTN_KERNEL_NS, see
// attn_fwd_impl.h).
#pragma once

#ifndef FUSEDATTN_ALWAYS_INLINE
#if defined(__GNUC__) || defined(__clang__)
#define FUSEDATTN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FUSEDATTN_ALWAYS_INLINE inline
#endif
#endif

// Unrolls a loop over a register array (accumulators, the vectors of a row) before the compiler decides
// whether the array lives in registers: GCC scalarises an array only when every index is a constant, and
// left to itself it unrolls some of these loops too late (the bigger bodies: int8 and 16-bit rows), so the
// accumulators were written back to the stack on every key (AVX2 int8 values: 9 stores per 8 FMAs).
#ifndef FUSEDATTN_UNROLL
#if defined(__clang__)
#define FUSEDATTN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define FUSEDATTN_UNROLL _Pragma("GCC unroll 32")
#else
#define FUSEDATTN_UNROLL
#endif
#endif

namespace fusedattn::FUSEDATTN_KERNEL_NS {

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <class T>
void fill_zero(T* data, int64_t count) {
  for (int64_t e = 0; e < count; ++e) data[e] = T(0);
}

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;  // keys per score tile: S^T is kBlockK x kBlockQ, 16 KiB in fp32

// How many of the n rows from row r are row_stride apart in memory: all of them, or up to the end of r's
// pool block when t is paged.
inline int64_t rows_in_run(const StridedTensor& t, int64_t r, int64_t n) {
  return t.paged() ? min_i64(n, t.pages.block_size - r % t.pages.block_size) : n;
}

// Calls f(j, pointer to row r0 + j) for rows [r0, r0 + n) of (batch, head): one page-table lookup per
// block crossed, not a division per row.
template <class T, class F>
inline void for_rows(const StridedTensor& t, int64_t batch, int64_t head, int64_t r0, int64_t n, F f) {
  for (int64_t j = 0; j < n;) {
    T* first = t.row<T>(batch, head, r0 + j);
    const int64_t run = rows_in_run(t, r0 + j, n - j);
    for (int64_t i = 0; i < run; ++i) f(j + i, first + i * t.row_stride);
    j += run;
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

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
