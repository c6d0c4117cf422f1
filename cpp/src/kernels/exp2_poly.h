// exp2 on vectors: 2^x = 2^n * 2^f with n = round(x), f in [-1/2, 1/2], and 2^f from its Taylor series
// e^(f ln 2). Truncation error: (ln2/2)^8/8! = 5e-9 relative at degree 7 (below float's 6e-8 ulp) and
// (ln2/2)^14/14! = 4e-18 at degree 13 (below double's 1.1e-16 ulp), so rounding dominates: about 1 ulp.
// Included inside the ISA namespace of each kernel translation unit.
#pragma once

namespace fusedattn::FUSEDATTN_KERNEL_NS {

inline constexpr double kExp2Taylor[14] = {
    0x1.0000000000000p+0,  // ln(2)^0 / 0!  = 1.0
    0x1.62e42fefa39efp-1,  // ln(2)^1 / 1!  = 0.6931471805599453
    0x1.ebfbdff82c58ep-3,  // ln(2)^2 / 2!  = 0.2402265069591007
    0x1.c6b08d704a0bfp-5,  // ln(2)^3 / 3!  = 0.055504108664821576
    0x1.3b2ab6fba4e77p-7,  // ln(2)^4 / 4!  = 0.009618129107628477
    0x1.5d87fe78a6730p-10,  // ln(2)^5 / 5!  = 0.0013333558146428441
    0x1.430912f86c786p-13,  // ln(2)^6 / 6!  = 0.00015403530393381606
    0x1.ffcbfc588b0c5p-17,  // ln(2)^7 / 7!  = 1.5252733804059838e-05
    0x1.62c0223a5c822p-20,  // ln(2)^8 / 8!  = 1.3215486790144305e-06
    0x1.b5253d395e7c1p-24,  // ln(2)^9 / 9!  = 1.0178086009239696e-07
    0x1.e4cf5158b8ec7p-28,  // ln(2)^10 / 10!  = 7.054911620801121e-09
    0x1.e8cac7351bb22p-32,  // ln(2)^11 / 11!  = 4.44553827187081e-10
    0x1.c3bd650fc2983p-36,  // ln(2)^12 / 12!  = 2.5678435993488196e-11
    0x1.816193166d0f7p-40,  // ln(2)^13 / 13!  = 1.3691488853904124e-12
};

template <class T>
struct Exp2Degree;
template <>
struct Exp2Degree<float> {
  static constexpr int value = 7;
};
template <>
struct Exp2Degree<double> {
  static constexpr int value = 13;
};

// Horner evaluation of 2^f for |f| <= 1/2, with the vector type's own fused multiply-add.
template <class Vec>
inline typename Vec::V exp2_reduced(typename Vec::V f) {
  using T = typename Vec::T;
  constexpr int degree = Exp2Degree<T>::value;
  typename Vec::V p = Vec::set1(static_cast<T>(kExp2Taylor[degree]));
  for (int k = degree - 1; k >= 0; --k) p = Vec::fmadd(p, f, Vec::set1(static_cast<T>(kExp2Taylor[k])));
  return p;
}

}  // namespace fusedattn::FUSEDATTN_KERNEL_NS
