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

FUSEDRL_HD double load_double(const float* p) { return *p; }
FUSEDRL_HD double load_double(const double* p) { return *p; }
FUSEDRL_HD double load_double(const bf16_t* p) { return to_float(*p); }
FUSEDRL_HD double load_double(const f16_t* p) { return to_float(*p); }

// Every statistic of group g, all columns (the whole per-group kernel, run by one CPU or GPU
// thread). Args is fusedrl::SegmentArgs (csrc/cpu/segments.h): values of type T, outputs of
// type acc_t; with a.order set, the rows of g are a.order[a.offsets[g] ..], else the contiguous
// run of a.group_size rows. Per column: pass 1 the max; pass 2 the first max row, the second max
// (the max of the other rows), the shifted and weighted sums; pass 3 the squared deviations;
// pass 4 the leave-one-out means.
template <typename T, typename acc_t, typename Args>
FUSEDRL_HD void segment_group(const Args& a, int64_t g) {
  const T* v = static_cast<const T*>(a.values);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  acc_t* loo = static_cast<acc_t*>(a.loo);
  const int64_t C = a.C, rs = a.row_stride, cs = a.col_stride;
  const double inf = HUGE_VAL;
  const int64_t* rows = nullptr;
  int64_t base, n;
  if (a.order) {
    base = a.offsets[g];
    n = a.offsets[g + 1] - base;
    rows = a.order + base;
  } else {
    base = g * a.group_size;
    n = a.group_size;
  }
  static_cast<acc_t*>(a.count)[g] = acc_t(n);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = g * C + c;
    acc_t* outs[6] = {static_cast<acc_t*>(a.mean), static_cast<acc_t*>(a.var), static_cast<acc_t*>(a.std),
                      static_cast<acc_t*>(a.max), static_cast<acc_t*>(a.second), static_cast<acc_t*>(a.wmean)};
    if (n == 0) {
      for (int i = 0; i < 6; ++i) outs[i][o] = acc_t(0);
      a.argmax[o] = 0;
      continue;
    }
    const T* col = v + c * cs;
    SegmentMoments s;
    s.n = double(n);
    double m = -inf;
    for (int64_t k = 0; k < n; ++k) m = max_nan(m, load_double(col + (rows ? rows[k] : base + k) * rs));
    s.max = m;
    int64_t am = -1;
    double sec = -inf;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r = rows ? rows[k] : base + k;
      const double x = load_double(col + r * rs);
      if (am < 0 && x == m) {
        am = r;
      } else {
        sec = max_nan(sec, x);
      }
      s.shifted += x - m;
      if (w) {
        s.wsum += double(w[r]);
        s.wx += double(w[r]) * (x - m);
      }
    }
    const double mu = segment_mean(s);
    for (int64_t k = 0; k < n; ++k) {
      const double d = load_double(col + (rows ? rows[k] : base + k) * rs) - mu;
      s.sq += d * d;
    }
    const SegmentResult res = segment_result(s, w != nullptr, a.singleton);
    for (int64_t k = 0; loo && k < n; ++k) {  // loo null: not wanted
      const int64_t r = rows ? rows[k] : base + k;
      loo[r * C + c] = acc_t(segment_loo_value(s, load_double(col + r * rs), a.singleton));
    }
    outs[0][o] = acc_t(res.mean);
    outs[1][o] = acc_t(res.var);
    outs[2][o] = acc_t(sqrt(res.var));
    outs[3][o] = acc_t(m);
    outs[4][o] = acc_t(sec);
    outs[5][o] = acc_t(res.wmean);
    a.argmax[o] = am < 0 ? a.M : am;  // no row equals a NaN max (the reference's sentinel M)
  }
}

}  // namespace fusedrl
