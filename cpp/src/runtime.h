// Services the ISA-specific kernels call into. They live in the portable translation units, so the
// kernels need no std:: templates of their own (a template instantiated in an AVX-512 object could be
// picked by the linker for a portable caller and execute AVX-512 code on a CPU without it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fusedattn {

// Calls body(context, item, thread_id) for every item in [0, num_items), on up to num_threads threads,
// handing items out dynamically (work per item varies, e.g. under a causal mask).
using ParallelBody = void (*)(void* context, int64_t item, int thread_id);
void parallel_for(int64_t num_items, int num_threads, ParallelBody body, void* context);

// 64-byte aligned, uninitialised; throws std::bad_alloc on failure.
void* aligned_allocate(std::size_t bytes);
void aligned_free(void* pointer) noexcept;

// The amx level runs float16 on TDPFP16PS (AMX-FP16: the CPU has it and this build knows it, or the
// software model emulates such a CPU); else on TDPBF16PS through exact bf16 splits.
bool amx_fp16_enabled();

}  // namespace fusedattn
