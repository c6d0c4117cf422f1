// Limits of the kernels that callers check against. The one source of each number: the C++ entry points
// build their messages from it and the Python package reads it from the extension.
#pragma once

#include <cstdint>

namespace fusedattn {

// The largest head dimension (D) and value dimension (Dv): the forward's split merge keeps one output
// row of Dv values on the stack.
constexpr int64_t kMaxHeadDim = 512;

}  // namespace fusedattn
