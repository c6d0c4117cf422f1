// The amx level on the exact software model of the tile instructions (ModelTiles, amx_tiles.h):
// compiled with the AVX-512 flags only, so the whole AMX code path runs and is tested on any AVX-512 CPU.
// Selected by the test switch set_amx_emulation(); instantiation only, like attn_fwd_amx.cpp.
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

#define FUSEDATTN_KERNEL_NS isa_amx_model
#include "kernels/vec_avx512.h"
#include "kernels/convert.h"
#include "kernels/attn_fwd_impl.h"
#include "kernels/attn_bwd_impl.h"
#include "kernels/amx_tiles.h"
#include "kernels/amx_attention.h"
#include "kernels/amx_backward.h"

namespace fusedattn::kernels {

void attention_forward_amx_model(const AttnParams& params) {
  if (!isa_amx_model::forward_on_tiles<isa_amx_model::ModelTiles>(params)) attention_forward_avx512bf16(params);
}

void attention_backward_amx_model(const AttnParams& params) {
  if (!isa_amx_model::backward_on_tiles<isa_amx_model::ModelTiles>(params)) attention_backward_avx512(params);
}

}  // namespace fusedattn::kernels
