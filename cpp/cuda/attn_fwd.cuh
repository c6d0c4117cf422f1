// FlashAttention-2 forward on NVIDIA GPUs: the one kernel template and its one launch configuration.
//
// A thread block owns one (batch, query head, block of kBlockQ queries). It streams the kv head's keys
// and values through shared memory kBlockK rows at a time and keeps, per query row, the running max m,
// the running sum l and the unnormalised output o in registers (online softmax, float32):
//
//   m' = max(m, max_j s_j);  p_j = exp(s_j - m');  l = l * exp(m - m') + sum_j p_j;  o = o * exp(m - m') + P V
//
// exp(-inf - -inf) is never evaluated: a row that has seen no visible key keeps m = -inf, l = 0, o = 0,
// and is written as 0 with lse = -inf (the CPU path's semantics for fully masked rows).
//
// Policies (template parameters) rather than branches:
//   - element type T (float, __half, __nv_bfloat16): storage only, every sum is float32;
//   - kMaxD, the head-dim bucket (64, 128, 256): sizes the tiles and the per-thread output registers;
//   - kMask (none, bool, float): the mask read compiles away when there is none;
//   - Scores: how the S = Q K^T tile is computed: SimtScores (CUDA cores, any architecture) or
//     MmaScores (tensor cores through WMMA, 16-bit inputs on sm_80+; SIMT below that).
//
// Not yet verified on a GPU (no device was available when this was written): see README "CUDA".
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "check.h"
#include "kernel_params.h"

namespace fusedattn {
namespace cuda {
namespace detail {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as the CPU path stores 16-bit outputs.
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr int round_up(int x, int to) { return (x + to - 1) / to * to; }

// Block sizes per (element type, head-dim bucket). Each thread owns one query row (kThreadsPerRow
// consecutive lanes share it), kBlockK / kThreadsPerRow of its scores and kMaxD / kThreadsPerRow of its
// output columns. Sizes keep the output registers at <= 64 floats per thread and the shared memory
// within sm_80's opt-in limit (163 KB); they are first guesses, not tuned on a GPU yet.
template <class T, int kMaxD>
struct TileConfig {
  static_assert(kMaxD == 64 || kMaxD == 128 || kMaxD == 256, "head-dim buckets are 64, 128 and 256");
  static constexpr bool kFloat32 = std::is_same<T, float>::value;
  static constexpr int kBlockQ = kMaxD <= 128 ? 64 : 32;
  // float32 tiles are twice the bytes: fewer keys per tile keeps them within the shared memory budget.
  static constexpr int kBlockK = kMaxD == 64 ? 64 : kMaxD == 128 ? (kFloat32 ? 32 : 64) : (kFloat32 ? 16 : 32);
  static constexpr int kThreadsPerRow = kThreads / kBlockQ;
  static constexpr int kScoresPerThread = kBlockK / kThreadsPerRow;
  static constexpr int kColsPerThread = kMaxD / kThreadsPerRow;
  // Rows padded by 16 bytes: keeps WMMA's leading dimension a multiple of 16 bytes and spreads the
  // rows that one warp reads at the same column over different banks.
  static constexpr int kLd = kMaxD + 16 / int(sizeof(T));
  static constexpr int kLdS = kBlockK + 4;  // float scores / probabilities
  static constexpr int kQBytes = round_up(kBlockQ * kLd * int(sizeof(T)), 128);
  static constexpr int kKBytes = round_up(kBlockK * kLd * int(sizeof(T)), 128);
  static constexpr int kSBytes = round_up(kBlockQ * kLdS * int(sizeof(float)), 128);
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kKOffset + kKBytes;
  static constexpr int kSOffset = kVOffset + kKBytes;
  static constexpr int kSmemBytes = kSOffset + kSBytes;

