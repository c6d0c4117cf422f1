// Machine probes, compiled per ISA like the kernels: the FMA peak and the streaming read bandwidth the
// benchmark reports its figures against ("% of peak", "% of bandwidth").
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

// kChains independent FMA chains: more than latency x throughput on current cores (4 cycles x 2 pipes),
// few enough to stay in 16 registers with the two constants.
template <class Vec>
double fma_chains(int64_t iterations) {
  using V = typename Vec::V;
  using T = typename Vec::T;
  constexpr int kChains = 12;
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = Vec::set1(static_cast<T>(c));
  const V multiplier = Vec::set1(static_cast<T>(0.999999)), addend = Vec::set1(static_cast<T>(1e-6));
  for (int64_t i = 0; i < iterations; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = Vec::fmadd(acc[c], multiplier, addend);
  alignas(64) T lanes[Vec::W];
  double total = 0;
  for (int c = 0; c < kChains; ++c) {
    Vec::store(lanes, acc[c]);
    for (int w = 0; w < Vec::W; ++w) total += lanes[w];
  }
  return total;  // consumed by the caller so the loop cannot be optimised away
}

template <class Vec>
double fma_flops_per_iteration() {
  return 12.0 * Vec::W * 2.0;
}

// Sums `count` aligned floats with four independent accumulators: a pure streaming read.
template <class Vec>
double sum_stream(const typename Vec::T* data, int64_t count) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  V a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  int64_t i = 0;
  for (; i + 4 * W <= count; i += 4 * W) {
    a0 = Vec::add(a0, Vec::load(data + i));
    a1 = Vec::add(a1, Vec::load(data + i + W));
    a2 = Vec::add(a2, Vec::load(data + i + 2 * W));
    a3 = Vec::add(a3, Vec::load(data + i + 3 * W));
  }
  double total = Vec::reduce_add(Vec::add(Vec::add(a0, a1), Vec::add(a2, a3)));
  for (; i < count; ++i) total += data[i];
  return total;
}

template <class VecF32>
kernels::MachineProbe make_probe() {
  return kernels::MachineProbe{fma_chains<VecF32>, fma_flops_per_iteration<VecF32>(), sum_stream<VecF32>};
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
