// CPU detection and the dispatch table. Compiled without ISA flags: it must run everywhere.
#include <atomic>
#include <stdexcept>
#include <string>

#include "fusedattn/dispatch.h"
#include "kernels/kernels.h"

namespace fusedattn {
namespace {

using ForwardKernel = void (*)(const AttnParams&);

struct IsaEntry {
  Isa isa;
  const char* name;
  ForwardKernel forward;
  ForwardKernel weights;
  ForwardKernel backward;
  kernels::MachineProbe (*probe)();
  bool (*cpu_has)();
};

bool always() { return true; }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV).
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && cpu_has_avx2();
}
bool cpu_has_avx512bf16() { return __builtin_cpu_supports("avx512bf16") && cpu_has_avx512(); }
#else
[[maybe_unused]] bool cpu_has_avx2() { return false; }
[[maybe_unused]] bool cpu_has_avx512() { return false; }
[[maybe_unused]] bool cpu_has_avx512bf16() { return false; }
#endif

// Ordered worst to best.
const IsaEntry kTable[] = {
    {Isa::kScalar, "scalar", kernels::attention_forward_scalar, kernels::attention_weights_scalar,
     kernels::attention_backward_scalar,
     kernels::machine_probe_scalar, always},
#ifdef FUSEDATTN_HAVE_AVX2
    {Isa::kAvx2, "avx2", kernels::attention_forward_avx2, kernels::attention_weights_avx2,
     kernels::attention_backward_avx2,
     kernels::machine_probe_avx2, cpu_has_avx2},
#endif
#ifdef FUSEDATTN_HAVE_AVX512
    {Isa::kAvx512, "avx512", kernels::attention_forward_avx512, kernels::attention_weights_avx512,
     kernels::attention_backward_avx512,
     kernels::machine_probe_avx512, cpu_has_avx512},
#endif
#ifdef FUSEDATTN_HAVE_AVX512BF16
    // Only bfloat16 forward calls have a kernel of their own; the rest is the AVX-512 path.
    {Isa::kAvx512Bf16, "avx512bf16", kernels::attention_forward_avx512bf16, kernels::attention_weights_avx512,
     kernels::attention_backward_avx512, kernels::machine_probe_avx512, cpu_has_avx512bf16},
#endif
};

const IsaEntry* find_entry(Isa isa) {
  for (const IsaEntry& entry : kTable)
    if (entry.isa == isa) return &entry;
  return nullptr;
}

std::atomic<int> g_selected{-1};  // -1: not chosen yet

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

bool isa_from_name(const std::string& name, Isa* isa) {
  for (Isa candidate : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (name == isa_name(candidate)) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

std::vector<Isa> compiled_isas() {
  std::vector<Isa> result;
  for (const IsaEntry& entry : kTable) result.push_back(entry.isa);
  return result;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> result;
  for (const IsaEntry& entry : kTable)
    if (entry.cpu_has()) result.push_back(entry.isa);
  return result;
}

Isa best_supported_isa() { return supported_isas().back(); }

Isa current_isa() {
  int selected = g_selected.load(std::memory_order_relaxed);
  if (selected < 0) {
    selected = static_cast<int>(best_supported_isa());
    g_selected.store(selected, std::memory_order_relaxed);
  }
  return static_cast<Isa>(selected);
}

void set_isa(Isa isa) {
  const IsaEntry* entry = find_entry(isa);
  if (!entry) throw std::invalid_argument(std::string("ISA '") + isa_name(isa) + "' is not compiled into this build");
  if (!entry->cpu_has())
    throw std::invalid_argument(std::string("ISA '") + isa_name(isa) + "' is not supported by this CPU");
  g_selected.store(static_cast<int>(isa), std::memory_order_relaxed);
}

namespace detail {
void run_forward_kernel(const AttnParams& params) { find_entry(current_isa())->forward(params); }
void run_weights_kernel(const AttnParams& params) { find_entry(current_isa())->weights(params); }
void run_backward_kernel(const AttnParams& params) { find_entry(current_isa())->backward(params); }
kernels::MachineProbe current_probe() { return find_entry(current_isa())->probe(); }
}  // namespace detail

}  // namespace fusedattn
