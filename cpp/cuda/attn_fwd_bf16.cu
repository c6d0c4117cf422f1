// Instantiation only: the __nv_bfloat16 kernels (one translation unit per element type, so builds run in parallel).
#include "attn_fwd.cuh"

template void fusedattn::cuda::launch_attention_forward<__nv_bfloat16>(const KernelParams&, MaskKind, void*);
