// Entry points of the per-ISA translation units; reached only through the dispatcher.
#pragma once

#include "fusedattn/params.h"

namespace fusedattn::kernels {

// fp32 FMA chains and a streaming read, compiled with the same ISA as the kernels they measure.
struct MachineProbe {
  double (*fma_chains)(int64_t iterations);  // returns a checksum
  double flops_per_iteration;
  double (*sum_stream)(const float* data, int64_t count);  // 64-byte aligned data
};

void attention_forward_scalar(const AttnParams& params);
void attention_weights_scalar(const AttnParams& params);
void attention_backward_scalar(const AttnParams& params);
MachineProbe machine_probe_scalar();
#ifdef FUSEDATTN_HAVE_AVX2
void attention_forward_avx2(const AttnParams& params);
void attention_weights_avx2(const AttnParams& params);
void attention_backward_avx2(const AttnParams& params);
MachineProbe machine_probe_avx2();
#endif
#ifdef FUSEDATTN_HAVE_AVX512
void attention_forward_avx512(const AttnParams& params);
void attention_weights_avx512(const AttnParams& params);
void attention_backward_avx512(const AttnParams& params);
MachineProbe machine_probe_avx512();
#endif
#ifdef FUSEDATTN_HAVE_AVX512BF16
void attention_forward_avx512bf16(const AttnParams& params);  // bfloat16; other dtypes go to the AVX-512 path
#endif
#ifdef FUSEDATTN_HAVE_AMX
// The amx level's kernels (the dispatcher picks one by set_amx_emulation's mode), instantiated with the native tile instructions (attn_fwd_amx.cpp) and with the
// software model (attn_fwd_amx_model.cpp).
void attention_forward_amx_native(const AttnParams& params);
void attention_backward_amx_native(const AttnParams& params);
void attention_forward_amx_model(const AttnParams& params);
void attention_backward_amx_model(const AttnParams& params);
#endif

}  // namespace fusedattn::kernels
