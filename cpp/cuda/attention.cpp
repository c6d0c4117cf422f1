// The CUDA path's host side: checks what the kernel supports, moves the batch offsets to the device and
// hands the launch to the one launch-configuration function (attn_fwd.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "fusedattn_cuda.h"
#include "kernel_params.h"

namespace fusedattn {
namespace cuda {
namespace {

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument("attention (CUDA): " + message);
}

// Everything AttnParams can express that the GPU kernel does not compute is refused by name, never ignored.
void validate(const AttnParams& p) {
  require(p.dtype != DType::kFloat64, "float64 is not supported on the GPU; use float32, float16 or bfloat16");
  require(p.batch >= 0 && p.len_q >= 0 && p.len_k >= 0, "negative batch or sequence length");
  require(p.heads_kv >= 1 && p.heads_q >= 0 && p.heads_q % p.heads_kv == 0,
          "heads_q (" + std::to_string(p.heads_q) + ") must be a multiple of heads_kv (" + std::to_string(p.heads_kv) + ")");
  require(p.head_dim >= 1 && p.head_dim <= kMaxHeadDim,
          "head dim D must be in [1, " + std::to_string(kMaxHeadDim) + "], got " + std::to_string(p.head_dim));
  require(p.value_dim >= 1 && p.value_dim <= kMaxHeadDim,
          "value dim Dv must be in [1, " + std::to_string(kMaxHeadDim) + "], got " + std::to_string(p.value_dim));
  require(std::isfinite(p.scale), "scale must be finite");
  require(p.score_kind == ScoreKind::kDot, "additive scores are not supported");
  require(!p.windowed || (p.window_left >= kUnbounded && p.window_right == 0),
          "sliding windows are not supported (causal is)");
  require(!p.alibi_slopes, "alibi_slopes are not supported");
  require(p.softcap == 0, "softcap is not supported");
  require(p.dropout_p == 0, "dropout is not supported");
  require(!p.seq_len_q && !p.seq_len_k && !p.seq_diagonal_offset, "packed (varlen) batches are not supported");
  require(!p.out_float32 || p.dtype != DType::kFloat32, "out_float32 is for 16-bit inputs");
}

DeviceTensor device_view(const StridedTensor& t) {
  DeviceTensor d;
  d.data = t.data;
  d.head_stride = t.head_stride;
  d.row_stride = t.row_stride;
  d.col_stride = t.col_stride;
  return d;
}

}  // namespace

int device_count() {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

DeviceInfo device_info(int index) {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties");
  DeviceInfo info;
  info.index = index;
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.total_memory = prop.totalGlobalMem;
  info.multiprocessors = prop.multiProcessorCount;
  info.max_shared_memory_per_block = prop.sharedMemPerBlockOptin;
  return info;
}

int pointer_device(const void* pointer) {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
  if (status == cudaErrorInvalidValue) {  // memory CUDA does not know
    cudaGetLastError();
    return -1;
  }
  check(status, "cudaPointerGetAttributes");
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged ? attributes.device : -1;
}

void attention_forward(const AttnParams& p, void* stream) {
  validate(p);
  if (p.batch == 0 || p.heads_q == 0 || p.len_q == 0) return;  // nothing to write
  require(p.q.data && p.k.data && p.v.data && p.out.data, "missing tensor");
  require(p.mask_kind == MaskKind::kNone || p.mask.data, "missing mask");

  KernelParams k;
  k.batch = p.batch;
  k.heads_q = p.heads_q;
  k.heads_kv = p.heads_kv;
  k.len_q = p.len_q;
  k.len_k = p.len_k;
  k.head_dim = p.head_dim;
  k.value_dim = p.value_dim;
  k.diagonal_offset = p.diagonal_offset;
  k.causal = p.windowed;  // validate() allowed windows only of the causal shape
  k.out_float32 = p.out_float32;
  k.scale = static_cast<float>(p.scale);

  // The flattened batch index -> element offset tables of the six tensors, in one device array.
  const StridedTensor* hosts[6] = {&p.q, &p.k, &p.v, &p.out, &p.mask, &p.lse};
  DeviceTensor* devices[6] = {&k.q, &k.k, &k.v, &k.out, &k.mask, &k.lse};
  std::vector<int64_t> offsets(static_cast<size_t>(6 * p.batch), 0);
  for (int t = 0; t < 6; ++t) {
    *devices[t] = device_view(*hosts[t]);
    if (!hosts[t]->data) continue;
    require(hosts[t]->batch_offsets != nullptr, "a tensor without batch offsets");
    for (int64_t b = 0; b < p.batch; ++b) offsets[t * p.batch + b] = hosts[t]->batch_offsets[b];
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t* device_offsets = nullptr;
  const size_t bytes = offsets.size() * sizeof(int64_t);
  check(cudaMallocAsync(reinterpret_cast<void**>(&device_offsets), bytes, s), "cudaMallocAsync");
  try {
    // From pageable memory this returns once the bytes are staged, so `offsets` may go out of scope.
    check(cudaMemcpyAsync(device_offsets, offsets.data(), bytes, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
    for (int t = 0; t < 6; ++t) devices[t]->batch_offsets = device_offsets + t * p.batch;
    switch (p.dtype) {
      case DType::kFloat32: launch_attention_forward<float>(k, p.mask_kind, stream); break;
      case DType::kFloat16: launch_attention_forward<__half>(k, p.mask_kind, stream); break;
      case DType::kBFloat16: launch_attention_forward<__nv_bfloat16>(k, p.mask_kind, stream); break;
      case DType::kFloat64: break;  // refused by validate()
    }
  } catch (...) {
    cudaFreeAsync(device_offsets, s);
    throw;
  }
  check(cudaFreeAsync(device_offsets, s), "cudaFreeAsync");
}

}  // namespace cuda
}  // namespace fusedattn
