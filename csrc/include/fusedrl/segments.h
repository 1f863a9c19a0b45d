// Segment (group) statistics: the per-group math shared by csrc/cpu/segments.cpp and
// csrc/cuda/segments.cu (kernels/segments.py mirrors it). Plain numbers, no torch.
//
// One group g holds n rows (n may be 0) with values x (one column at a time). The kernels walk the
// rows of a group in increasing row order, in one thread, so every sum below has a fixed order
// whatever the number of threads. Sums are kept in double (they are short and the op is
// memory-bound) and the results rounded once to the accumulation type. The formulas are those
// of fusedrl.reference.advantages.group_stats:
//   max_g = max x;  argmax = the first (lowest) row holding max_g;  second = max over the other rows
//   shifted sum  s = sum (x - max_g);  mean = max_g + s / max(n, 1)   (a zero-variance group gives
//                                        exactly mean = max_g, hence centred rewards of exactly 0)
//   var = sum (x - mean)^2 / max(n - 1, 1)
//   loo_i = max_g + (s - (x_i - max_g)) / max(n - 1, 1)
//   wmean = max_g + sum w (x - max_g) / sum w   (0 when sum w <= 0)
// Singleton groups (n = 1): kSingletonVerl gives mean = wmean = loo = 0 and var = 1 (verl);
// kSingletonZero keeps the natural mean and wmean (= x), var 0 and loo = x. An empty group gives
// zeros everywhere (max 0, second 0, argmax 0).
#pragma once

#include "fusedrl/common.h"

namespace fusedrl {

enum SingletonRule : int { kSingletonVerl = 0, kSingletonZero = 1 };

// The statistics of one group and one column, before the singleton rule.
struct SegmentMoments {
  double n = 0;      // rows
  double max = 0;    // max_g
  double shifted = 0;  // sum (x - max_g)
  double sq = 0;     // sum (x - mean)^2
  double wsum = 0;   // sum w
  double wx = 0;     // sum w (x - max_g)
};

FUSEDRL_HD double segment_mean(const SegmentMoments& s) {
  return s.max + s.shifted / (s.n > 1 ? s.n : 1.0);
}
FUSEDRL_HD double segment_var(const SegmentMoments& s) { return s.sq / (s.n - 1 > 1 ? s.n - 1 : 1.0); }
FUSEDRL_HD double segment_loo(const SegmentMoments& s, double x) {
  return s.max + (s.shifted - (x - s.max)) / (s.n - 1 > 1 ? s.n - 1 : 1.0);
}
FUSEDRL_HD double segment_wmean(const SegmentMoments& s) {
  return s.wsum > 0 ? s.max + s.wx / s.wsum : 0.0;
}

// The group-level outputs after the singleton rule.
struct SegmentResult {
  double mean, var, wmean;
};

FUSEDRL_HD SegmentResult segment_result(const SegmentMoments& s, bool has_weight, int singleton) {
  SegmentResult r;
  r.mean = segment_mean(s);
  r.var = segment_var(s);
  r.wmean = has_weight ? segment_wmean(s) : r.mean;
  if (s.n == 1) {
    if (singleton == kSingletonVerl) {
      r.mean = 0;
      r.wmean = 0;
      r.var = 1;
    } else {
      r.wmean = r.mean;
    }
  }
  return r;
}

// The leave-one-out mean of row value x after the singleton rule (groups of one: 0 or x).
FUSEDRL_HD double segment_loo_value(const SegmentMoments& s, double x, int singleton) {
  if (s.n > 1) return segment_loo(s, x);
  return singleton == kSingletonVerl ? 0.0 : x;
}

FUSEDRL_HD double max_nan(double m, double x) { return (x > m || x != x) ? x : m; }

}  // namespace fusedrl
