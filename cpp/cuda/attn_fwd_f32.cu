// Instantiation only: the float kernels (one translation unit per element type, so builds run in parallel).
#include "attn_fwd.cuh"

template void fusedattn::cuda::launch_attention_forward<float>(const KernelParams&, MaskKind, void*);
