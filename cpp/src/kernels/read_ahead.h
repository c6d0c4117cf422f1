// Software prefetch for the decode loops: what a work item reads next, requested while it computes.
#pragma once

#include "kernels/common.h"

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// A GQA group's rows read each key block several times from cache (once per row, or per group of rows);
// meanwhile no demand miss reaches DRAM and the hardware prefetchers stop, so a float32 g4 decode step
// cost the memory time plus the compute time (Zen 4, one thread: 68 ns per key and kv head = 38 ns
// streamed + 34 ns in cache). A paged pool's blocks are scattered, and no hardware prefetcher follows
// them. The decode loop therefore queues the rows it reads next (the next sweep's K, or V, or the next
// block's K) and the loops request their lines a few per key visited, so that they stream in while the
// current rows are computed on. The rate follows the visits of the previous unit of the same phase,
// so the requests spread over the whole unit whatever the loops are.
class ReadAhead {
 public:
  enum Phase { kScores, kValues, kPhases };  // the loops that will issue the requests

  // Starts a unit of reads and forgets what was queued: the rows read next are then add()ed and queued().
  void start(Phase phase) {
    last_visits_[phase_] = visits_;
    visits_ = 0;
    phase_ = phase;
    count_ = 0;
    lines_ = 0;
  }

  // Queues `rows` rows of row_bytes bytes, stride_bytes apart (rows of one pool block, or of a strided
  // tensor). Runs beyond kMaxRuns are dropped: a prefetch is only a hint.
  void add(const void* first, int64_t stride_bytes, int64_t row_bytes, int64_t rows) {
    if (rows <= 0 || count_ == kMaxRuns) return;
    if (stride_bytes == row_bytes) {  // adjacent rows: one range
      row_bytes *= rows;
      rows = 1;
    }
    runs_[count_++] = {static_cast<const char*>(first), stride_bytes, row_bytes, rows};
    lines_ += rows * ceil_div(row_bytes + 63, 64);
  }

  // Ends the queue: its lines are spread over as many visits as the previous unit of this phase made
  // (`visits_hint` for the first one).
  void queued(int64_t visits_hint) {
    const int64_t visits = last_visits_[phase_] > 0 ? last_visits_[phase_] : visits_hint;
    per_visit_ = count_ > 0 ? static_cast<int>(ceil_div(lines_, visits < 1 ? 1 : visits)) : 0;
    run_ = 0;
    row_ = 0;
    if (count_ > 0) open_row();
  }

  // Called once per key (or group of keys) a loop visits: requests this visit's share of the queued
  // lines. Inline and call-free: a call inside the score loop would cost the Q row its registers.
  FUSEDATTN_ALWAYS_INLINE void visit() {
    ++visits_;
    for (int i = 0; i < per_visit_; ++i) {
      if (line_ >= end_ && !next_row()) return;
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(line_, 0, 2);  // into L2 (prefetcht1): the rows being computed on keep L1
#endif
      line_ += 64;
    }
  }

 private:
  struct Run {
    const char* first;
    int64_t stride_bytes, row_bytes, rows;
  };
  static constexpr int kMaxRuns = 256;

  FUSEDATTN_ALWAYS_INLINE void open_row() {
    const char* row = runs_[run_].first + row_ * runs_[run_].stride_bytes;
    line_ = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t(63));
    end_ = row + runs_[run_].row_bytes;
  }

  FUSEDATTN_ALWAYS_INLINE bool next_row() {
    if (++row_ == runs_[run_].rows) {
      row_ = 0;
      if (++run_ == count_) {
        per_visit_ = 0;  // every queued line is requested
        return false;
      }
    }
    open_row();
    return true;
  }

  Run runs_[kMaxRuns];
  int count_ = 0, run_ = 0, per_visit_ = 0;
  Phase phase_ = kScores;
  int64_t row_ = 0, lines_ = 0, visits_ = 0, last_visits_[kPhases] = {};
  const char* line_ = nullptr;
  const char* end_ = nullptr;
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
