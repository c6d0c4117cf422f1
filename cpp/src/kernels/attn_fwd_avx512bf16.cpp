// Compiled with AVX-512 and AVX512-BF16 flags; reached only through the dispatcher after CPUID says
// AVX512-BF16 too. Only bfloat16 forward calls with bfloat16 output differ from the AVX-512 path: native
// vdpbf16ps products (bf16_pairs.h), which round the probabilities to bf16 for P.V as torch does. A
// float32 output asks for more than that, so it keeps P in fp32 on the AVX-512 path, as do every other
// dtype, int8 K / V and the weights / backward passes.
#include <cmath>
#include <cstring>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <immintrin.h>

#include "fusedattn/params.h"
#include "kernels/kernels.h"
#include "runtime.h"

#define FUSEDATTN_KERNEL_NS isa_avx512bf16
#include "kernels/vec_avx512.h"
#include "kernels/convert.h"
#include "kernels/attn_fwd_impl.h"
#include "kernels/bf16_pairs.h"

namespace fusedattn::kernels {

void attention_forward_avx512bf16(const AttnParams& params) {
  using Bf16Vec = isa_avx512bf16::WithStorage<isa_avx512bf16::VecAvx512<float>, BFloat16>;
  if (params.dtype == DType::kBFloat16 && !params.out_float32 && !params.kv_int8)
    isa_avx512bf16::run_pass<isa_avx512bf16::ForwardPass, Bf16Vec>(params);
  else
    attention_forward_avx512(params);
}

}  // namespace fusedattn::kernels