  static_assert(kThreads % kBlockQ == 0, "every query row needs the same number of threads");
  static_assert(kThreadsPerRow <= 32 && (kThreadsPerRow & (kThreadsPerRow - 1)) == 0,
                "a row's threads must be a power-of-two group inside one warp (shuffle reductions)");
  static_assert(kBlockK % kThreadsPerRow == 0 && kMaxD % kThreadsPerRow == 0, "columns split evenly over a row");
  static_assert(kBlockQ % 16 == 0 && kBlockK % 16 == 0 && kMaxD % 16 == 0, "WMMA works on 16x16x16 tiles");
  static_assert(kColsPerThread <= 64, "more output registers per thread would spill");
};

// Max / sum over the kThreadsPerRow lanes that share a query row. Every lane of the warp must call it.
template <int kGroup>
__device__ __forceinline__ float row_max(float x) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
template <int kGroup>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Copies rows [0, rows) x columns [0, cols) of a strided global tile into shared memory (leading
// dimension kLd); rows at or past `rows_valid` become zeros, so padded keys and values contribute
// nothing (0 * garbage could be NaN). Columns past `cols` are left as they are: zero since the start.
template <int kLd, class T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int64_t col_stride, int rows,
                                          int rows_valid, int cols) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {
    if (r < rows_valid) {
      const T* row = src + r * row_stride;
      for (int c = lane; c < cols; c += 32) dst[r * kLd + c] = row[c * col_stride];
    } else {
      for (int c = lane; c < cols; c += 32) dst[r * kLd + c] = from_float<T>(0.0f);
    }
  }
}

// S = Q K^T on CUDA cores: thread (row, lane_in_row) computes keys lane_in_row + jj * kThreadsPerRow.
struct SimtScores {
  template <class Tile, class T>
  __device__ __forceinline__ static void compute(float* S, const T* Qs, const T* Ks, int head_dim) {
    const int row = threadIdx.x / Tile::kThreadsPerRow, lane_in_row = threadIdx.x % Tile::kThreadsPerRow;
    float acc[Tile::kScoresPerThread];
#pragma unroll
    for (int jj = 0; jj < Tile::kScoresPerThread; ++jj) acc[jj] = 0.0f;
    for (int d = 0; d < head_dim; ++d) {
      const float qd = to_float(Qs[row * Tile::kLd + d]);
#pragma unroll
      for (int jj = 0; jj < Tile::kScoresPerThread; ++jj)
        acc[jj] = fmaf(qd, to_float(Ks[(lane_in_row + jj * Tile::kThreadsPerRow) * Tile::kLd + d]), acc[jj]);
    }
#pragma unroll
    for (int jj = 0; jj < Tile::kScoresPerThread; ++jj)
      S[row * Tile::kLdS + lane_in_row + jj * Tile::kThreadsPerRow] = acc[jj];
  }
};

// S = Q K^T on tensor cores (16-bit inputs, float32 accumulation), one 16x16 tile per warp at a time.
// The head dim is padded to a multiple of 16 with the zeros the tiles were initialised with.
struct MmaScores {
  template <class Tile, class T>
  __device__ __forceinline__ static void compute(float* S, const T* Qs, const T* Ks, int head_dim) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, float>::value) {
      SimtScores::compute<Tile>(S, Qs, Ks, head_dim);  // tf32 would change float32 results: not used
    } else {
      namespace wmma = nvcuda::wmma;
      constexpr int kTilesK = Tile::kBlockK / 16;
      constexpr int kTiles = (Tile::kBlockQ / 16) * kTilesK;
      const int steps = (head_dim + 15) / 16;
      for (int t = threadIdx.x / 32; t < kTiles; t += kWarps) {
        const int ti = t / kTilesK, tj = t % kTilesK;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int step = 0; step < steps; ++step) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          // K^T as a column-major B: element (d, key) sits at Ks[key * kLd + d].
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(a, Qs + ti * 16 * Tile::kLd + step * 16, Tile::kLd);
          wmma::load_matrix_sync(b, Ks + tj * 16 * Tile::kLd + step * 16, Tile::kLd);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(S + ti * 16 * Tile::kLdS + tj * 16, acc, Tile::kLdS, wmma::mem_row_major);
      }
    }
#else
    SimtScores::compute<Tile>(S, Qs, Ks, head_dim);
#endif
  }
};

