// The one CUDA error check of the CUDA path's host code.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace fusedattn {
namespace cuda {

// Throws with CUDA's description of `status`; clears the sticky last error first, so that a failed
// query never surfaces again as the next call's error.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fusedattn CUDA: ") + what + ": " + cudaGetErrorString(status));
  }
}

}  // namespace cuda
}  // namespace fusedattn
