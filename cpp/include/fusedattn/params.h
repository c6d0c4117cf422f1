// The one plain struct that carries an attention call from the bindings to the kernels.
#pragma once

#include <cstdint>

namespace fusedattn {

// bfloat16 and float16 are storage types: the kernels compute in float32 and convert on load and store.
enum class DType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// 16-bit storage types, bit patterns as numpy (ml_dtypes.bfloat16, np.float16) holds them.
struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

// A window bound that never binds: far beyond any sequence length, far from int64 overflow.
constexpr int64_t kUnbounded = int64_t(1) << 60;
enum class MaskKind { kNone, kBool, kAdditive };
// kDot: scale * q.k; kAdditive (Bahdanau / Keras): sum_d w_d tanh(q_d + k_d).
enum class ScoreKind { kDot, kAdditive };
// float32 matrix products on a matrix unit, in the words of torch.set_float32_matmul_precision:
// kHighest is the fp32 FMA path; kHigh splits each operand into two bfloat16 values (hi + lo) and sums
// three products (bf16x3); kMedium rounds each operand to bfloat16 (one product). Only float32 inputs on
// the amx level read it; everywhere else every mode is kHighest.
enum class Precision { kHighest, kHigh, kMedium };

// A paged tensor's rows (vLLM's block tables): row r of batch entry b lives in row r % block_size of
// pool block blocks[b * blocks_per_seq + r / block_size]. Null `blocks`: not paged.
struct PageTable {
  const int32_t* blocks = nullptr;
  int64_t blocks_per_seq = 0;
  int64_t block_size = 0;
  int64_t block_stride = 0;  // elements between consecutive blocks of the pool
  int64_t pool_blocks = 0;   // valid ids are [0, pool_blocks): for attention.cpp's checks
};

// A (batch, head, row, column) view of a tensor. Strides are in elements and may be zero
// (broadcast), negative or anything else numpy allows. The leading "batch" axes of an array of any
// rank are flattened into one index through `batch_offsets`, so merging them never needs a copy.
// With `pages`, rows are found through the page table instead (batch_offsets unused): rows r and r + 1
// are then `row_stride` apart only within one block, so kernels that stride across rows ask row() for
// each row (or each block) of a paged tensor.
struct StridedTensor {
  void* data = nullptr;
  const int64_t* batch_offsets = nullptr;  // element offset of flattened batch index b
  int64_t head_stride = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  PageTable pages;

  bool paged() const { return pages.blocks != nullptr; }

  template <class T>
  T* row(int64_t batch, int64_t head, int64_t r) const {
    if (pages.blocks) {
      const int64_t block = pages.blocks[batch * pages.blocks_per_seq + r / pages.block_size];
      return static_cast<T*>(data) + block * pages.block_stride + head * head_stride + (r % pages.block_size) * row_stride;
    }
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
  // int8 K and V (q and out stay `dtype`): K = k_scale * k8 and V = v_scale * v8 with one float32 scale per
  // (batch, kv head, key), read as k_scale.row<float>(batch, kv_head, key). The kernels dequantise in
  // their fused loops: score = scale * k_scale_j * (q . k8_j), and v_scale_j multiplies p_j before P.V.
  bool kv_int8 = false;
  StridedTensor k_scale, v_scale;  // (batch, heads_kv, len_k), float32; paged exactly as k and v
  StridedTensor mask;             // (batch, heads_q, len_q, len_k); uint8 for kBool, dtype for kAdditive
  MaskKind mask_kind = MaskKind::kNone;
  StridedTensor out;              // (batch, heads_q, len_q, value_dim)
  bool out_float32 = false;       // 16-bit inputs only: out is float32 instead of the input dtype
  StridedTensor lse;              // (batch, heads_q, len_q) in `row_stride`; data may be null; float32 for
                                  // 16-bit inputs (the compute type), else the input dtype

  ScoreKind score_kind = ScoreKind::kDot;
  const void* score_weight = nullptr;  // kAdditive: w, (head_dim,) contiguous, in dtype

  StridedTensor weights;          // attention_weights(): (batch, heads_q, len_q, len_k), zero-filled by the caller

  // attention_backward(): reads q, k, v, out (the forward's output), lse and dout; writes dq, dk, dv.
  StridedTensor dout;             // (batch, heads_q, len_q, value_dim)
  StridedTensor dq, dk, dv;       // shaped like q, k, v
  void* dscore_weight = nullptr;  // additive scores: the gradient of score_weight, (head_dim,) contiguous

  // Positions. Row i's diagonal is key i + diagonal_offset (the caller folds in the causal alignment
  // and the q_start / k_start of a chunk). When `windowed`, row i sees key j iff
  //   i + diagonal_offset - window_left <= j <= i + diagonal_offset + window_right;
  // causal attention is window_right = 0. Tiles outside the band are never computed.
  bool windowed = false;
  int64_t diagonal_offset = 0;
  int64_t window_left = kUnbounded;
  int64_t window_right = kUnbounded;
  // ALiBi: score -= slope * |i + diagonal_offset - j|, slope = alibi_slopes[batch * alibi_batch_stride + head].
  const void* alibi_slopes = nullptr;  // dtype
  int64_t alibi_batch_stride = 0;
  int64_t alibi_rows = 0;              // 1 (shared) or batch: checked by the bindings
  double softcap = 0;                  // > 0: scaled scores s become softcap * tanh(s / softcap)
  // Dropout on the probabilities: element (batch, head, q_start + i, k_start + j) is kept iff
  // dropout_hash(seed, ...) >= dropout_p * 2^32, and scaled by 1 / (1 - dropout_p). A pure function of the
  // positions, so any thread count, and the backward pass, see the same mask.
  double dropout_p = 0;
  uint64_t dropout_seed = 0;
  int64_t q_start = 0, k_start = 0;
  double scale = 1.0;
  // Attention sinks (gpt-oss): one logit per query head that joins every row's softmax denominator and
  // has no value: out_i = sum_j e^s_ij v_j / (e^sink_h + sum_j e^s_ij), lse_i = log(e^sink_h + sum_j e^s_ij)
  // (a row that sees no key: out 0, lse sink_h). Dropout acts on the keys' probabilities only. (heads_q,)
  // contiguous in the compute dtype; null: no sinks.
  const void* sinks = nullptr;
  Precision precision = Precision::kHighest;
  int num_threads = 1;
  // Decode: prefetch K / V rows read one after the other (one query row per kv head, contiguous) too, not
  // only paged or re-read ones. Set by attention_forward from decode_read_ahead() (dispatch.h).
  bool read_ahead_streams = false;

  // Packed variable-length batches: per-sequence lengths (len_q / len_k are then the maxima) and
  // diagonal offsets. Null for dense batches, where every entry has len_q, len_k and diagonal_offset.
  const int64_t* seq_len_q = nullptr;
  const int64_t* seq_len_k = nullptr;
  const int64_t* seq_diagonal_offset = nullptr;

  int64_t len_q_of(int64_t b) const { return seq_len_q ? seq_len_q[b] : len_q; }
  int64_t len_k_of(int64_t b) const { return seq_len_k ? seq_len_k[b] : len_k; }
  int64_t diagonal_offset_of(int64_t b) const { return seq_diagonal_offset ? seq_diagonal_offset[b] : diagonal_offset; }
};

}  // namespace fusedattn
