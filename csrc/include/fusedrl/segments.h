// Segment (group) statistics: the per-group math shared by csrc/cpu/segments.cpp and
// csrc/cuda/segments.cu (python/fusedrl/kernels/segments.py mirrors it). Plain numbers, no torch.
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
#include "fusedrl/moments.h"

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
FUSEDRL_HD double segment_var(const SegmentMoments& s) { return unbiased_var(s.sq, s.n); }
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

// max(m, x), NaN once either is NaN. Two selects (maxsd, then a blend on x's NaN): no branch.
FUSEDRL_HD double max_nan(double m, double x) {
  const double t = x > m ? x : m;
  return x != x ? x : t;
}

FUSEDRL_HD double load_double(const float* p) { return *p; }
FUSEDRL_HD double load_double(const double* p) { return *p; }
FUSEDRL_HD double load_double(const bf16_t* p) { return to_float(*p); }
FUSEDRL_HD double load_double(const f16_t* p) { return to_float(*p); }

// sum over k < n of f(k) in four partial sums (k mod 4; the tail into the first), added as
// (s0 + s1) + (s2 + s3): a fixed order, so the result does not depend on the thread count, and four
// add chains instead of one long one.
template <typename F>
FUSEDRL_HD double sum4(int64_t n, const F& f) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += f(k);
    s1 += f(k + 1);
    s2 += f(k + 2);
    s3 += f(k + 3);
  }
  for (; k < n; ++k) s0 += f(k);
  return (s0 + s1) + (s2 + s3);
}

// The moments of one group's column, before the singleton rule. Reader gives the n values in row
// order: x(k) and, when has_weight, the OPO weight w(k). Branch-free passes: the max (NaN if any
// value is NaN); the shifted (and weighted) sums; the squared deviations from the mean.
template <typename Reader>
FUSEDRL_HD SegmentMoments column_moments(int64_t n, const Reader& in) {
  SegmentMoments s;
  s.n = double(n);
  double m = -HUGE_VAL;
  bool nan = false;
  for (int64_t k = 0; k < n; ++k) {
    const double x = in.x(k);
    m = x > m ? x : m;
    nan |= x != x;
  }
  m = nan ? NAN : m;
  s.max = m;
  s.shifted = sum4(n, [&](int64_t k) { return in.x(k) - m; });
  if (in.has_weight) {
    s.wsum = sum4(n, [&](int64_t k) { return in.w(k); });
    s.wx = sum4(n, [&](int64_t k) { return in.w(k) * (in.x(k) - m); });
  }
  const double mu = segment_mean(s);
  s.sq = sum4(n, [&](int64_t k) {
    const double d = in.x(k) - mu;
    return d * d;
  });
  return s;
}

// column_moments plus the position k of the first value equal to the max (-1 when the max is NaN:
// no value equals it) and the second max (the max of the other values; -inf for one value).
struct ColumnStats {
  SegmentMoments s;
  int64_t first = -1;
  double second = -HUGE_VAL;
};

// The position of the first value equal to m (the max) and the max of the other values.
template <typename Reader>
FUSEDRL_HD void column_extremes(int64_t n, const Reader& in, double m, int64_t& first, double& second) {
  first = -1;
  second = -HUGE_VAL;
  for (int64_t k = 0; k < n; ++k) {
    const double x = in.x(k);
    if (first < 0 && x == m) {
      first = k;
    } else {
      second = max_nan(second, x);
    }
  }
}

template <typename Reader>
FUSEDRL_HD ColumnStats column_stats(int64_t n, const Reader& in) {
  ColumnStats c;
  c.s = column_moments(n, in);
  column_extremes(n, in, c.s.max, c.first, c.second);
  return c;
}

// Reader of segment_group: the column col (row stride rs) of values T at rows[k] (CSR) or
// base + k (contiguous), weights acc_t (may be null).
template <typename T, typename acc_t>
struct StridedRows {
  const T* col;
  int64_t rs;
  const int64_t* rows;
  int64_t base;
  const acc_t* weight;
  bool has_weight;
  FUSEDRL_HD int64_t row(int64_t k) const { return rows ? rows[k] : base + k; }
  FUSEDRL_HD double x(int64_t k) const { return load_double(col + row(k) * rs); }
  FUSEDRL_HD double w(int64_t k) const { return double(weight[row(k)]); }
};

