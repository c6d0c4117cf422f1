// Entry points of the per-ISA translation units; reached only through the dispatcher.
#pragma once

#include "fusedattn/params.h"

namespace fusedattn::kernels {

void attention_forward_scalar(const AttnParams& params);
#ifdef FUSEDATTN_HAVE_AVX2
void attention_forward_avx2(const AttnParams& params);
#endif
#ifdef FUSEDATTN_HAVE_AVX512
void attention_forward_avx512(const AttnParams& params);
#endif

}  // namespace fusedattn::kernels
