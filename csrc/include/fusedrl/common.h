// Shared by csrc/cpu (g++) and csrc/cuda (nvcc): dtype codes, element conversions, and a
// branch-free exp for the CPU path. Everything here is plain C++ on plain numbers: no torch.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define FUSEDRL_HD __host__ __device__ __forceinline__
#else
#define FUSEDRL_HD inline __attribute__((always_inline))
#endif

namespace fusedrl {

// Dtype codes passed from Python (python/fusedrl/_ext.py keeps the same table).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// Storage tags for the 16-bit formats (the bits, not an arithmetic type).
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

FUSEDRL_HD float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
FUSEDRL_HD uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

// ---- loads: every kernel upcasts right after the load ----
FUSEDRL_HD float to_float(float x) { return x; }
FUSEDRL_HD double to_double(double x) { return x; }
FUSEDRL_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
FUSEDRL_HD float to_float(f16_t x) {
  // Branch-free half -> float (exact), written with selects so loops over it vectorize.
  const uint32_t h = x.bits;
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (h & 0x7fffu) << 13;
  const uint32_t e = shifted_exp & o;
  o += (127u - 15u) << 23;
  const uint32_t o_inf = o + ((128u - 16u) << 23);
  const float denorm = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
  o = (e == shifted_exp) ? o_inf : o;
  o = (e == 0) ? float_to_bits(denorm) : o;
  return bits_to_float(o | ((h & 0x8000u) << 16));
}

// ---- stores: round to nearest even ----
template <typename T> FUSEDRL_HD T from_float(float x);
template <> FUSEDRL_HD float from_float<float>(float x) { return x; }
template <> FUSEDRL_HD bf16_t from_float<bf16_t>(float x) {
  uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bf16_t r;
  r.bits = (x != x) ? uint16_t(0x7fc0u) : uint16_t(rounded);
  return r;
}
template <> FUSEDRL_HD f16_t from_float<f16_t>(float x) {
  // float -> half, round to nearest even (F. Giesen's float_to_half_fast3_rtne).
  const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t f = float_to_bits(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= f16max) {
    o = (f > f32infty) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {
    const float d = bits_to_float(f) + bits_to_float(denorm_magic_bits);
    o = uint16_t(float_to_bits(d) - denorm_magic_bits);
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += ((15u - 127u) << 23) + 0xfffu;
    f += mant_odd;
    o = uint16_t(f >> 13);
  }
  f16_t r;
  r.bits = uint16_t(o | (sign >> 16));
  return r;
}
template <> FUSEDRL_HD double from_float<double>(float x) { return x; }

// ---- the scaled logit x = z * (1/T), rounded on its own ----
// On the device __fmul_rn is never contracted into an FMA with a following subtraction, so a
// row's max and the label's x - max are formed from the same rounded numbers: the label at the
// max gives exactly x - m = 0, as in torch. (The CPU kernel gets the same guarantee for the label
// from a non-inlined call: see label_logit in csrc/cpu/logprobs.cpp.)
FUSEDRL_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FUSEDRL_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// ---- exp on the host: e^x = p(x - n ln 2) 2^n ----
// The branch-free Cody-Waite reduction and the Cephes degree-6 polynomial (about 1 ulp) of
// exp_nonpos here and exp_any (fusedrl/policy.h): the loops that call them vectorize without
// -ffast-math or libmvec. Pure functions of floats (no out-parameters), so that they stay in
// registers inside `omp simd` loops.
// n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to an integer.
FUSEDRL_HD float exp_round(float xc) {
  const float magic = 12582912.0f;
  return (xc * 1.44269504088896341f + magic) - magic;
}
// e^r for r = x - n ln 2 (ln 2 split in two for an exact product).
FUSEDRL_HD float exp_poly(float xc, float n) {
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// ---- exp of a non-positive argument ----
// All exponentials in fusedrl's log-prob kernels are of x - max <= 0 (on the host: exp_round and
// exp_poly above). Arguments below -87.3 give 0
// (the true value is below FLT_MIN and is negligible next to any sum that holds the max term);
// NaN propagates. Arguments above 0 are not expected (the result is then inexact).
FUSEDRL_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float lo = -87.3f;
  const float xc = x < lo ? lo : x;  // callers pass x <= 0 (a shift below a max)
  const float n = exp_round(xc);
  const float p = exp_poly(xc, n);
  const float scale = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  return (x < lo) ? 0.0f : p * scale;  // a NaN x gives a NaN p, hence a NaN result
#endif
}
// float64: shifts at or below -128 (the clamp of clamp_shift in logprobs.h) give exactly 0, as
// they do in float32, so a masked (-inf) logit contributes nothing in either precision.
FUSEDRL_HD double exp_nonpos(double x) { return x <= -128.0 ? 0.0 : exp(x); }

// ---- clamps and the gradients of min / max, with torch's conventions ----
template <typename A> FUSEDRL_HD A clampv(A v, A lo, A hi) { return v < lo ? lo : (v > hi ? hi : v); }
// 1 inside [lo, hi] (bounds included: torch's clamp passes the gradient there), else 0.
template <typename A> FUSEDRL_HD A inside(A v, A lo, A hi) { return (v >= lo && v <= hi) ? A(1) : A(0); }
// torch.maximum / torch.minimum: NaN when either argument is NaN (a plain `a > b ? a : b` drops
// a NaN a: the NaN semantics of the reference, where a NaN operand gives a NaN loss).
template <typename A> FUSEDRL_HD A max_nan(A a, A b) { return (a > b || a != a) ? a : b; }
template <typename A> FUSEDRL_HD A min_nan(A a, A b) { return (a < b || a != a) ? a : b; }
// d max(a, b) / da: 1, 0, or 1/2 on a tie (torch); d min(a, b) / da likewise.
template <typename A> FUSEDRL_HD A dmax_a(A a, A b) { return a > b ? A(1) : (a == b ? A(0.5) : A(0)); }
template <typename A> FUSEDRL_HD A dmin_a(A a, A b) { return a < b ? A(1) : (a == b ? A(0.5) : A(0)); }

// log and expm1 in the accumulation type, the same overload on host and device.
FUSEDRL_HD float log_acc(float x) { return logf(x); }
FUSEDRL_HD double log_acc(double x) { return log(x); }
FUSEDRL_HD float expm1_acc(float x) { return expm1f(x); }
FUSEDRL_HD double expm1_acc(double x) { return expm1(x); }
FUSEDRL_HD float sqrt_acc(float x) { return sqrtf(x); }
FUSEDRL_HD double sqrt_acc(double x) { return sqrt(x); }

}  // namespace fusedrl
