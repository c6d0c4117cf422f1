// The run-time kinds of a call -> compile-time policies, one switch each (as flash-attention's
// static_switch.h): DType -> the vector policy, MaskKind -> the mask policy, ScoreKind -> the score
// policy. A pass (forward, weights, backward) is a template Pass<Vec, Mask, Score> with a static
// run(const AttnParams&); run_pass_for_dtype calls the one the call needs.
#pragma once

#include "kernels/masks.h"
#include "kernels/scores.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// MaskKind -> the compile-time mask policy: calls run(Mask{}) with NoMask, BoolMask or AdditiveMask.
template <class Run>
void by_mask_kind(MaskKind kind, Run run) {
  switch (kind) {
    case MaskKind::kNone: return run(NoMask{});
    case MaskKind::kBool: return run(BoolMask{});
    case MaskKind::kAdditive: return run(AdditiveMask{});
  }
}

// Pass<Vec, Mask, Score>::run(p) with the call's mask and score policies.
template <template <class, class, class> class Pass, class Vec>
void run_pass(const AttnParams& p) {
  by_mask_kind(p.mask_kind, [&](auto mask) {
    if (p.score_kind == ScoreKind::kAdditive)
      Pass<Vec, decltype(mask), AdditiveScore>::run(p);
    else
      Pass<Vec, decltype(mask), DotScore>::run(p);
  });
}

template <class Vec>
using SameKv = Vec;

// DType -> the vector policy VecFor<compute type>, with the storage type for 16-bit inputs (computed in
// float), wrapped by Kv (WithInt8Kv for int8 K / V); then run_pass.
template <template <class> class VecFor, template <class, class, class> class Pass, template <class> class Kv = SameKv>
void run_pass_for_dtype(const AttnParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return run_pass<Pass, Kv<VecFor<float>>>(p);
    case DType::kFloat64: return run_pass<Pass, Kv<VecFor<double>>>(p);
    case DType::kBFloat16: return run_pass<Pass, Kv<WithStorage<VecFor<float>, BFloat16>>>(p);
    case DType::kFloat16: return run_pass<Pass, Kv<WithStorage<VecFor<float>, Float16>>>(p);
  }
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
