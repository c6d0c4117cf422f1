// The flattening of an array's leading ("batch") axes into StridedTensor::batch_offsets, shared by the CPU
// and CUDA bindings: merging any number of leading axes of any strides never needs a copy.
#pragma once

#include <cstdint>
#include <vector>

namespace fusedattn {

// Element offset of each flat batch index b (row-major over lead_shape), from the leading axes' strides
// in elements.
template <class Extent>
std::vector<int64_t> flatten_batch_offsets(const Extent* lead_shape, const int64_t* lead_strides, int lead) {
  int64_t batch = 1;
  for (int d = 0; d < lead; ++d) batch *= static_cast<int64_t>(lead_shape[d]);
  std::vector<int64_t> offsets(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    int64_t rest = b, offset = 0;
    for (int d = lead - 1; d >= 0; --d) {
      const int64_t extent = static_cast<int64_t>(lead_shape[d]);
      offset += (rest % extent) * lead_strides[d];
      rest /= extent;
    }
    offsets[static_cast<size_t>(b)] = offset;
  }
  return offsets;
}

}  // namespace fusedattn