template <class T, int kMaxD, MaskKind kMask, class Scores>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const KernelParams p) {
  using Tile = TileConfig<T, kMaxD>;
  constexpr int kBlockQ = Tile::kBlockQ, kBlockK = Tile::kBlockK, kGroup = Tile::kThreadsPerRow;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + Tile::kKOffset);
  T* Vs = reinterpret_cast<T*>(smem + Tile::kVOffset);
  float* S = reinterpret_cast<float*>(smem + Tile::kSOffset);

  // Blocks of one (batch, head) are adjacent, so they share that kv head's K and V in L2.
  const int64_t q_blocks = (p.len_q + kBlockQ - 1) / kBlockQ;
  const int64_t q_block = blockIdx.x % q_blocks;
  const int64_t head = (blockIdx.x / q_blocks) % p.heads_q;
  const int64_t batch = blockIdx.x / q_blocks / p.heads_q;
  const int64_t kv_head = head / (p.heads_q / p.heads_kv);
  const int64_t q0 = q_block * kBlockQ;
  const int rows_q = static_cast<int>(p.len_q - q0 < kBlockQ ? p.len_q - q0 : kBlockQ);

  const int row = threadIdx.x / kGroup, lane_in_row = threadIdx.x % kGroup;
  const int64_t query = q0 + row;
  const bool row_valid = row < rows_q;

  // Zero everything once: padding columns (D up to the bucket, rounded for WMMA) are never written again.
  for (int x = threadIdx.x; x < Tile::kSmemBytes / 16; x += kThreads) reinterpret_cast<int4*>(smem)[x] = make_int4(0, 0, 0, 0);
  __syncthreads();

  const T* q_tile = static_cast<const T*>(p.q.data) + p.q.batch_offsets[batch] + head * p.q.head_stride + q0 * p.q.row_stride;
  load_tile<Tile::kLd>(Qs, q_tile, p.q.row_stride, p.q.col_stride, kBlockQ, rows_q, static_cast<int>(p.head_dim));
  const T* k_head = static_cast<const T*>(p.k.data) + p.k.batch_offsets[batch] + kv_head * p.k.head_stride;
  const T* v_head = static_cast<const T*>(p.v.data) + p.v.batch_offsets[batch] + kv_head * p.v.head_stride;

  // This thread's mask row; only dereferenced for valid rows and keys.
  const unsigned char* mask_row_bool = nullptr;
  const float* mask_row_float = nullptr;
  if (kMask != MaskKind::kNone && row_valid) {
    const int64_t offset = p.mask.batch_offsets[batch] + head * p.mask.head_stride + query * p.mask.row_stride;
    if (kMask == MaskKind::kBool) mask_row_bool = static_cast<const unsigned char*>(p.mask.data) + offset;
    if (kMask == MaskKind::kAdditive) mask_row_float = static_cast<const float*>(p.mask.data) + offset;
  }

  // Under causal masking no row of this block sees keys past the last row's diagonal: skip those tiles.
  int64_t key_end = p.len_k;
  if (p.causal) {
    const int64_t last_visible = q0 + rows_q - 1 + p.diagonal_offset;
    key_end = last_visible + 1 < key_end ? last_visible + 1 : key_end;
    key_end = key_end < 0 ? 0 : key_end;
  }

  float m = kNegInf, l = 0.0f;
  float o[Tile::kColsPerThread];
#pragma unroll
  for (int cc = 0; cc < Tile::kColsPerThread; ++cc) o[cc] = 0.0f;

  for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
    const int rows_k = static_cast<int>(p.len_k - k0 < kBlockK ? p.len_k - k0 : kBlockK);
    __syncthreads();  // the previous tile's P V is done with Ks, Vs and S
    load_tile<Tile::kLd>(Ks, k_head + k0 * p.k.row_stride, p.k.row_stride, p.k.col_stride, kBlockK, rows_k,
                         static_cast<int>(p.head_dim));
    load_tile<Tile::kLd>(Vs, v_head + k0 * p.v.row_stride, p.v.row_stride, p.v.col_stride, kBlockK, rows_k,
                         static_cast<int>(p.value_dim));
    __syncthreads();
    Scores::template compute<Tile>(S, Qs, Ks, static_cast<int>(p.head_dim));
    __syncthreads();

    // Scale, mask and the online-softmax update; each thread rewrites its own scores as probabilities.
    float s[Tile::kScoresPerThread];
    float tile_max = kNegInf;
#pragma unroll
    for (int jj = 0; jj < Tile::kScoresPerThread; ++jj) {
      const int j = lane_in_row + jj * kGroup;
      const int64_t key = k0 + j;
      bool visible = row_valid && j < rows_k && (!p.causal || key <= query + p.diagonal_offset);
      float x = S[row * Tile::kLdS + j] * p.scale;
      if (kMask == MaskKind::kBool && visible) visible = mask_row_bool[key * p.mask.col_stride] != 0;
      if (kMask == MaskKind::kAdditive && visible) x += mask_row_float[key * p.mask.col_stride];
      s[jj] = visible ? x : kNegInf;
      tile_max = fmaxf(tile_max, s[jj]);
    }
    const float m_new = fmaxf(m, row_max<kGroup>(tile_max));
    const float alpha = m_new == kNegInf ? 1.0f : expf(m - m_new);  // exp(-inf) = 0 on the first visible tile
    float sum = 0.0f;
