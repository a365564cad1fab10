// exp and expm1 of 8 floats at once on the SIMD vectors of simd.h, for x <= 88.3 (shifted
// logits: x − max, x − lse, and differences of two such values).
// exp: Cephes' expf: x = n·ln2 + r with n = round(x / ln2), |r| <= ln2 / 2, e^r by a degree-6
// polynomial, 2^n built in the exponent bits. Relative error < 2e-7; x < −87.3 (e^x below the
// smallest normal float), −inf included, gives 0; NaN gives NaN.
// expm1_small: the Taylor series to degree 8, for |x| < 0.5 (relative error < 1e-8, where
// exp(x) − 1 would lose digits).
// No library call, so both vectorize in both target clones.
#pragma once

#include <cstdint>

#include "simd.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlan::cpu {

typedef int32_t VecInt __attribute__((vector_size(32)));
typedef uint32_t VecUint __attribute__((vector_size(32)));

MLAN_ALWAYS_INLINE Vec<float> splat(float value) { return Vec<float>{} + value; }

MLAN_ALWAYS_INLINE Vec<float> exp_vec(Vec<float> x) {
  const VecInt underflow = x < splat(-87.33654f);             // also -inf; NaN compares false
  const Vec<float> clamped = x < splat(-87.33654f) ? splat(-87.33654f) : x;
  // round(clamped / ln2) by the 1.5·2^23 trick (round to nearest even, |value| < 2^22)
  const Vec<float> shifter = splat(12582912.0f);
  const Vec<float> n = (clamped * splat(1.44269504088896341f) + shifter) - shifter;
  const Vec<float> r = clamped - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  Vec<float> poly = splat(1.9875691500e-4f);
  poly = poly * r + splat(1.3981999507e-3f);
  poly = poly * r + splat(8.3334519073e-3f);
  poly = poly * r + splat(4.1665795894e-2f);
  poly = poly * r + splat(1.6666665459e-1f);
  poly = poly * r + splat(5.0000001201e-1f);
  const Vec<float> e_r = poly * (r * r) + r + splat(1.0f);
  // 2^n for −126 <= n <= 127 (NaN lanes: 2^0; the NaN of e_r wins), shifted unsigned
  const Vec<float> n_ordered = n == n ? n : splat(0.0f);          // no NaN into the conversion
  const VecInt biased = __builtin_convertvector(n_ordered, VecInt) + 127;
  const VecUint exponent = __builtin_convertvector(biased, VecUint) << 23;
  Vec<float> two_n;
  __builtin_memcpy(&two_n, &exponent, sizeof(two_n));
  const Vec<float> result = e_r * two_n;
  VecInt bits;
  __builtin_memcpy(&bits, &result, sizeof(bits));
  bits &= ~underflow;
  Vec<float> out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

// e^x − 1 for |x| < 0.5 (callers select it there): the Taylor series to degree 8.
MLAN_ALWAYS_INLINE Vec<float> expm1_small(Vec<float> x) {
  Vec<float> series = splat(1.0f / 40320.0f);
  series = series * x + splat(1.0f / 5040.0f);
  series = series * x + splat(1.0f / 720.0f);
  series = series * x + splat(1.0f / 120.0f);
  series = series * x + splat(1.0f / 24.0f);
  series = series * x + splat(1.0f / 6.0f);
  series = series * x + splat(0.5f);
  return (series * x + splat(1.0f)) * x;
}

}  // namespace mlan::cpu

#pragma GCC diagnostic pop
