// The C++ entry point: checks the params' invariants the kernels rely on, then dispatches.
#include <cmath>
#include <stdexcept>
#include <string>

#include "fusedattn/dispatch.h"
#include "fusedattn/limits.h"

namespace fusedattn {
namespace detail {
void run_forward_kernel(const AttnParams& params);
void run_weights_kernel(const AttnParams& params);
void run_backward_kernel(const AttnParams& params);
}

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

void require(bool condition, const std::string& message) {
  if (!condition) fail(message);
}

// Checks shared by every entry point; returns false when there is nothing to compute.
bool validate_common(const AttnParams& p) {
  require(p.batch >= 0 && p.len_q >= 0 && p.len_k >= 0, "attention: negative batch or sequence length");
  require(p.heads_kv >= 1 && p.heads_q >= 0 && p.heads_q % p.heads_kv == 0,
          "attention: heads_q (" + std::to_string(p.heads_q) + ") must be a multiple of heads_kv (" +
              std::to_string(p.heads_kv) + ")");
  const std::string dim_range = "[1, " + std::to_string(kMaxHeadDim) + "]";
  require(p.head_dim >= 1 && p.head_dim <= kMaxHeadDim,
          "attention: head_dim must be in " + dim_range + ", got " + std::to_string(p.head_dim));
  require(p.value_dim >= 1 && p.value_dim <= kMaxHeadDim,
          "attention: value_dim must be in " + dim_range + ", got " + std::to_string(p.value_dim));
  require(std::isfinite(p.scale), "attention: scale must be finite");
  require(p.num_threads >= 1, "attention: num_threads must be >= 1");
  require(p.score_kind == ScoreKind::kDot || p.score_weight, "attention: additive scores need score_weight");
  if (p.batch == 0 || p.heads_q == 0 || p.len_q == 0) return false;  // nothing to write
  require(p.q.data && p.k.data && p.q.batch_offsets && (p.k.batch_offsets || p.k.paged()), "attention: missing tensor");
  require(p.mask_kind == MaskKind::kNone || (p.mask.data && p.mask.batch_offsets), "attention: missing mask");
  return true;
}

// A paged tensor's block ids, for every row the kernels may read (keys [0, len_k_of(b))): inside the pool
// and the table. The Python layer gives the clear messages; this keeps a bad id from ever reading
// outside the pool. O(batch x blocks per sequence): nothing next to the call.
void validate_pages(const AttnParams& p, const StridedTensor& t, const char* name) {
  if (!t.paged()) {
    require(t.batch_offsets != nullptr, std::string("attention: missing ") + name);
    return;
  }
  const PageTable& pages = t.pages;
  require(pages.block_size >= 1 && pages.blocks_per_seq >= 0 && pages.pool_blocks >= 0,
          std::string("attention: ") + name + ": bad page table");
  require(p.seq_len_k || p.len_k <= pages.blocks_per_seq * pages.block_size,
          std::string("attention: ") + name + ": keys beyond the block table");
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = p.len_k_of(b);
    // Messages built on failure only: built for every block id, they took ~15% of a paged int8 decode
    // step over 16384 blocks (Zen 4).
    if (!(len >= 0 && len <= pages.blocks_per_seq * pages.block_size))
      fail(std::string("attention: ") + name + ": sequence " + std::to_string(b) + " is longer than its block table");
    for (int64_t i = 0; i < (len + pages.block_size - 1) / pages.block_size; ++i) {
      const int64_t id = pages.blocks[b * pages.blocks_per_seq + i];
      if (!(id >= 0 && id < pages.pool_blocks))
        fail(std::string("attention: ") + name + ": block id " + std::to_string(id) + " outside the pool of " +
             std::to_string(pages.pool_blocks));
    }
  }
}

// Below ~2^20 multiply-adds (tens of microseconds on one core) waking a second thread costs more than it
// saves, and on a loaded machine a descheduled OpenMP thread can stall a tiny call for milliseconds.
AttnParams with_useful_threads(const AttnParams& p) {
  constexpr double kMinWorkPerThread = 1 << 20;
  const double work = static_cast<double>(p.batch) * p.heads_q * p.len_q * (p.len_k + 1) * (p.head_dim + p.value_dim);
  AttnParams adjusted = p;
  const double useful = work / kMinWorkPerThread;
  if (useful < adjusted.num_threads) adjusted.num_threads = useful < 1 ? 1 : static_cast<int>(useful);
  return adjusted;
}

// The forward pass alone reads int8 or paged K / V (inference caches).
void require_plain_kv(const AttnParams& p, const char* entry) {
  require(!p.kv_int8 && !p.k.paged() && !p.v.paged(),
          std::string(entry) + ": int8 or paged K / V are supported by the forward pass only");
}

}  // namespace

void attention_forward(const AttnParams& p) {
  if (!validate_common(p)) return;
  require(p.v.data && p.out.data && p.out.batch_offsets, "attention: missing tensor");
  require(!p.lse.data || p.lse.batch_offsets, "attention: lse without batch offsets");
  validate_pages(p, p.k, "k");
  validate_pages(p, p.v, "v");
  if (p.kv_int8) {
    require(p.k_scale.data && p.v_scale.data, "attention: int8 K / V need k_scale and v_scale");
    validate_pages(p, p.k_scale, "k_scale");
    validate_pages(p, p.v_scale, "v_scale");
  }
  AttnParams adjusted = with_useful_threads(p);
  adjusted.read_ahead_streams = decode_read_ahead();
  detail::run_forward_kernel(adjusted);
}

void attention_backward(const AttnParams& p) {
  require_plain_kv(p, "attention_backward");
  require(p.score_kind == ScoreKind::kDot || p.dscore_weight, "attention_backward: additive scores need dscore_weight");
  if (!validate_common(p)) return;
  require(p.v.data && p.out.data && p.lse.data && p.dout.data && p.dq.data && p.dk.data && p.dv.data,
          "attention_backward: missing tensor");
  detail::run_backward_kernel(with_useful_threads(p));
}

void attention_weights(const AttnParams& p) {
  require_plain_kv(p, "attention_weights");
  if (!validate_common(p)) return;
  require(p.weights.data && p.weights.batch_offsets, "attention_weights: missing output");
  detail::run_weights_kernel(with_useful_threads(p));
}

}  // namespace fusedattn
