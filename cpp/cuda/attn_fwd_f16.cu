// Instantiation only: the __half kernels (one translation unit per element type, so builds run in parallel).
#include "attn_fwd.cuh"

template void fusedattn::cuda::launch_attention_forward<__half>(const KernelParams&, MaskKind, void*);
