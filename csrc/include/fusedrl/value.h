// Per-token math of the clipped value loss (spec: python/fusedrl/reference/value.py), shared by
// csrc/cpu/value.cpp (g++) and csrc/cuda/value.cu (nvcc); python/fusedrl/kernels/value.py (Triton)
// mirrors it. Plain C++ on plain numbers, templated on the accumulation type A (float, or double
// for float64 values).
//
//   L = sum_i g_i sum_t m_it l_it,   l = 0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)
//
// with g the per-row aggregation coefficients (python/fusedrl/ops/normalizers.py:
// row_coefficients, the one place where the kernel paths normalize). Without a clip, c = +inf
// (Options::resolve): the clip is the identity, both branches are equal and the loss is
// 0.5 (v - R)^2 with gradient v - R (the tie sends half to each branch, as torch's max).
//
// Ties follow torch's autograd: max of two equal values sends half the gradient to each; the
// clip's gradient at its bounds is 1 for torch.clamp (verl_ties false, OpenRLHF's clamp) or the
// product of min's and max's tie factors for verl's clip_by_value = max(min(v, hi), lo).
#pragma once

#include "fusedrl/common.h"

namespace fusedrl {
namespace value {

// Per-row outputs (float64 [B, kNumOutputs]): the row's share of the loss and the sums over its
// valid tokens of m, m [clipped branch strictly larger] and m v.
enum Output : int { kLoss = 0, kOutCount, kClipped, kValue, kNumOutputs };

// The kernel's options, each written once: the struct, the binding's reading (in this order,
// from python/fusedrl/ops/value.py's INT_OPTIONS / FLOAT_OPTIONS) and value_option_names().
#define FUSEDRL_VALUE_INT_OPTIONS(X)                                                                   \
  X(bool, has_clip, false)                                                                           \
  X(bool, verl_ties, false) /* the clip's gradient at its bounds as verl's clip_by_value */
#define FUSEDRL_VALUE_FLOAT_OPTIONS(X) X(double, clip, 0.0)

struct Options {
#define FUSEDRL_OPTION_MEMBER(type, name, init) type name = init;
  FUSEDRL_VALUE_INT_OPTIONS(FUSEDRL_OPTION_MEMBER)
  FUSEDRL_VALUE_FLOAT_OPTIONS(FUSEDRL_OPTION_MEMBER)
#undef FUSEDRL_OPTION_MEMBER

  // An absent clip as +inf, so the per-token math has no option test; call once after filling.
  void resolve() {
    if (!has_clip) clip = INFINITY;
  }
};

// One token: v the value, old the rollout's value, ret the return (all cleaned: 0 on padding);
// c the clip (+inf: none); ties = 1 for verl's tie convention, 0 for clamp's. Returns l; *dv =
// dl/dv, *clipped = 1 when the clipped branch is strictly larger. Branch-free (vectorizes).
template <typename A> FUSEDRL_HD A token_loss(A v, A old, A ret, A c, A ties, A* dv, A* clipped) {
  const A lo = old - c, hi = old + c;
  const A vc = clampv(v, lo, hi);
  const A mn = v < hi ? v : hi;
  const A pass = ties * (dmin_a(v, hi) * dmax_a(mn, lo)) + (A(1) - ties) * inside(v, lo, hi);
  const A d1 = v - ret, d2 = vc - ret;
  const A l1 = d1 * d1, l2 = d2 * d2;
  const A f = dmax_a(l1, l2);
  *dv = f * d1 + (A(1) - f) * d2 * pass;
  *clipped = l2 > l1 ? A(1) : A(0);
  return A(0.5) * (l1 > l2 ? l1 : l2);
}

}  // namespace value
}  // namespace fusedrl
