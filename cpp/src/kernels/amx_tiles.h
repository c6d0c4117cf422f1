// Intel AMX tile instructions behind one policy, in two implementations:
//   NativeTiles - the instructions themselves (attn_fwd_amx.cpp, compiled with -mamx-tile -mamx-bf16);
//   ModelTiles  - an exact software model of them (attn_fwd_amx_model.cpp, AVX-512 flags only), so the
//                 whole AMX code path (packing, tile loops, edges) runs and is tested on any AVX-512 CPU.
// The kernels use one tile configuration for everything, set by configure() at the start of a work item
// and dropped by release() at its end: OpenMP threads, Python threads and other AMX users in the process
// (torch, oneDNN) never inherit or see a stale configuration.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// Palette 1 with every tile register 16 rows x 64 bytes: a C tile is 16 x 16 fp32, an A tile 16 rows of
// 32 16-bit elements along the depth, a B tile 16 rows of 16 pairs (the VNNI layout: B(k, n) is the
// (k % 2)-th half of word n of row k / 2).
constexpr int kTileRows = 16;
constexpr int kTileBytes = 64;
constexpr int kTileDepth = 32;  // 16-bit elements along the depth of one A tile (16 pairs of B)
constexpr int kTileCols = 16;   // fp32 columns of a C tile

struct alignas(64) TileConfig {  // the 64-byte LDTILECFG operand
  uint8_t palette = 0, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr TileConfig uniform_tile_config() {
  TileConfig config;
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = kTileBytes;
    config.rows[t] = kTileRows;
  }
  return config;
}
// The operand LDTILECFG reads, in read-only data. GCC 12's _tile_loadconfig declares an asm operand of 8
// bytes (a pointer's worth), so a configuration built on the stack could lose the stores of its other 56
// bytes: the backward's work item loaded palette and rows with every column width zero, which the hardware
// refuses with a #GP (a crash on a Xeon; the model builds its own configuration, so only a native run could
// show it).
inline constexpr TileConfig kUniformTileConfig = uniform_tile_config();

#ifdef __AMX_TILE__
// GCC's tile intrinsics paste the register number into the instruction's text, so it must be a literal:
// each template maps its compile-time register onto one (kernels use tmm0-3 for C, 4-5 for A, 6-7 for B).
#define FUSEDATTN_TILE_CASES(op, ...)                                           \
  if constexpr (kTile == 0) op(0, __VA_ARGS__);                                 \
  else if constexpr (kTile == 1) op(1, __VA_ARGS__);                            \
  else if constexpr (kTile == 2) op(2, __VA_ARGS__);                            \
  else if constexpr (kTile == 3) op(3, __VA_ARGS__);                            \
  else if constexpr (kTile == 4) op(4, __VA_ARGS__);                            \
  else if constexpr (kTile == 5) op(5, __VA_ARGS__);                            \
  else if constexpr (kTile == 6) op(6, __VA_ARGS__);                            \
  else op(7, __VA_ARGS__);
#define FUSEDATTN_DOT_CASES(op)                                                                       \
  static_assert(kA == 4 + kC / 2 && kB == 6 + kC % 2, "C tiles are tmm0-3 = 2i + j, A tmm4 + i, B tmm6 + j"); \
  if constexpr (kC == 0) op(0, 4, 6);                                                                 \
  else if constexpr (kC == 1) op(1, 4, 7);                                                            \
  else if constexpr (kC == 2) op(2, 5, 6);                                                            \
  else op(3, 5, 7);

struct NativeTiles {
  static void configure() { _tile_loadconfig(&kUniformTileConfig); }
  static void release() { _tile_release(); }
  template <int kTile>
  static void zero() {
    if constexpr (kTile == 0) _tile_zero(0);
    else if constexpr (kTile == 1) _tile_zero(1);
    else if constexpr (kTile == 2) _tile_zero(2);
    else _tile_zero(3);
    static_assert(kTile < 4, "only C tiles are zeroed");
  }
  template <int kTile>
  static void load(const void* base, int64_t stride_bytes) { FUSEDATTN_TILE_CASES(_tile_loadd, base, stride_bytes) }
  template <int kTile>
  static void store(void* base, int64_t stride_bytes) { FUSEDATTN_TILE_CASES(_tile_stored, base, stride_bytes) }
  template <int kC, int kA, int kB>
  static void dot_bf16() { FUSEDATTN_DOT_CASES(_tile_dpbf16ps) }
#ifdef __AMX_FP16__
  static constexpr bool kHasFp16 = true;
  template <int kC, int kA, int kB>
  static void dot_fp16() { FUSEDATTN_DOT_CASES(_tile_dpfp16ps) }
#else
  static constexpr bool kHasFp16 = false;
  template <int kC, int kA, int kB>
  static void dot_fp16() { static_assert(kC < 0, "TDPFP16PS needs a compiler with -mamx-fp16"); }
#endif
};
#undef FUSEDATTN_TILE_CASES
#undef FUSEDATTN_DOT_CASES
#endif

// The software model: each instruction as the Intel SDM's pseudocode states it (vol. 2, TILELOADD,
// TILESTORED, TILEZERO, TDPBF16PS, TDPFP16PS; for TDPBF16PS checked against a Xeon, see dot()), on a
// per-thread register file. A shape the hardware would
// refuse with #UD (a tile used before LDTILECFG, mismatched A / B / C shapes) aborts with a message:
// for the kernels here that is a bug, never a user error.
struct ModelTiles {
  static constexpr bool kHasFp16 = true;