#pragma unroll
    for (int jj = 0; jj < Tile::kScoresPerThread; ++jj) {
      const float prob = s[jj] == kNegInf ? 0.0f : expf(s[jj] - m_new);
      S[row * Tile::kLdS + lane_in_row + jj * kGroup] = prob;
      sum += prob;
    }
    l = l * alpha + row_sum<kGroup>(sum);
    m = m_new;
#pragma unroll
    for (int cc = 0; cc < Tile::kColsPerThread; ++cc) o[cc] *= alpha;
    __syncthreads();  // the whole row's probabilities are written

    // o += P V on CUDA cores; the row's threads split the value columns.
    for (int j = 0; j < rows_k; ++j) {
      const float prob = S[row * Tile::kLdS + j];
#pragma unroll
      for (int cc = 0; cc < Tile::kColsPerThread; ++cc)
        o[cc] = fmaf(prob, to_float(Vs[j * Tile::kLd + lane_in_row + cc * kGroup]), o[cc]);
    }
  }

  if (!row_valid) return;
  const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
  const int64_t out_offset = p.out.batch_offsets[batch] + head * p.out.head_stride + query * p.out.row_stride;
#pragma unroll
  for (int cc = 0; cc < Tile::kColsPerThread; ++cc) {
    const int c = lane_in_row + cc * kGroup;
    if (c >= p.value_dim) break;
    if (p.out_float32)
      static_cast<float*>(p.out.data)[out_offset + c * p.out.col_stride] = o[cc] * inv_l;
    else
      static_cast<T*>(p.out.data)[out_offset + c * p.out.col_stride] = from_float<T>(o[cc] * inv_l);
  }
  if (p.lse.data && lane_in_row == 0) {
    const int64_t offset = p.lse.batch_offsets[batch] + head * p.lse.head_stride + query * p.lse.row_stride;
    static_cast<float*>(p.lse.data)[offset] = l > 0.0f ? m + logf(l) : kNegInf;
  }
}

// float32 scores on CUDA cores; 16-bit scores on tensor cores where the architecture has them.
template <class T>
using ScoresFor = typename std::conditional<std::is_same<T, float>::value, SimtScores, MmaScores>::type;

template <class T, int kMaxD, MaskKind kMask>
void launch(const KernelParams& p, cudaStream_t stream) {
  using Tile = TileConfig<T, kMaxD>;
  auto* kernel = &attention_forward_kernel<T, kMaxD, kMask, ScoresFor<T>>;
  const int bytes = Tile::kSmemBytes;
  if (bytes > 48 * 1024) {  // above 48 KB, dynamic shared memory is opt-in per kernel
    int device = 0, limit = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
    if (bytes > limit)
      throw std::runtime_error("fusedattn CUDA: head dim " + std::to_string(p.head_dim > p.value_dim ? p.head_dim : p.value_dim) +
                               " needs " + std::to_string(bytes) + " bytes of shared memory per block; device " +
                               std::to_string(device) + " allows " + std::to_string(limit));
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "cudaFuncSetAttribute");
  }
  const int64_t blocks = p.batch * p.heads_q * ((p.len_q + Tile::kBlockQ - 1) / Tile::kBlockQ);
  if (blocks > 2147483647LL) throw std::invalid_argument("attention (CUDA): batch * heads * query blocks exceeds 2^31 - 1");
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(p);
  check(cudaGetLastError(), "kernel launch");
}

template <class T, int kMaxD>
void launch_for_mask(const KernelParams& p, MaskKind mask_kind, cudaStream_t stream) {
  switch (mask_kind) {
    case MaskKind::kNone: return launch<T, kMaxD, MaskKind::kNone>(p, stream);
    case MaskKind::kBool: return launch<T, kMaxD, MaskKind::kBool>(p, stream);
    case MaskKind::kAdditive: return launch<T, kMaxD, MaskKind::kAdditive>(p, stream);
  }
  throw std::invalid_argument("attention (CUDA): unknown mask kind");
}

}  // namespace detail

// The launch configuration, in one place: the head-dim bucket picks the tile sizes (TileConfig).
template <class T>
void launch_attention_forward(const KernelParams& p, MaskKind mask_kind, void* stream_handle) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t dim = p.head_dim > p.value_dim ? p.head_dim : p.value_dim;
  if (dim <= 64)
    detail::launch_for_mask<T, 64>(p, mask_kind, stream);
  else if (dim <= 128)
    detail::launch_for_mask<T, 128>(p, mask_kind, stream);
  else
    detail::launch_for_mask<T, 256>(p, mask_kind, stream);
}

}  // namespace cuda
}  // namespace fusedattn
