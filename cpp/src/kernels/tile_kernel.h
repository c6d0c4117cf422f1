// The register-tiled micro-kernel every product of the vector kernels runs on, and the transposing
// copy between the caller's layout and the packed lane-major tiles.
#pragma once

#include "kernels/common.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

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
// both sides are contiguous along c / r: directly where both hold the compute type, else through a block
// of it (16-bit Q rows into Q^T, O^T into 16-bit output rows: converted one by one down the columns, those
// took ~12% of a short bfloat16 prefill on AMX tiles, 4 x 16 x 256^2 x 64). The edges and other layouts go
// element by element.
template <class Vec, class Src, class Dst>
void transpose_copy(int64_t rows, int64_t cols, const Src* src, int64_t src_row, int64_t src_col, Dst* dst,
                    int64_t dst_row, int64_t dst_col) {
  constexpr int W = Vec::W;
  using T = typename Vec::T;
  int64_t full_rows = 0, full_cols = 0;
  if (src_col == 1 && dst_col == 1) {
    full_rows = rows / W * W;
    full_cols = cols / W * W;
    for (int64_t r = 0; r < full_rows; r += W)
      for (int64_t c = 0; c < full_cols; c += W) {
        if constexpr (std::is_same_v<Src, T> && std::is_same_v<Dst, T>) {
          Vec::transpose(src + r * src_row + c, src_row, dst + c * dst_row + r, dst_row);
        } else {
          alignas(64) T block[W * W], block_t[W * W];
          for (int i = 0; i < W; ++i) widen_contiguous(src + (r + i) * src_row + c, W, block + i * W);
          Vec::transpose(block, W, block_t, W);
          for (int i = 0; i < W; ++i)
            for (int j = 0; j < W; ++j) narrow(dst + (c + i) * dst_row + r + j, block_t[i * W + j]);
        }
      }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first_col = r < full_rows ? full_cols : 0;
    for (int64_t c = first_col; c < cols; ++c)
      narrow(dst + c * dst_row + r * dst_col, static_cast<T>(widen(src[r * src_row + c * src_col])));
  }
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
