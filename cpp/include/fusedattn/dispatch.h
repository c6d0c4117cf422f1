// Run-time choice of the instruction-set path: one table, one call.
#pragma once

#include <string>
#include <vector>

#include "fusedattn/params.h"

namespace fusedattn {

// kAvx512Bf16 is kAvx512 plus native bfloat16 dot products (vdpbf16ps) for bfloat16 inputs; kAmx is
// kAvx512Bf16 plus Intel AMX tiles (TDPBF16PS) for the prefill products of bfloat16, float16 and
// float32 with Precision::kHigh / kMedium.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* isa);

std::vector<Isa> compiled_isas();   // built into this binary, best last
std::vector<Isa> supported_isas();  // compiled and runnable on this CPU, best last
Isa best_supported_isa();

Isa current_isa();
// Throws std::invalid_argument if `isa` is not compiled or not supported by this CPU.
void set_isa(Isa isa);

// What stands between this process and the AMX tiles. `os` is the answer of the Linux kernel to the
// request for the tile state (asked once per process, on the first call); `reason` says why the level
// is unavailable ("" when it is available). `emulated`: the amx level runs on the exact software model
// of the tile instructions (a test switch, set_amx_emulation) instead of the tiles.
struct AmxStatus {
  bool compiled = false;  // the amx translation units are in this build
  bool cpu = false;       // CPUID: AMX-TILE and AMX-BF16
  bool cpu_fp16 = false;  // CPUID: AMX-FP16 (Granite Rapids and later)
  bool native_fp16 = false;  // AMX-FP16 compiled in too: float16 runs on TDPFP16PS
  bool os = false;        // the OS granted the tile state (XCR0 and arch_prctl)
  int emulated = 0;       // set_amx_emulation's mode
  std::string reason;
};
AmxStatus amx_status();
// Test switch: mode 1 makes the amx level available on any AVX-512 CPU, running the software model of
// LDTILECFG / TILELOADD / TILESTORED / TDPBF16PS instead of the tiles; mode 2 models a CPU with
// AMX-FP16 too (float16 on TDPFP16PS); 0 is the hardware. std::invalid_argument for other modes.
void set_amx_emulation(int mode);

// Whether decode prefetches K / V rows that it reads one after the other (contiguous, one query row per kv
// head) in software, as it always does for paged or re-read rows. By default where the CPU is Intel's: on
// the Xeon measured the hardware prefetchers left contiguous one-row decode at 82-89% of the read bandwidth
// and the software requests took it to 93-99%; on AMD (Zen 4) the requests cost 10-20% and on Zen 1 they
// were within noise (docs/performance.md). set_decode_read_ahead: 1 on, 0 off, -1 the CPU's default;
// std::invalid_argument for other modes.
bool decode_read_ahead();
void set_decode_read_ahead(int mode);

// Validates `params` (std::invalid_argument on inconsistency) and runs the selected kernel.
void attention_forward(const AttnParams& params);
// Writes the softmax probabilities into params.weights (keys past the causal limit are left as given).
void attention_weights(const AttnParams& params);
// Gradients dq, dk, dv of the forward pass for the upstream gradient params.dout (deterministic: the same
// bits at any num_threads). params.lse must hold the forward's logsumexp.
void attention_backward(const AttnParams& params);

// The fp32 FMA throughput of the selected ISA path on `num_threads` threads, in GFLOP/s (best of a few
// short runs of independent FMA chains): the "peak" the benchmark reports compute-bound figures against.
double measure_fma_peak_gflops(int num_threads);
// Streaming read bandwidth over a `bytes` buffer (make it far larger than the caches), in GB/s: the
// ceiling of memory-bound work such as decoding against a long KV cache.
double measure_read_bandwidth_gbs(int num_threads, int64_t bytes);

int max_threads();
bool openmp_enabled();

}  // namespace fusedattn
