// Compiled with -mavx2 -mfma; reached only through the dispatcher after CPUID says AVX2 and FMA.
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

#define FUSEDATTN_KERNEL_NS isa_avx2
#include "kernels/vec_avx2.h"
#include "kernels/convert.h"
#include "kernels/attn_fwd_impl.h"
#include "kernels/attn_bwd_impl.h"
#include "kernels/probe_impl.h"

namespace fusedattn::kernels {

void attention_forward_avx2(const AttnParams& params) { isa_avx2::forward<isa_avx2::VecAvx2>(params); }

void attention_weights_avx2(const AttnParams& params) { isa_avx2::weights<isa_avx2::VecAvx2>(params); }

void attention_backward_avx2(const AttnParams& params) { isa_avx2::backward<isa_avx2::VecAvx2>(params); }

MachineProbe machine_probe_avx2() { return isa_avx2::make_probe<isa_avx2::VecAvx2<float>>(); }

}  // namespace fusedattn::kernels
