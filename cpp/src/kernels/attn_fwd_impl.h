// The fused attention forward kernel: one template, instantiated once per ISA (the `Vec` policy) and
// dtype. Included by each attn_fwd_<isa>.cpp inside its own namespace (FUSEDATTN_KERNEL_NS), so no
// symbol compiled with one ISA's flags can be picked by the linker for another.
//
// Layout: "queries in lanes". A work item owns a block of up to kBlockQ queries of one (batch, head)
// and streams the keys in blocks of kBlockK:
//
//   S^T (keys x queries)  = K_block (keys x D) . Q^T (D x queries)      Q^T packed once per item
//   online softmax down the key axis: running max m and sum l are vectors over the query lanes, so
//   no horizontal reduction is ever needed
//   O^T (Dv x queries)   += V_block^T (Dv x keys) . P^T (keys x queries)
//
// Both products are the same register-tiled micro-kernel: one operand is broadcast element by element
// straight from the user's K / V (any strides, never packed or copied), the other is a packed
// lane-major tile in L1. The Lq x Lk score matrix never exists; per thread the scratch is
// O(kBlockQ * (D + Dv + kBlockK)).
//
// Scores stay in natural units (Q is pre-multiplied by `scale`, float masks are added as given): a
// padding mask of finfo.min must stay finite, and it would overflow if the scores were kept in log2
// units. Only the difference score - m, which is <= 0, is converted for exp2.
//
// One header per concern, each including what it needs (all inside FUSEDATTN_KERNEL_NS):
//   common.h          integer helpers, block sizes, AlignedBuffer
//   tile_kernel.h     the register-tiled micro-kernel, strided_times_packed, transpose_copy
//   scores.h          score policies (dot, additive), exp_minus, tanh_vec, soft-capping
//   masks.h           RowBlock, mask policies, the causal / window band, ALiBi, dropout
//   switches.h        DType / MaskKind / ScoreKind -> compile-time policies, each switch written once
//   softmax.h         accumulators, the online softmax step, the normalised output row and its lse
//   forward_plan.h    ForwardPlan: row blocks, key splits, scratch and accumulators of a work item
//   query_products.h  the products of a queries-in-lanes tile (WidenedProducts, the QueryProducts policy)
//   prefill.h         QueryLanes, the prefill layout
//   decode.h          DimLanes, the decode layout
//   forward.h         make_plan, forward_item, merge_splits, ForwardCall, the forward's dispatch
//   weights.h         attention_weights()
// The backward (attn_bwd_impl.h) and the amx level (amx_*.h) include the pieces they need.
#pragma once

#include "kernels/forward.h"
#include "kernels/weights.h"
