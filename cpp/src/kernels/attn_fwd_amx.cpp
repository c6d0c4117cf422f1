// Compiled with AVX-512, AVX512-BF16 and AMX flags; reached only through the dispatcher after CPUID
// says AMX-TILE + AMX-BF16 and the OS granted the tile state. Instantiation only: the tile kernels are
// amx_attention.h on the instructions themselves (NativeTiles); what they do not serve is the
// avx512bf16 / avx512 level's.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <immintrin.h>

#include "fusedattn/params.h"
#include "kernels/kernels.h"
#include "runtime.h"

#define FUSEDATTN_KERNEL_NS isa_amx
#include "kernels/vec_avx512.h"
#include "kernels/convert.h"
#include "kernels/attn_fwd_impl.h"
#include "kernels/attn_bwd_impl.h"
#include "kernels/amx_tiles.h"
#include "kernels/amx_attention.h"
#include "kernels/amx_backward.h"

namespace fusedattn::kernels {

void attention_forward_amx_native(const AttnParams& params) {
  if (!isa_amx::forward_on_tiles<isa_amx::NativeTiles>(params)) attention_forward_avx512bf16(params);
}

void attention_backward_amx_native(const AttnParams& params) {
  if (!isa_amx::backward_on_tiles<isa_amx::NativeTiles>(params)) attention_backward_avx512(params);
}

}  // namespace fusedattn::kernels
