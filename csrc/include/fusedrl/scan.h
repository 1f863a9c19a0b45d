// Masked scans along T (GAE, discounted returns, prefix sums) and the whitening statistics: the
// per-step math, shared by the C++ CPU kernel (csrc/cpu/scan.cpp) and the CUDA kernel
// (csrc/cuda/scan.cu). The Triton kernel (python/fusedrl/kernels/scan.py) mirrors these functions.
//
// The spec is python/fusedrl/reference/advantages.py (reverse_scan, next_valid, gae,
// discounted_returns, whiten, prefix_sum). For one row, walking t = T-1 .. 0 with the carries
// c (the scanned value at the next valid token) and vn (the value at the next valid token, the
// bootstrap b past the last one):
//   valid t:    delta = (r_t + gamma vn) - v_t,  A_t = delta + (gamma lam) c,  ret_t = A_t + v_t,
//               c = A_t, vn = v_t
//   masked t:   A_t = ret_t = 0, carries unchanged (skipped, not discounted; r_t, v_t unread).
// Discounted returns are the same scan with delta = r_t and decay gamma. The prefix sum walks
// t = 0 .. T-1: s = s + x_t at valid t (out_t = s), out_t = 0 at masked t.
// Whitening (verl masked_whiten): (A - mean) / sqrt(var + 1e-8) with the mean and the unbiased
// variance over every valid token of the batch. Each row yields (n, row mean, row M2) in double
// (moments_from_shifted_sums), the rows are merged in row order (Chan et al.), so the result is
// independent of the thread split.
#pragma once

#include "fusedrl/common.h"

namespace fusedrl {

constexpr double kWhitenEps = 1e-8;  // reference WHITEN_EPS

// GAE's TD error at a valid token: (r + gamma * V_next) - V.
template <typename acc_t> FUSEDRL_HD acc_t gae_delta(acc_t r, acc_t v, acc_t v_next, acc_t gamma) {
  return (r + gamma * v_next) - v;
}

// One step of the reverse linear scan at a valid token: x + decay * carry.
template <typename acc_t> FUSEDRL_HD acc_t scan_step(acc_t x, acc_t carry, acc_t decay) {
  return x + decay * carry;
}

// Whitening statistics of a set of values: count, mean and sum of squared deviations (M2).
struct MomentState {
  double n, mean, m2;
};

FUSEDRL_HD MomentState moments_empty() {
  MomentState s;
  s.n = 0.0;
  s.mean = 0.0;
  s.m2 = 0.0;
  return s;
}

// A row's moments from sums shifted by one of its own values k: n, s1 = sum (x - k) and
// s2 = sum (x - k)^2 in double (one pass, no cancellation worth the name for fp32 data):
// mean = k + s1 / n, M2 = s2 - s1^2 / n, clamped at 0 (a NaN stays).
FUSEDRL_HD MomentState moments_from_shifted_sums(double n, double k, double s1, double s2) {
  MomentState st = moments_empty();
  if (n == 0.0) return st;
  st.n = n;
  st.mean = k + s1 / n;
  const double m2 = s2 - s1 * (s1 / n);
  st.m2 = m2 > 0.0 ? m2 : (m2 == m2 ? 0.0 : m2);
  return st;
}

// Chan et al.'s merge of two partial moment states (a first, then b: the order is fixed by the
// caller, rows in index order).
FUSEDRL_HD MomentState moments_merge(MomentState a, MomentState b) {
  if (b.n == 0.0) return a;
  if (a.n == 0.0) return b;
  MomentState r;
  r.n = a.n + b.n;
  const double d = b.mean - a.mean;
  r.mean = a.mean + d * (b.n / r.n);
  r.m2 = a.m2 + b.m2 + d * d * (a.n * b.n / r.n);
  return r;
}

// The whitening affine map x -> (x - mean) * scale from the merged statistics: the unbiased
// variance m2 / (n - 1) (0 for fewer than two values, as the reference's clamp), plus 1e-8.
FUSEDRL_HD void whiten_coeffs(MomentState s, double* mean, double* scale) {
  const double var = s.n > 1.0 ? s.m2 / (s.n - 1.0) : 0.0;
  *mean = s.mean;
  *scale = 1.0 / sqrt(var + kWhitenEps);
}

template <typename acc_t> FUSEDRL_HD acc_t whiten_value(acc_t x, acc_t mean, acc_t scale) {
  return (x - mean) * scale;
}

}  // namespace fusedrl
