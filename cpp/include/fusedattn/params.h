// The one plain struct that carries an attention call from the bindings to the kernels.
#pragma once

#include <cstdint>

namespace fusedattn {

enum class DType { kFloat32, kFloat64 };
enum class MaskKind { kNone, kBool, kAdditive };
// kDot: scale * q.k; kAdditive (Bahdanau / Keras): sum_d w_d tanh(q_d + k_d).
enum class ScoreKind { kDot, kAdditive };

// A (batch, head, row, column) view of a tensor. Strides are in elements and may be zero
// (broadcast), negative or anything else numpy allows. The leading "batch" axes of an array of any
// rank are flattened into one index through `batch_offsets`, so merging them never needs a copy.
struct StridedTensor {
  void* data = nullptr;
  const int64_t* batch_offsets = nullptr;  // element offset of flattened batch index b
  int64_t head_stride = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 0;

  template <class T>
  T* row(int64_t batch, int64_t head, int64_t r) const {
    return static_cast<T*>(data) + batch_offsets[batch] + head * head_stride + r * row_stride;
  }
};

struct AttnParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0;      // product of the leading dimensions
  int64_t heads_q = 0;    // Hq; query head h reads kv head h / (heads_q / heads_kv)
  int64_t heads_kv = 0;
  int64_t len_q = 0;
  int64_t len_k = 0;
  int64_t head_dim = 0;   // D of q and k
  int64_t value_dim = 0;  // Dv

  StridedTensor q, k, v;          // (batch, heads, len, dim)
  StridedTensor mask;             // (batch, heads_q, len_q, len_k); uint8 for kBool, dtype for kAdditive
  MaskKind mask_kind = MaskKind::kNone;
  StridedTensor out;              // (batch, heads_q, len_q, value_dim)
  StridedTensor lse;              // (batch, heads_q, len_q) in `row_stride`; data may be null

  ScoreKind score_kind = ScoreKind::kDot;
  const void* score_weight = nullptr;  // kAdditive: w, (head_dim,) contiguous, in dtype

  StridedTensor weights;          // attention_weights(): (batch, heads_q, len_q, len_k), zero-filled by the caller

  // attention_backward(): reads q, k, v, out (the forward's output), lse and dout; writes dq, dk, dv.
  StridedTensor dout;             // (batch, heads_q, len_q, value_dim)
  StridedTensor dq, dk, dv;       // shaped like q, k, v
  void* dscore_weight = nullptr;  // additive scores: the gradient of score_weight, (head_dim,) contiguous

  bool causal = false;
  int64_t causal_offset = 0;      // query i may attend key j iff j <= i + causal_offset
  double scale = 1.0;
  int num_threads = 1;
};

}  // namespace fusedattn
