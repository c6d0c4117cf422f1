// The portable path: compiled without ISA flags, it runs on any CPU (and alone on non-x86 hosts).
// Instantiation only: the kernels are attn_fwd_impl.h and attn_bwd_impl.h, the machine probes probe_impl.h.
#include <cmath>
#include <cstring>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fusedattn/params.h"
#include "kernels/kernels.h"
#include "runtime.h"

#define FUSEDATTN_KERNEL_NS isa_scalar
#include "kernels/vec_scalar.h"
#include "kernels/convert.h"
#include "kernels/attn_fwd_impl.h"
#include "kernels/attn_bwd_impl.h"
#include "kernels/probe_impl.h"

namespace fusedattn::kernels {

void attention_forward_scalar(const AttnParams& params) { isa_scalar::forward<isa_scalar::VecScalar>(params); }

void attention_weights_scalar(const AttnParams& params) { isa_scalar::weights<isa_scalar::VecScalar>(params); }

void attention_backward_scalar(const AttnParams& params) { isa_scalar::backward<isa_scalar::VecScalar>(params); }

MachineProbe machine_probe_scalar() { return isa_scalar::make_probe<isa_scalar::VecScalar<float>>(); }

}  // namespace fusedattn::kernels
