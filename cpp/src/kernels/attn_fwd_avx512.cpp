// Compiled with AVX-512 flags; reached only through the dispatcher after CPUID says AVX-512F/DQ/BW/VL.
// Instantiation only: the kernels are attn_fwd_impl.h and attn_bwd_impl.h, the machine probes probe_impl.h.
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

#define FUSEDATTN_KERNEL_NS isa_avx512
#include "kernels/vec_avx512.h"
#include "kernels/convert.h"
#include "kernels/attn_fwd_impl.h"
#include "kernels/attn_bwd_impl.h"
#include "kernels/probe_impl.h"

namespace fusedattn::kernels {

void attention_forward_avx512(const AttnParams& params) { isa_avx512::forward<isa_avx512::VecAvx512>(params); }

void attention_weights_avx512(const AttnParams& params) { isa_avx512::weights<isa_avx512::VecAvx512>(params); }

void attention_backward_avx512(const AttnParams& params) { isa_avx512::backward<isa_avx512::VecAvx512>(params); }

MachineProbe machine_probe_avx512() { return isa_avx512::make_probe<isa_avx512::VecAvx512<float>>(); }

}  // namespace fusedattn::kernels
