// Which sums does this CPU's TDPBF16PS compute? The software model of the tiles (cpp/src/kernels/amx_tiles.h,
// ModelTiles::dot) must give the hardware's bits, so this runs the instruction on random 1-row tiles of depth
// 1, 2, 4 and 16 pairs and counts how often each candidate formula gives the same fp32 bits:
//   two-lane: even and odd products in two fp32 accumulators from zero (FMA, k ascending), their sum added
//             to C (the SDM's current pseudocode; what the model computes);
//   one-lane: every product folded into C in turn (the SDM's older pseudocode).
// Needs a CPU with AMX-BF16 and Linux >= 5.16. Build and run:
//   g++ -O2 -mamx-tile -mamx-bf16 scripts/check_amx_dot.cpp -o /tmp/check_amx_dot && /tmp/check_amx_dot
// A Xeon (family 6 model 167, KVM, 2026-12) gave two-lane 100% at every depth, one-lane 32% at depth 16.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

float widen(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

uint16_t narrow(float value) {  // truncation is fine: any bfloat16 will do as an input
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  return static_cast<uint16_t>(word >> 16);
}

}  // namespace

int main() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::puts("the OS does not grant the AMX tile state here");
    return 1;
  }
  std::mt19937 rng(2026);
  std::normal_distribution<float> normal;
  for (int pairs : {1, 2, 4, 16}) {
    TileConfig config;
    config.rows[0] = 1, config.colsb[0] = 4;              // C: 1 x 1 fp32
    config.rows[1] = 1, config.colsb[1] = 4 * pairs;      // A: 1 row of `pairs` bf16 pairs
    config.rows[2] = pairs, config.colsb[2] = 4;          // B: `pairs` rows of one pair
    // GCC 12's _tile_loadconfig declares an 8-byte operand: without the barrier the stores of the other 56
    // bytes may be dropped or sunk past the LDTILECFG (see amx_tiles.h)
    asm volatile("" ::: "memory");
    _tile_loadconfig(&config);
    const int trials = 100000;
    int two_lane = 0, one_lane = 0;
    for (int t = 0; t < trials; ++t) {
      uint16_t a[32], b[32];
      const float c = normal(rng);
      for (int e = 0; e < 2 * pairs; ++e) {
        a[e] = narrow(normal(rng));
        b[e] = narrow(std::ldexp(normal(rng), static_cast<int>(rng() % 21) - 10));  // spread the exponents
      }
      float hardware = c;
      _tile_loadd(0, &hardware, 4);
      _tile_loadd(1, a, 4 * pairs);
      _tile_loadd(2, b, 4);
      _tile_dpbf16ps(0, 1, 2);
      _tile_stored(0, &hardware, 4);
      float lanes[2] = {0.0f, 0.0f}, folded = c;
      for (int k = 0; k < pairs; ++k)
        for (int half = 0; half < 2; ++half) {
          lanes[half] = std::fma(widen(a[2 * k + half]), widen(b[2 * k + half]), lanes[half]);
          folded = std::fma(widen(a[2 * k + half]), widen(b[2 * k + half]), folded);
        }
      two_lane += hardware == c + (lanes[0] + lanes[1]);
      one_lane += hardware == folded;
    }
    _tile_release();
    std::printf("depth %2d pairs: two-lane %6.2f%%  one-lane %6.2f%%\n", pairs, 100.0 * two_lane / trials,
                100.0 * one_lane / trials);
  }
  return 0;
}
