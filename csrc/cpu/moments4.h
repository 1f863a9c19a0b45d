// column_moments (fusedrl/segments.h) over contiguous runs of values with GCC 4-lane vectors, in
// the header's summation order: one run (moments_run), or four runs side by side (moments_run4,
// moments_run4c). Included by csrc/cpu/group_advantages.cpp only, inlined into its ISA variants.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedrl/segments.h"

namespace fusedrl {
namespace cpu {
namespace {

// ---- column_moments over a contiguous run, 4 lanes at a time ----
// The CPU twin of column_moments (fusedrl/segments.h) for values x[0, n) read in place (and OPO
// weights w, or null): each sum is one 4-lane vector whose lane j adds the terms k = j mod 4 of
// the whole blocks of 4; the tail goes to lane 0 and the lanes are added as (0 + 1) + (2 + 3):
// sum4's order, so the result is the header's. GCC vector extensions: AVX2 / AVX-512 / SSE2
// code from one source, in each ISA variant (everything here is inlined into them).
typedef double d4 __attribute__((vector_size(32)));
typedef int64_t i4 __attribute__((vector_size(32)));


// 4-wide helpers. (d4 arguments and results: everything here is always inlined into an ISA
// variant, so -Wpsabi's ABI change of a vector passed between baseline functions never happens.)
#pragma GCC diagnostic ignored "-Wpsabi"
// 4 consecutive values as doubles; 4 doubles stored (unaligned).
template <typename T>
FUSEDRL_HD d4 load4(const T* x) {
  return d4{load_double(x), load_double(x + 1), load_double(x + 2), load_double(x + 3)};
}
FUSEDRL_HD void store4(double* y, const d4& v) { __builtin_memcpy(y, &v, sizeof(v)); }

// The 4x4 transpose of rows a, b, c, d into col[0..3].
FUSEDRL_HD void transpose4(const d4& a, const d4& b, const d4& c, const d4& d, d4* col) {
  const i4 even = {0, 4, 2, 6}, odd = {1, 5, 3, 7}, low = {0, 1, 4, 5}, high = {2, 3, 6, 7};
  const d4 t0 = __builtin_shuffle(a, b, even), t1 = __builtin_shuffle(a, b, odd);  // a0 b0 a2 b2, a1 b1 a3 b3
  const d4 t2 = __builtin_shuffle(c, d, even), t3 = __builtin_shuffle(c, d, odd);
  col[0] = __builtin_shuffle(t0, t2, low);
  col[1] = __builtin_shuffle(t1, t3, low);
  col[2] = __builtin_shuffle(t0, t2, high);
  col[3] = __builtin_shuffle(t1, t3, high);
}

// Lane j: the lanes of the j-th of a, b, c, d added as (0 + 1) + (2 + 3) (the header's order).
FUSEDRL_HD d4 lanes4(const d4& a, const d4& b, const d4& c, const d4& d) {
  d4 col[4];
  transpose4(a, b, c, d, col);
  return (col[0] + col[1]) + (col[2] + col[3]);
}
FUSEDRL_HD double lanes(const d4& v, double first) { return (first + v[1]) + (v[2] + v[3]); }

template <typename S, typename WT>
FUSEDRL_HD SegmentMoments moments_run(const S* x, const WT* w, int64_t n) {
  SegmentMoments s;
  s.n = double(n);
  const int64_t n4 = n & ~int64_t(3);
  d4 mx = {-HUGE_VAL, -HUGE_VAL, -HUGE_VAL, -HUGE_VAL};
  i4 nan4 = {0, 0, 0, 0};
  for (int64_t k = 0; k < n4; k += 4) {
    const d4 v = load4(x + k);
    mx = v > mx ? v : mx;
    nan4 |= v != v;
  }
  double m = -HUGE_VAL;
  bool nan = (nan4[0] | nan4[1] | nan4[2] | nan4[3]) != 0;
  for (int j = 0; j < 4; ++j) m = mx[j] > m ? mx[j] : m;
  for (int64_t k = n4; k < n; ++k) {
    const double v = load_double(x + k);
    m = v > m ? v : m;
    nan |= v != v;
  }
  m = nan ? NAN : m;
  s.max = m;
  d4 acc = {0, 0, 0, 0};
  for (int64_t k = 0; k < n4; k += 4) acc += load4(x + k) - m;
  double first = acc[0];
  for (int64_t k = n4; k < n; ++k) first += load_double(x + k) - m;
  s.shifted = lanes(acc, first);
  if (w) {
    d4 acc_w = {0, 0, 0, 0}, acc_wx = {0, 0, 0, 0};
    for (int64_t k = 0; k < n4; k += 4) {
      const d4 wk = load4(w + k);
      acc_w += wk;
      acc_wx += wk * (load4(x + k) - m);
    }
    double fw = acc_w[0], fwx = acc_wx[0];
    for (int64_t k = n4; k < n; ++k) {
      fw += load_double(w + k);
      fwx += load_double(w + k) * (load_double(x + k) - m);
    }
    s.wsum = lanes(acc_w, fw);
    s.wx = lanes(acc_wx, fwx);
  }
  const double mu = segment_mean(s);
  acc = d4{0, 0, 0, 0};
  for (int64_t k = 0; k < n4; k += 4) {
    const d4 d = load4(x + k) - mu;
    acc += d * d;
  }
  first = acc[0];
  for (int64_t k = n4; k < n; ++k) {
    const double d = load_double(x + k) - mu;
    first += d * d;
  }
  s.sq = lanes(acc, first);
  return s;
}

// The moments of 4 runs of n values at once (run j at x + j * stride, weights w + j * stride or
// null), lane j holding run j: each lane keeps sum4's order (4 accumulators by k mod 4, the tail
// into the first, (0 + 1) + (2 + 3)), the terms of moments_run in the same order (the compiler's
// FMA contraction may still round a last bit differently, so which path a run takes is fixed by
// its index, not by the thread count), while the 4 runs' dependency chains (max, sums, mean,
// squared deviations) run side by side instead of one after another (benchmarks/NOTES.md).
template <typename S, typename WT>
FUSEDRL_HD void moments_run4(const S* x, const WT* w, int64_t stride, int64_t n, SegmentMoments* out) {
  const S *x0 = x, *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
#define FUSEDRL_LANES(p0, p1, p2, p3, k) \
  (d4{load_double((p0) + (k)), load_double((p1) + (k)), load_double((p2) + (k)), load_double((p3) + (k))})
#define FUSEDRL_X(k) FUSEDRL_LANES(x0, x1, x2, x3, k)
// lane-wise sum4 of the d4 expression EXPR(k) into OUT (no lambda: lambdas do not inherit the ISA
// variant's target, and a vector returned from a baseline function goes through memory)
#define FUSEDRL_SUM4(OUT, EXPR)                                   \
  {                                                               \
    d4 a0 = zero, a1 = zero, a2 = zero, a3 = zero;                \
    for (int64_t k = 0; k < n4; k += 4) {                         \
      { const int64_t q = k; a0 += EXPR(q); }                     \
      { const int64_t q = k + 1; a1 += EXPR(q); }                 \
      { const int64_t q = k + 2; a2 += EXPR(q); }                 \
      { const int64_t q = k + 3; a3 += EXPR(q); }                 \
    }                                                             \
    for (int64_t q = n4; q < n; ++q) a0 += EXPR(q);               \
    OUT = (a0 + a1) + (a2 + a3);                                  \
  }
  const int64_t n4 = n & ~int64_t(3);
  const d4 zero = {0, 0, 0, 0};
  d4 mx = {-HUGE_VAL, -HUGE_VAL, -HUGE_VAL, -HUGE_VAL};
  i4 nan = {0, 0, 0, 0};
  for (int64_t k = 0; k < n; ++k) {
    const d4 v = FUSEDRL_X(k);
    mx = v > mx ? v : mx;
    nan |= v != v;
  }
  const d4 nans = {NAN, NAN, NAN, NAN};
  const d4 m = nan != 0 ? nans : mx;
  d4 shifted, wsum = zero, wx = zero, sq;
#define FUSEDRL_SHIFTED(q) (FUSEDRL_X(q) - m)
  FUSEDRL_SUM4(shifted, FUSEDRL_SHIFTED)
  if (w) {
    const WT *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride, *w3 = w + 3 * stride;
#define FUSEDRL_W(q) FUSEDRL_LANES(w0, w1, w2, w3, q)
#define FUSEDRL_WX(q) (FUSEDRL_W(q) * (FUSEDRL_X(q) - m))
    FUSEDRL_SUM4(wsum, FUSEDRL_W)
    FUSEDRL_SUM4(wx, FUSEDRL_WX)
#undef FUSEDRL_W
#undef FUSEDRL_WX
  }
  d4 mu;
  for (int j = 0; j < 4; ++j) {
    SegmentMoments& s = out[j];
    s = SegmentMoments();
    s.n = double(n);
    s.max = m[j];
    s.shifted = shifted[j];
    s.wsum = wsum[j];
    s.wx = wx[j];
    mu[j] = segment_mean(s);
  }
#define FUSEDRL_SQ(q) ((FUSEDRL_X(q) - mu) * (FUSEDRL_X(q) - mu))
  FUSEDRL_SUM4(sq, FUSEDRL_SQ)
  for (int j = 0; j < 4; ++j) out[j].sq = sq[j];
#undef FUSEDRL_SQ
#undef FUSEDRL_SHIFTED
#undef FUSEDRL_SUM4
#undef FUSEDRL_X
#undef FUSEDRL_LANES
}

// moments_run4 for n a multiple of 4 and no weights, with contiguous loads: each run's sums in
// one 4-lane accumulator (lane l adds the terms k = l mod 4) as in moments_run, the 4 runs' chains
// side by side, and the 4 accumulators' lanes added by one transpose as (0 + 1) + (2 + 3): the
// header's order. moments_run4 (lane j holds run j) gathers every value with a scalar load and an
// insert; this one loads each run's 4 values at once.
template <typename S>
FUSEDRL_HD void moments_run4c(const S* x, int64_t stride, int64_t n, SegmentMoments* out) {
  const S* run[4] = {x, x + stride, x + 2 * stride, x + 3 * stride};
  const d4 zero = {0, 0, 0, 0}, low = {-HUGE_VAL, -HUGE_VAL, -HUGE_VAL, -HUGE_VAL};
  d4 mx[4] = {low, low, low, low};
  i4 nan[4] = {};
  for (int64_t k = 0; k < n; k += 4) {
    for (int j = 0; j < 4; ++j) {
      const d4 v = load4(run[j] + k);
      mx[j] = v > mx[j] ? v : mx[j];
      nan[j] |= v != v;
    }
  }
  d4 m;
  for (int j = 0; j < 4; ++j) {  // moments_run's max
    double mj = -HUGE_VAL;
    for (int l = 0; l < 4; ++l) mj = mx[j][l] > mj ? mx[j][l] : mj;
    m[j] = (nan[j][0] | nan[j][1] | nan[j][2] | nan[j][3]) != 0 ? NAN : mj;
  }
  d4 acc[4] = {zero, zero, zero, zero};
  for (int64_t k = 0; k < n; k += 4) {
    for (int j = 0; j < 4; ++j) acc[j] += load4(run[j] + k) - m[j];
  }
  const d4 shifted = lanes4(acc[0], acc[1], acc[2], acc[3]);
  const d4 mu = m + shifted / double(n);  // segment_mean, n >= 4
  for (int j = 0; j < 4; ++j) acc[j] = zero;
  for (int64_t k = 0; k < n; k += 4) {
    for (int j = 0; j < 4; ++j) {
      const d4 d = load4(run[j] + k) - mu[j];
      acc[j] += d * d;
    }
  }
  const d4 sq = lanes4(acc[0], acc[1], acc[2], acc[3]);
  for (int j = 0; j < 4; ++j) {
    SegmentMoments& s = out[j];
    s.n = double(n);
    s.max = m[j];
    s.shifted = shifted[j];
    s.sq = sq[j];
    s.wsum = 0;
    s.wx = 0;
  }
}

// Reader of column_extremes over a contiguous run.
template <typename S>
struct Run {
  const S* v;
  FUSEDRL_HD double x(int64_t k) const { return load_double(v + k); }
};

}  // namespace
}  // namespace cpu
}  // namespace fusedrl
