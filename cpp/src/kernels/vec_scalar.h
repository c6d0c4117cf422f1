// The portable path: "vectors" of one element. Everything the kernel template needs from an ISA.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

template <class Scalar>
struct VecScalar {
  using T = Scalar;
  using V = Scalar;
  using S = T;  // storage type of the caller's arrays (WithStorage overrides it)
  static constexpr int W = 1;
  // 4 x 4 scalar accumulators fit the 16 registers every x86-64 / AArch64 core has.
  static constexpr int kTileRows = 4;
  static constexpr int kTileVecs = 4;
  static constexpr int kRegisters = 16;  // vector registers (the decode loops' budget)

  static V zero() { return T(0); }
  static V set1(T x) { return x; }
  static V load(const T* p) { return *p; }
  static V loadu(const T* p) { return *p; }
  static void store(T* p, V x) { *p = x; }
  static void storeu(T* p, V x) { *p = x; }
  // Not std::fma: without FMA hardware (no ISA flags here) it is a slow library call.
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V div(V a, V b) { return a / b; }
  static V exp2(V x) { return std::exp2(x); }
  static V neginf_to_zero(V x) { return x == -std::numeric_limits<T>::infinity() ? T(0) : x; }
  static bool all_equal(V a, V b) { return a == b; }
  static T reduce_max(V x) { return x; }
  static void transpose(const T* src, int64_t, T* dst, int64_t) { *dst = *src; }
  static T reduce_add(V x) { return x; }
  static V sum_each(const V* acc) { return acc[0]; }
};

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
