// Timing around the per-ISA machine probes; portable code.
#include <atomic>
#include <chrono>
#include <cstring>
#include <new>
#include <stdexcept>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fusedattn/dispatch.h"
#include "kernels/kernels.h"
#include "runtime.h"

namespace fusedattn {
namespace detail {
kernels::MachineProbe current_probe();
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Runs body once per thread, all threads at once; returns the best wall time of `repeats` runs.
template <class Body>
double best_parallel_time(int num_threads, int repeats, Body& body) {
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    parallel_for(
        num_threads, num_threads, [](void* context, int64_t item, int) { (*static_cast<Body*>(context))(item); }, &body);
    const double elapsed = seconds_since(start);
    if (elapsed < best) best = elapsed;
  }
  return best;
}

// Keeps the probes' checksums alive (so their loops cannot be dropped); the probe threads store to it
// concurrently, hence atomic. A relaxed store is a plain store on the targets, so it adds nothing to
// what is measured.
std::atomic<double> g_checksum{0.0};

void keep(double checksum) { g_checksum.store(checksum, std::memory_order_relaxed); }

}  // namespace

double measure_fma_peak_gflops(int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  const kernels::MachineProbe probe = detail::current_probe();
  // Calibrate to ~50 ms per run so that thread start-up and timer resolution do not matter.
  int64_t iterations = 1 << 16;
  for (;;) {
    const auto start = std::chrono::steady_clock::now();
    keep(probe.fma_chains(iterations));
    if (seconds_since(start) > 0.01 || iterations > (int64_t(1) << 34)) break;
    iterations *= 4;
  }
  iterations *= 5;
  auto body = [&](int64_t) { keep(probe.fma_chains(iterations)); };
  const double seconds = best_parallel_time(num_threads, 3, body);
  return probe.flops_per_iteration * static_cast<double>(iterations) * num_threads / seconds / 1e9;
}

double measure_read_bandwidth_gbs(int num_threads, int64_t bytes) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (bytes < (int64_t(1) << 20)) throw std::invalid_argument("bytes must be at least 1 MiB");
  const kernels::MachineProbe probe = detail::current_probe();
  const int64_t count = bytes / static_cast<int64_t>(sizeof(float)) / 64 * 64;
  const int64_t per_thread = count / num_threads / 64 * 64;
  // NumPy asks Linux for transparent huge pages for its large arrays (madvise), so the kernels read K and V
  // with few TLB misses; a buffer on 4 KiB pages read at 31 GB/s where bfloat16 decode streamed NumPy's
  // arrays at 52 (Zen 4, 2 threads). The probe reads memory the way the kernels see it.
  constexpr std::size_t kHugePage = std::size_t(1) << 21;
  const std::size_t buffer_bytes = (static_cast<std::size_t>(count) * sizeof(float) + kHugePage - 1) / kHugePage * kHugePage;
  float* data = static_cast<float*>(::operator new(buffer_bytes, std::align_val_t(kHugePage)));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(data, buffer_bytes, MADV_HUGEPAGE);  // a hint: where refused, the probe reads 4 KiB pages
#endif
  // First touch from the thread that will read each part, so its pages are local to it.
  auto fill = [&](int64_t t) { std::memset(data + t * per_thread, 0, static_cast<std::size_t>(per_thread) * sizeof(float)); };
  best_parallel_time(num_threads, 1, fill);
  auto body = [&](int64_t t) { keep(probe.sum_stream(data + t * per_thread, per_thread)); };
  const double seconds = best_parallel_time(num_threads, 5, body);
  ::operator delete(data, std::align_val_t(kHugePage));
  return static_cast<double>(per_thread) * num_threads * sizeof(float) / seconds / 1e9;
}

}  // namespace fusedattn
