// A [rows, tokens] operand of the policy and value kernels (csrc/cpu/policy.cpp, value.cpp,
// csrc/cuda/policy.cu, value.cu) and its typed loads and stores, written once: element access
// (host and device) and the CPU kernels' tile access (a row's tokens [t0, t0 + n) into an
// accumulation-type buffer; vectorized for unit token stride).
#pragma once

#include <cstdint>

#include "fusedrl/common.h"

namespace fusedrl {

namespace operand {
// Mask element codes beyond the float DType codes 0-3 (python/fusedrl/ops/policy.py MASK_CODES).
enum MaskCode : int { kMaskByte = 4, kMaskInt32 = 5, kMaskInt64 = 6 };
}  // namespace operand

// A [rows, tokens] operand: element (i, t) of row i is at p + s_row * i + s_tok * (start_i + t),
// start_i = cu_seqlens[i] in the packed layout, 0 in the padded one. A per-sequence tensor [B] has
// s_tok = 0. dtype: a fusedrl::DType code, or an operand::MaskCode for the mask. p null: absent.
struct View {
  const void* p = nullptr;
  int dtype = 0;
  int64_t s_row = 0, s_tok = 0;
};

// Conversions to the accumulation type: bf16 / fp16 / uint8 / int32 via float, int64 via double.
FUSEDRL_HD float up(float x) { return x; }
FUSEDRL_HD double up(double x) { return x; }
FUSEDRL_HD float up(bf16_t x) { return to_float(x); }
FUSEDRL_HD float up(f16_t x) { return to_float(x); }
FUSEDRL_HD float up(uint8_t x) { return float(x); }
FUSEDRL_HD float up(int32_t x) { return float(x); }
FUSEDRL_HD double up(int64_t x) { return double(x); }

template <typename S> FUSEDRL_HD S ld(const void* p, int64_t off) { return static_cast<const S*>(p)[off]; }

// Element (i, pos) of v, pos = start_i + t.
template <typename A> FUSEDRL_HD A load_elem(const View& v, int64_t i, int64_t pos) {
  const int64_t off = v.s_row * i + v.s_tok * pos;
  switch (v.dtype) {
    case kFloat32: return A(up(ld<float>(v.p, off)));
    case kBFloat16: return A(up(ld<bf16_t>(v.p, off)));
    case kFloat16: return A(up(ld<f16_t>(v.p, off)));
    case kFloat64: return A(up(ld<double>(v.p, off)));
    case operand::kMaskByte: return A(up(ld<uint8_t>(v.p, off)));
    case operand::kMaskInt32: return A(up(ld<int32_t>(v.p, off)));
    default: return A(up(ld<int64_t>(v.p, off)));
  }
}

template <typename A> FUSEDRL_HD void store_elem(const View& v, int64_t i, int64_t pos, A x) {
  const int64_t off = v.s_row * i + v.s_tok * pos;
  void* p = const_cast<void*>(v.p);
  switch (v.dtype) {
    case kFloat32: static_cast<float*>(p)[off] = float(x); break;
    case kBFloat16: static_cast<bf16_t*>(p)[off] = from_float<bf16_t>(float(x)); break;
    case kFloat16: static_cast<f16_t*>(p)[off] = from_float<f16_t>(float(x)); break;
    default: static_cast<double*>(p)[off] = double(x); break;
  }
}

#if !defined(__CUDACC__)
template <typename S, typename A> FUSEDRL_HD void load_as(const S* p, int64_t s, int64_t n, A* out) {
  if (s == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = A(up(p[j]));
  } else if (s == 0) {  // a per-row value (per-sequence advantages)
    const A v = A(up(p[0]));
    for (int64_t j = 0; j < n; ++j) out[j] = v;
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = A(up(p[j * s]));
  }
}

// Tile [t0, t0 + n) of row i of v, converted to A.
template <typename A> FUSEDRL_HD void load(const View& v, int64_t i, int64_t start, int64_t t0, int64_t n, A* out) {
  const int64_t off = v.s_row * i + v.s_tok * (start + t0);
  switch (v.dtype) {
    case kFloat32: load_as(static_cast<const float*>(v.p) + off, v.s_tok, n, out); break;
    case kBFloat16: load_as(static_cast<const bf16_t*>(v.p) + off, v.s_tok, n, out); break;
    case kFloat16: load_as(static_cast<const f16_t*>(v.p) + off, v.s_tok, n, out); break;
    case kFloat64: load_as(static_cast<const double*>(v.p) + off, v.s_tok, n, out); break;
    case operand::kMaskByte: load_as(static_cast<const uint8_t*>(v.p) + off, v.s_tok, n, out); break;
    case operand::kMaskInt32: load_as(static_cast<const int32_t*>(v.p) + off, v.s_tok, n, out); break;
    default: load_as(static_cast<const int64_t*>(v.p) + off, v.s_tok, n, out); break;
  }
}

template <typename D, typename A> FUSEDRL_HD void store_as(D* p, int64_t s, int64_t n, const A* in) {
  if (s == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) p[j] = from_float<D>(float(in[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) p[j * s] = from_float<D>(float(in[j]));
  }
}
template <typename A> FUSEDRL_HD void store_as(double* p, int64_t s, int64_t n, const A* in) {
  for (int64_t j = 0; j < n; ++j) p[j * s] = double(in[j]);
}

template <typename A> FUSEDRL_HD void store(const View& v, int64_t i, int64_t start, int64_t t0, int64_t n, const A* in) {
  const int64_t off = v.s_row * i + v.s_tok * (start + t0);
  void* p = const_cast<void*>(v.p);
  switch (v.dtype) {
    case kFloat32: store_as(static_cast<float*>(p) + off, v.s_tok, n, in); break;
    case kBFloat16: store_as(static_cast<bf16_t*>(p) + off, v.s_tok, n, in); break;
    case kFloat16: store_as(static_cast<f16_t*>(p) + off, v.s_tok, n, in); break;
    default: store_as(static_cast<double*>(p) + off, v.s_tok, n, in); break;
  }
}

#endif  // !defined(__CUDACC__)

}  // namespace fusedrl