// Every statistic of group g, all columns (the whole per-group kernel, run by one CPU or GPU
// thread). Args is fusedrl::SegmentArgs (csrc/include/fusedrl/segments_args.h): values of type T, outputs of
// type acc_t; with a.order set, the rows of g are a.order[a.offsets[g] ..], else the contiguous
// run of a.group_size rows. Per column: column_stats, then (pass 4) the leave-one-out means.
template <typename T, typename acc_t, typename Args>
FUSEDRL_HD void segment_group(const Args& a, int64_t g) {
  const T* v = static_cast<const T*>(a.values);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  acc_t* loo = static_cast<acc_t*>(a.loo);
  const int64_t C = a.C, rs = a.row_stride, cs = a.col_stride;
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
    const StridedRows<T, acc_t> in{v + c * cs, rs, rows, rows ? 0 : base, w, w != nullptr};
    const ColumnStats st = column_stats(n, in);
    const SegmentResult res = segment_result(st.s, w != nullptr, a.singleton);
    for (int64_t k = 0; loo && k < n; ++k) {  // loo null: not wanted
      loo[in.row(k) * C + c] = acc_t(segment_loo_value(st.s, in.x(k), a.singleton));
    }
    outs[0][o] = acc_t(res.mean);
    outs[1][o] = acc_t(res.var);
    outs[2][o] = acc_t(sqrt(res.var));
    outs[3][o] = acc_t(st.s.max);
    outs[4][o] = acc_t(st.second);
    outs[5][o] = acc_t(res.wmean);
    a.argmax[o] = st.first < 0 ? a.M : in.row(st.first);  // no row equals a NaN max (the reference's sentinel M)
  }
}

// ------------------------------------------------------------------------------------------------
// Group advantages in one kernel (csrc/cpu/segments.cpp group_advantages): the estimators of
// fusedrl.reference.advantages.outcome_advantages and the multi-objective combines of
// combine_objectives / group_advantages, per row, from a group's ColumnStats.

enum GroupEstimator : int { kGrpo = 0, kRloo = 1, kCentered = 2, kPassk = 3, kGpg = 4, kOpo = 5 };
enum GroupScale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };
// kCombineNone: K = 1 column as is; kNormalizeThenSum: the estimator per column, then the
// weighted sum; the others scalarize each row first.
enum GroupCombine : int {
  kCombineNone = 0, kSumThenNormalize = 1, kNormalizeThenSum = 2, kChebyshev = 3, kMin = 4, kMeanMinusVar = 5
};
// After the estimator: nothing, verl's masked_whiten over the rows (reinforce++-baseline), or
// TRL's batch normalization (normalize_then_sum).
enum GroupFinish : int { kFinishNone = 0, kWhiten = 1, kBatchNormalize = 2 };

FUSEDRL_HD double min_nan(double m, double x) { return (x < m || x != x) ? x : m; }

// One row of K objectives r[k * cs] scalarized (w the weights, z the ideal point).
template <typename T>
FUSEDRL_HD double combine_row(int combine, const T* r, int64_t cs, int64_t K, const double* w, const double* z,
                              double var_coef) {
  if (combine == kSumThenNormalize) {
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += w[k] * load_double(r + k * cs);
    return s;
  }
  if (combine == kChebyshev) {
    double m = -HUGE_VAL;
    for (int64_t k = 0; k < K; ++k) m = max_nan(m, w[k] * fabs(z[k] - load_double(r + k * cs)));
    return -m;
  }
  if (combine == kMin) {
    double m = HUGE_VAL;
    for (int64_t k = 0; k < K; ++k) m = min_nan(m, w[k] * load_double(r + k * cs));
    return m;
  }
  if (combine == kMeanMinusVar) {
    double mean = 0, var = 0;
    for (int64_t k = 0; k < K; ++k) mean += w[k] * load_double(r + k * cs);
    mean /= double(K);
    for (int64_t k = 0; k < K; ++k) {
      const double d = w[k] * load_double(r + k * cs) - mean;
      var += d * d;
    }
    return mean - var_coef * (var / double(K));
  }
  return load_double(r);  // kCombineNone
}

// The divisor of grpo / grpo_passk: std_g + eps, the batch std + eps (given), or 1.
FUSEDRL_HD double group_denominator(int scale, const SegmentResult& res, double batch_denominator, double eps) {
  if (scale == kScaleGroup) return sqrt(res.var) + eps;
  if (scale == kScaleBatch) return batch_denominator;
  return 1.0;
}

// The advantage of value x of a group (every estimator but grpo_passk, which only the group's
// first max row receives: (max - second) * inv_denominator). inv_denominator = 1 / denominator,
// computed once per group: a multiply per row instead of a division (the division was 13% of the
// CPU kernel's samples on groups of 16; the two differ by at most a last bit of the double).
// gpg_scale = M / max(#nonzero, 1).
FUSEDRL_HD double row_advantage(int estimator, const SegmentMoments& s, const SegmentResult& res, double x,
                                double inv_denominator, double gpg_scale, int singleton) {
  switch (estimator) {
    case kGrpo: return (x - res.mean) * inv_denominator;
    case kRloo: return x - segment_loo_value(s, x, singleton);
    case kGpg: return (x - res.mean) * gpg_scale;
    case kOpo: return x - res.wmean;
    default: return x - res.mean;  // kCentered
  }
}

// The last step over all rows of y, from their moments (one group, singleton rule "zero": a single
// row gives 0): whiten (y - mean) * whiten_scale(var), or batch-normalize (y - mean) / (std + eps).
FUSEDRL_HD double finish_row(int finish, const SegmentResult& batch, double y, double eps) {
  if (finish == kWhiten) return (y - batch.mean) * whiten_scale(batch.var);
  if (finish == kBatchNormalize) return (y - batch.mean) / (sqrt(batch.var) + eps);
  return y;
}

}  // namespace fusedrl
