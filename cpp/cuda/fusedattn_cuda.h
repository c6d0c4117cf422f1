// The CUDA path's host API: FlashAttention-2 forward on an NVIDIA GPU from an AttnParams whose tensors
// live in device memory. No Python here; cpp/cuda/bindings.cpp is the pybind11 layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "fusedattn/params.h"

namespace fusedattn {
namespace cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;  // compute capability
  std::size_t total_memory = 0;
  int multiprocessors = 0;
  std::size_t max_shared_memory_per_block = 0;  // with the opt-in (cudaFuncSetAttribute) limit
};

// Devices the CUDA runtime sees. Throws std::runtime_error with CUDA's message when there is no driver
// or no device, so callers can report *why* (backend_info does).
int device_count();
DeviceInfo device_info(int index);
// The device ordinal that owns `pointer`, or -1 for host / unregistered memory.
int pointer_device(const void* pointer);

// Validates `params` (std::invalid_argument naming the problem) and enqueues the fused forward on
// `stream` (a cudaStream_t; 0 is the default stream) of the *current* device, which must own every
// tensor. Returns without synchronising.
//
// Supported: float32, float16 and bfloat16 storage (float32 accumulation, lse float32), D and Dv up to
// 256, bool (uint8) and float32 masks with any strides (zero for broadcasting), grouped-query heads,
// causal attention with any diagonal offset, out_float32, lse. Not supported (std::invalid_argument):
// float64, additive scores, sliding windows, ALiBi, soft-capping, dropout and packed (varlen) batches.
//
// The tensors' batch_offsets are host arrays (as on the CPU); they are copied to a temporary device
// array on `stream`, which is freed in stream order after the kernel.
void attention_forward(const AttnParams& params, void* stream);

}  // namespace cuda
}  // namespace fusedattn
