// CPU detection and the dispatch table. Compiled without ISA flags: it must run everywhere.
#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "fusedattn/dispatch.h"
#include "kernels/kernels.h"
#include "runtime.h"

namespace fusedattn {
namespace {

using ForwardKernel = void (*)(const AttnParams&);

// Every ISA level's name, compiled here or not: the one place names are written.
struct IsaName {
  Isa isa;
  const char* name;
};
constexpr IsaName kIsaNames[] = {{Isa::kScalar, "scalar"},
                                 {Isa::kAvx2, "avx2"},
                                 {Isa::kAvx512, "avx512"},
                                 {Isa::kAvx512Bf16, "avx512bf16"},
                                 {Isa::kAmx, "amx"}};

// The compiled levels: their kernels and the CPU check that allows them.
struct IsaEntry {
  Isa isa;
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

// CPUID leaf 7: AMX-BF16 (EDX bit 22), AMX-TILE (EDX bit 24); sub-leaf 1: AMX-FP16 (EAX bit 21).
bool cpuid_has_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22 & 1) && (d >> 24 & 1);
}
bool cpuid_has_amx_fp16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a >> 21 & 1;
}
#else
[[maybe_unused]] bool cpuid_has_amx() { return false; }
[[maybe_unused]] bool cpuid_has_amx_fp16() { return false; }
[[maybe_unused]] bool cpu_has_avx2() { return false; }
[[maybe_unused]] bool cpu_has_avx512() { return false; }
[[maybe_unused]] bool cpu_has_avx512bf16() { return false; }
#endif

// The tile data state (XTILEDATA, 8 KiB per thread) is off by default on Linux: a process asks for it
// once, before its first tile instruction, and a refusal is an answer, not a crash
// (Documentation/arch/x86/xstate.rst). The answer is kept for the process.
struct AmxGrant {
  bool os = false;
  std::string reason;
};

const AmxGrant& amx_grant() {
  static const AmxGrant grant = [] {
    AmxGrant g;
    if (!cpuid_has_amx()) {
      g.reason = "this CPU has no AMX-TILE / AMX-BF16 (CPUID)";
      return g;
    }
    if (!cpu_has_avx512bf16()) {
      g.reason = "the amx level also needs AVX-512 with AVX512-BF16";
      return g;
    }
#if defined(__linux__) && defined(__x86_64__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
      g.reason = "the Linux kernel refused the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM) failed: "
                 "a kernel older than 5.16, or a seccomp policy)";
      return g;
    }
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));  // XCR0: bits 17 (XTILECFG), 18 (XTILEDATA)
    if ((eax >> 17 & 3) != 3) {
      g.reason = "the OS does not enable the AMX tile state (XCR0)";
      return g;
    }
    g.os = true;
#else
    g.reason = "asking for the AMX tile state is implemented for Linux x86-64 only";
#endif
    return g;
  }();
  return grant;
}

// 0: the tiles themselves; 1: the software model of a CPU with AMX-BF16 (Sapphire Rapids); 2: with
// AMX-FP16 too (Granite Rapids).
std::atomic<int> g_amx_emulation{0};

[[maybe_unused]] bool cpu_has_amx() { return g_amx_emulation.load() != 0 || amx_grant().os; }

#ifdef FUSEDATTN_HAVE_AMX
void forward_amx(const AttnParams& p) {
  (g_amx_emulation.load() ? kernels::attention_forward_amx_model : kernels::attention_forward_amx_native)(p);
}
void backward_amx(const AttnParams& p) {
  (g_amx_emulation.load() ? kernels::attention_backward_amx_model : kernels::attention_backward_amx_native)(p);
}
#endif

