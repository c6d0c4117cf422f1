#include <cstdlib>
#include <new>

#include "runtime.h"
#include "fusedattn/dispatch.h"

#ifdef FUSEDATTN_OPENMP
#include <omp.h>
#endif

namespace fusedattn {

void parallel_for(int64_t num_items, int num_threads, ParallelBody body, void* context) {
  if (num_items <= 0) return;
  if (num_threads > num_items) num_threads = static_cast<int>(num_items);
#ifdef FUSEDATTN_OPENMP
  if (num_threads > 1) {
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) body(context, item, omp_get_thread_num());
    return;
  }
#else
  (void)num_threads;
#endif
  for (int64_t item = 0; item < num_items; ++item) body(context, item, 0);
}

int max_threads() {
#ifdef FUSEDATTN_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool openmp_enabled() {
#ifdef FUSEDATTN_OPENMP
  return true;
#else
  return false;
#endif
}

void* aligned_allocate(std::size_t bytes) {
  constexpr std::size_t kAlignment = 64;  // a cache line, and one AVX-512 register
  std::size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  if (rounded == 0) rounded = kAlignment;
  void* pointer = ::operator new(rounded, std::align_val_t(kAlignment));
  return pointer;
}

void aligned_free(void* pointer) noexcept {
  if (pointer) ::operator delete(pointer, std::align_val_t(64));
}

}  // namespace fusedattn