  struct RegisterFile {
    TileConfig config;
    bool configured = false;
    alignas(64) uint8_t tile[8][kTileRows * kTileBytes];
  };
  static RegisterFile& registers() {
    static thread_local RegisterFile file;
    return file;
  }
  [[noreturn]] static void fault(const char* what) {
    std::fprintf(stderr, "fusedattn: AMX model: %s (a #UD on the hardware)\n", what);
    std::abort();
  }
  static const TileConfig& config() {
    if (!registers().configured) fault("tile instruction without a tile configuration");
    return registers().config;
  }

  static void configure() {  // LDTILECFG zeroes every tile
    RegisterFile& file = registers();
    file.config = kUniformTileConfig;
    file.configured = true;
    std::memset(file.tile, 0, sizeof file.tile);
  }
  static void release() {  // TILERELEASE: back to the init state
    RegisterFile& file = registers();
    file.configured = false;
    std::memset(file.tile, 0, sizeof file.tile);
  }
  template <int kTile>
  static void zero() {
    config();
    std::memset(registers().tile[kTile], 0, sizeof registers().tile[kTile]);
  }
  // Rows [0, rows) of colsb bytes each from base + row * stride; the rest of the register is zeroed.
  template <int kTile>
  static void load(const void* base, int64_t stride_bytes) {
    const TileConfig& c = config();
    uint8_t* tile = registers().tile[kTile];
    std::memset(tile, 0, kTileRows * kTileBytes);
    for (int r = 0; r < c.rows[kTile]; ++r)
      std::memcpy(tile + r * kTileBytes, static_cast<const uint8_t*>(base) + r * stride_bytes, c.colsb[kTile]);
  }
  template <int kTile>
  static void store(void* base, int64_t stride_bytes) {
    const TileConfig& c = config();
    for (int r = 0; r < c.rows[kTile]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride_bytes, registers().tile[kTile] + r * kTileBytes,
                  c.colsb[kTile]);
  }

  // bfloat16 -> fp32 with DAZ (TDPBF16PS treats input denormals as zero).
  static float bf16_daz(uint16_t bits) {
    if ((bits & 0x7F80u) == 0) bits &= 0x8000u;
    const uint32_t word = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &word, sizeof value);
    return value;
  }
  static float fp16_value(uint16_t bits) { return _cvtsh_ss(bits); }
  static float flush_denormal(float x) {  // FTZ on the written fp32 results
    return std::fabs(x) < 1.17549435e-38f ? std::copysign(0.0f, x) : x;
  }

  // C.row[m].fp32[n] += even[n] + odd[n], where even[n] (odd[n]) starts at zero and takes the FMA of
  // A.row[m].e[2k] * B.row[k].e[2n] (e[2k + 1] * e[2n + 1]) for k ascending: two fp32 accumulators per output,
  // summed once at the end, as the SDM's current pseudocode has it (its older text folded both products into
  // C one after the other; a Xeon gives these sums bit for bit on random tiles of depth 1, 2 and 16 pairs,
  // the older ones in under a third of the cases at depth 16). Each step rounds once (RNE) and flushes an
  // fp32 denormal to zero. TDPFP16PS is modelled the same way; no CPU here has AMX-FP16 to confirm it.
  template <int kC, int kA, int kB, class Widen>
  static void dot(Widen widen) {
    const TileConfig& c = config();
    if (c.rows[kA] != c.rows[kC] || c.colsb[kA] != 4 * c.rows[kB] || c.colsb[kB] != c.colsb[kC])
      fault("tile shapes of a dot product do not match");
    RegisterFile& file = registers();
    const int depth_pairs = c.colsb[kA] / 4, columns = c.colsb[kC] / 4;
    // alignas: GCC widens the alignment of local arrays it vectorises, and under ASan (GCC 12,
    // detect_stack_use_after_return) such a frame on the fake stack was not 64-byte aligned: an aligned
    // zmm store to `lanes` faulted. Declared alignment is honoured there.
    alignas(64) float a[kTileRows][2 * kTileCols], b[kTileRows][2 * kTileCols];  // the operands, widened once
    for (int r = 0; r < kTileRows; ++r)
      for (int e = 0; e < 2 * kTileCols; ++e) {
        uint16_t a_bits, b_bits;
        std::memcpy(&a_bits, file.tile[kA] + r * kTileBytes + 2 * e, 2);
        std::memcpy(&b_bits, file.tile[kB] + r * kTileBytes + 2 * e, 2);
        a[r][e] = widen(a_bits);
        b[r][e] = widen(b_bits);
      }
    for (int m = 0; m < c.rows[kC]; ++m) {
      alignas(64) float row[kTileCols], lanes[2][kTileCols] = {};
      std::memcpy(row, file.tile[kC] + m * kTileBytes, sizeof row);
      for (int k = 0; k < depth_pairs; ++k)
        for (int half = 0; half < 2; ++half)
          for (int n = 0; n < columns; ++n)
            lanes[half][n] = flush_denormal(std::fma(a[m][2 * k + half], b[k][2 * n + half], lanes[half][n]));
      for (int n = 0; n < columns; ++n) row[n] = flush_denormal(row[n] + flush_denormal(lanes[0][n] + lanes[1][n]));
      std::memcpy(file.tile[kC] + m * kTileBytes, row, sizeof row);
    }
  }
  template <int kC, int kA, int kB>
  static void dot_bf16() { dot<kC, kA, kB>(bf16_daz); }
  template <int kC, int kA, int kB>
  static void dot_fp16() { dot<kC, kA, kB>(fp16_value); }
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
