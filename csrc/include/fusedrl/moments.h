// Moments of a set of values, written once for every kernel that finishes a mean / variance:
// the group statistics (fusedrl/segments.h), the batch whitening of GAE and the reinforce++
// baseline (fusedrl/scan.h, segments.h finish_row). python/fusedrl/kernels/moments.py is the
// Triton twin; python/fusedrl/reference/advantages.py the spec.
#pragma once

#include "fusedrl/common.h"

namespace fusedrl {

// verl masked_whiten's epsilon: (x - mean) * rsqrt(var + eps) (reference WHITEN_EPS).
constexpr double kWhitenEps = 1e-8;

// The unbiased variance m2 / (n - 1) of n values with sum of squared deviations m2; 0 for fewer
// than two values (the reference's clamp; groups of one take the singleton rule), NaN kept.
FUSEDRL_HD double unbiased_var(double m2, double n) { return n > 1.0 ? m2 / (n - 1.0) : (m2 == m2 ? 0.0 : m2); }

// The whitening scale 1 / sqrt(var + eps).
FUSEDRL_HD double whiten_scale(double var) { return 1.0 / sqrt(var + kWhitenEps); }

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

// The whitening affine map x -> (x - mean) * scale from the merged statistics.
FUSEDRL_HD void whiten_coeffs(MomentState s, double* mean, double* scale) {
  *mean = s.mean;
  *scale = whiten_scale(unbiased_var(s.m2, s.n));
}

}  // namespace fusedrl
