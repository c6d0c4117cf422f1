// What one CUDA attention launch reads, passed to the kernel by value. Plain data and no CUDA headers,
// so host-only translation units (attention.cpp) can fill it in.
#pragma once

#include <cstdint>

#include "fusedattn/params.h"

namespace fusedattn {
namespace cuda {

// A (batch, head, row, col) view of device memory. Strides are in elements and may be zero (broadcast)
// or negative. `batch_offsets` is a *device* array: leading axes of any rank and strides are flattened
// through it exactly as on the CPU (fusedattn::StridedTensor), so no layout ever needs a copy.
struct DeviceTensor {
  void* data = nullptr;
  const int64_t* batch_offsets = nullptr;
  int64_t head_stride = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

struct KernelParams {
  DeviceTensor q, k, v, out, mask, lse;  // mask: uint8 (bool) or float32; lse: float32, data may be null
  int64_t batch = 0, heads_q = 0, heads_kv = 0, len_q = 0, len_k = 0, head_dim = 0, value_dim = 0;
  int64_t diagonal_offset = 0;  // row i's diagonal is key i + diagonal_offset (alignment, q_start, k_start)
  bool causal = false;          // keys past the diagonal are masked
  bool out_float32 = false;     // 16-bit inputs only: out is float32
  float scale = 1.0f;
};

// Largest D and Dv the CUDA kernels are compiled for (the CPU path goes to 512).
constexpr int64_t kMaxHeadDim = 256;

// Chooses block sizes from the head-dim bucket and launches on `stream` (the current device's).
// Defined once in attn_fwd.cuh, instantiated per element type in attn_fwd_{f32,f16,bf16}.cu.
// Throws std::runtime_error if the launch fails or the device lacks the shared memory it needs.
template <class T>
void launch_attention_forward(const KernelParams& params, MaskKind mask_kind, void* stream);

}  // namespace cuda
}  // namespace fusedattn
