// exp (and log1p on [0, 1]) for the tile loops: branch-free, so that GCC and Clang vectorize the
// loops that call them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define FASTCL_INLINE inline __attribute__((always_inline))
#else
#define FASTCL_INLINE inline
#endif

namespace fastcl {

// float: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-6
// polynomial for exp(r); 2^n is built in the exponent bits. About 1 ulp on [-87.3, 88.3].
// exp(-inf) and anything below -87.3 give exactly 0 (the tiles' masked logits), anything above
// 88.3 gives inf, and NaN stays NaN.
// Always inlined: a call inside a loop would stop the loop from being vectorized.
FASTCL_INLINE float exp_f(float x) {
  const float lo = -87.3f, hi = 88.3f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Round x log2(e) to the nearest integer with the 1.5 * 2^23 trick (vectorizes; no libm).
  const float magic = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  y = x > hi ? HUGE_VALF : y;
  // NaN needs no test: both clamps keep it (comparisons with NaN are false), it survives the
  // polynomial, and NaN * scale is NaN whatever the exponent bits became.
  return y;
}

inline double exp_f(double x) { return std::exp(x); }

// log1p(e) for e in [0, 1] (SigLIP's softplus: e = exp(-|z|)), branch-free for vectorized loops.
// 1 + e = 2^k (1 + f) with k = 0, f = e (exact: 1 + e is never rounded) for e <= sqrt(2) - 1,
// else k = 1, f = (e - 1) / 2; then log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1] by Cephes'
// logf polynomial, ln 2 in two parts. About 1 ulp (measured against float64: tests/
// test_siglip_kernels.py). e = 0 gives 0; NaN stays NaN. Outside [0, 1] the result is wrong.
FASTCL_INLINE float log1p_unit(float e) {
  const bool big = e > 0.41421356f;
  const float f = big ? (e - 1.0f) * 0.5f : e;
  const float k = big ? 1.0f : 0.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = p * f * z;
  y += k * -2.12194440e-4f;
  y += -0.5f * z;
  return (f + y) + k * 0.693359375f;
}

inline double log1p_unit(double e) { return std::log1p(e); }

}  // namespace fastcl