// Ordered worst to best.
const IsaEntry kTable[] = {
    {Isa::kScalar, kernels::attention_forward_scalar, kernels::attention_weights_scalar,
     kernels::attention_backward_scalar,
     kernels::machine_probe_scalar, always},
#ifdef FUSEDATTN_HAVE_AVX2
    {Isa::kAvx2, kernels::attention_forward_avx2, kernels::attention_weights_avx2,
     kernels::attention_backward_avx2,
     kernels::machine_probe_avx2, cpu_has_avx2},
#endif
#ifdef FUSEDATTN_HAVE_AVX512
    {Isa::kAvx512, kernels::attention_forward_avx512, kernels::attention_weights_avx512,
     kernels::attention_backward_avx512,
     kernels::machine_probe_avx512, cpu_has_avx512},
#endif
#ifdef FUSEDATTN_HAVE_AVX512BF16
    // Only bfloat16 forward calls have a kernel of their own; the rest is the AVX-512 path.
    {Isa::kAvx512Bf16, kernels::attention_forward_avx512bf16, kernels::attention_weights_avx512,
     kernels::attention_backward_avx512, kernels::machine_probe_avx512, cpu_has_avx512bf16},
#endif
#ifdef FUSEDATTN_HAVE_AMX
    // Prefill forward of bfloat16, float16 and float32 (precision high / medium) on the tiles; the rest
    // is the avx512bf16 level's. Emulation swaps the tiles for their software model (test switch).
    {Isa::kAmx, forward_amx, kernels::attention_weights_avx512, backward_amx,
     kernels::machine_probe_avx512, cpu_has_amx},
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
  for (const IsaName& entry : kIsaNames)
    if (entry.isa == isa) return entry.name;
  return "unknown";
}

bool isa_from_name(const std::string& name, Isa* isa) {
  for (const IsaName& entry : kIsaNames) {
    if (name == entry.name) {
      *isa = entry.isa;
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

AmxStatus amx_status() {
  AmxStatus status;
#ifdef FUSEDATTN_HAVE_AMX
  status.compiled = true;
#endif
  status.cpu = cpuid_has_amx();
  status.cpu_fp16 = cpuid_has_amx_fp16();
#ifdef FUSEDATTN_HAVE_AMX_FP16
  status.native_fp16 = status.cpu_fp16;
#endif
  const AmxGrant& grant = amx_grant();
  status.os = grant.os;
  status.reason = status.compiled ? grant.reason : "the amx level is not compiled into this build";
  status.emulated = g_amx_emulation.load();
  if (status.emulated) status.reason = "";
  return status;
}

void set_amx_emulation(int mode) {
  if (mode < 0 || mode > 2) throw std::invalid_argument("amx emulation: mode must be 0 (off), 1 (AMX-BF16) or 2 (AMX-FP16 too)");
#ifndef FUSEDATTN_HAVE_AMX
  if (mode) throw std::invalid_argument("amx emulation: the amx level is not compiled into this build");
#endif
  g_amx_emulation.store(mode);
  // Leaving emulation on a CPU without AMX must not leave the amx level selected.
  if (!mode && current_isa() == Isa::kAmx && !amx_grant().os)
    g_selected.store(static_cast<int>(best_supported_isa()), std::memory_order_relaxed);
}

namespace {
bool cpu_is_intel() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  return b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;  // "Genu" "ineI" "ntel"
#else
  return false;
#endif
}
std::atomic<int> g_decode_read_ahead{-1};
}  // namespace

bool decode_read_ahead() {
  const int mode = g_decode_read_ahead.load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 1;
  static const bool by_default = cpu_is_intel();
  return by_default;
}

void set_decode_read_ahead(int mode) {
  if (mode < -1 || mode > 1)
    throw std::invalid_argument("decode read-ahead: mode must be 1 (on), 0 (off) or -1 (the CPU's default)");
  g_decode_read_ahead.store(mode, std::memory_order_relaxed);
}

bool amx_fp16_enabled() {
  const int emulation = g_amx_emulation.load();
  if (emulation) return emulation == 2;
#ifdef FUSEDATTN_HAVE_AMX_FP16
  return cpuid_has_amx_fp16();
#else
  return false;
#endif
}

namespace detail {
void run_forward_kernel(const AttnParams& params) { find_entry(current_isa())->forward(params); }
void run_weights_kernel(const AttnParams& params) { find_entry(current_isa())->weights(params); }
void run_backward_kernel(const AttnParams& params) { find_entry(current_isa())->backward(params); }
kernels::MachineProbe current_probe() { return find_entry(current_isa())->probe(); }
}  // namespace detail

}  // namespace fusedattn
