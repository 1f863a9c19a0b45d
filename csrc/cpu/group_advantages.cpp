// Group advantages on the CPU in one call, from rewards to advantages: the layout's statistics,
// every row's advantage, the combine and the batch finish, deterministic whatever the thread
// count. Runs of group_size rows (moments: csrc/cpu/moments4.h), or raw ids keyed and summed in
// row order (keys: csrc/cpu/keyed_ids.h). The per-group math is fusedrl/segments.h.
#include "fusedrl/segments_args.h"
#include "cpu/isa.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>

#include "cpu/keyed_ids.h"
#include "cpu/moments4.h"
#include "cpu/segment_scratch.h"
#include "fusedrl/segments.h"

namespace fusedrl {
namespace cpu {
namespace {

// ---- group advantages ----
// Two layouts. Runs (group_size): each group's rows are contiguous, one thread reduces a group
// with moments_run (the header's summation order). Keyed (raw ids): every row gets a dense key
// (its group), then one pass over the rows in row order adds each row into its group's sums
// (keyed_sums: shifted by a group value, so one pass gives the mean and the variance) and a
// second pass writes every row's advantage: the rows are read in order and only the per-group
// arrays are accessed at random, which beats sorting the rows into groups (a sort's random reads
// and writes of [M] arrays cost more than the whole pass). The pass runs over S slices of rows, S
// fixed by M (one per 32,768 rows, at most 8; not by the thread count: fewer, larger slices are
// faster), each slice into its own sums, combined in slice order: each group's sums are in a fixed
// order whatever the number of threads (measurements: benchmarks/NOTES.md).

// The plan of one call, read by the loops below.
struct GaPlan {
  const GroupAdvantageArgs* a;
  int64_t M, C;              // rows; columns: K for normalize_then_sum, else 1
  bool scalarize;            // combine_row per row (sum_then_normalize, chebyshev, min, mean_minus_var)
  double* X;                 // values [C, M] in row order, or null: read in place ([M], stride 1)
  double* W;                 // OPO weights [M] (with X)
  const double* batch_den;   // [C]
  const double* gpg_scale;   // [C]
  double* Y;                 // [M] advantages before the finish (not direct)
  bool direct;               // one column, no finish, not passk: advantages straight to out
  SegmentResult batch;       // of the finish
  // keyed layout: arrays [S, G, C] are per slice of rows, [G, C] combined
  int64_t G, S;              // groups (dense keys), slices
  KeySource keys;            // the dense key (group) of every row, looked up by pass 1
  int32_t* kept;             // [M] and kept there for the later passes
  double* acc;               // [S, G, 1 + 3C] the rows, the shifts, the sums of d = x - shift and of d^2
  double* mean;              // [G, C] the groups' means (C > 1)
  double *wsum, *wx;         // [S, G] OPO's sums of w and of w d, or null
  double* mx;                // [S, G] grpo_passk: the max, or null
  int64_t *ties, *first;     // [S, G] grpo_passk: rows equal to the max, the first (-1: none); or null
  double* below;             // [S, G] grpo_passk: the max of the other values
  double *gmax, *inv, *second;  // [G, C] passk's max, 1 / the denominator; [G] passk's second max
  SegmentMoments* mom;       // [G, C] (not written for C > 1 grpo, whose rows read mean and inv)
  SegmentResult* res;        // [G, C] (idem)
};

// Rows [r0, r1) gathered (scalarized, or the columns split) in row order.
template <typename T>
FUSEDRL_HD void ga_gather(const GaPlan& p, int64_t r0, int64_t r1) {
  const GroupAdvantageArgs& a = *p.a;
  const T* values = static_cast<const T*>(a.values);
  const int64_t rs = a.row_stride, cs = a.col_stride, M = p.M;
  double* X = p.X;
  if ((a.combine == kSumThenNormalize || !p.scalarize) && cs == 1 && rs >= a.K && a.K >= 4) {
    // rows of contiguous columns: 4 rows x 4 columns at a time, each row a contiguous load, then
    // transposed (the column loops below load every value of a strided column on its own: the
    // gather was 39% of the kernel at K = 4, groups of 16). The sum in combine_row's order.
    const bool sum = a.combine == kSumThenNormalize;
    const int64_t K = a.K;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      const T* q = values + r * rs;
      d4 acc = {0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {
        d4 col[4];
        transpose4(load4(q + k), load4(q + rs + k), load4(q + 2 * rs + k), load4(q + 3 * rs + k), col);
        for (int j = 0; j < 4; ++j) {
          if (sum) {
            acc += a.weights[k + j] * col[j];
          } else {
            store4(X + (k + j) * M + r, col[j]);
          }
        }
      }
      for (; k < K; ++k) {
        const d4 v = {load_double(q + k), load_double(q + rs + k), load_double(q + 2 * rs + k), load_double(q + 3 * rs + k)};
        if (sum) {
          acc += a.weights[k] * v;
        } else {
          store4(X + k * M + r, v);
        }
      }
      if (sum) store4(X + r, acc);
    }
    for (; r < r1; ++r) {
      if (sum) {
        X[r] = combine_row(a.combine, values + r * rs, cs, K, a.weights, a.ideal, a.var_coef);
      } else {
        for (int64_t k = 0; k < K; ++k) X[k * M + r] = load_double(values + r * rs + k);
      }
    }
  } else if (a.combine == kSumThenNormalize) {
    // combine_row's sum, column by column (vectorizes over rows), in blocks of 256 rows whose X
    // stays in L1 across the columns (rather than a whole column pass per column)
    for (int64_t b0 = r0; b0 < r1; b0 += 256) {
      const int64_t b1 = std::min<int64_t>(b0 + 256, r1);
      for (int64_t r = b0; r < b1; ++r) X[r] = 0.0;
      for (int64_t k = 0; k < a.K; ++k) {
        const T* col = values + k * cs;
        const double wk = a.weights[k];
        for (int64_t r = b0; r < b1; ++r) X[r] += wk * load_double(col + r * rs);
      }
    }
  } else if (p.scalarize) {
    for (int64_t r = r0; r < r1; ++r) X[r] = combine_row(a.combine, values + r * rs, cs, a.K, a.weights, a.ideal, a.var_coef);
  } else {
    for (int64_t c = 0; c < p.C; ++c) {
      const T* col = values + c * cs;
      double* xc = X + c * M;
      for (int64_t r = r0; r < r1; ++r) xc[r] = load_double(col + r * rs);
    }
  }
  if (p.W) {
    const typename Acc<T>::type* w = static_cast<const typename Acc<T>::type*>(a.weight);
    double* W = p.W;
    for (int64_t r = r0; r < r1; ++r) W[r] = double(w[r]);
  }
}

// The moments of a whole run of n values (the batch statistics and the finish), in the ISA variant.
struct MomentsJob {
  const void* x;
  SegmentMoments* out;
};

template <typename S>
FUSEDRL_HD void moments_job(const MomentsJob& j, int64_t n, int64_t) {
  *j.out = moments_run(static_cast<const S*>(j.x), static_cast<const double*>(nullptr), n);
}

// One column of one run of n >= 1 rows at [base, base + n): every row's advantage from the run's
// statistics (sm, res, inv = 1 / the denominator), to out (direct) or added to Y with the
// column's weight.
template <int E, typename acc_t, typename S>
FUSEDRL_HD void run_column(const GaPlan& p, const S* x, int64_t c, int64_t base, int64_t n, const SegmentMoments& sm,
                           const SegmentResult& res, double inv) {
  const GroupAdvantageArgs& a = *p.a;
  const double wc = a.combine == kNormalizeThenSum ? a.weights[c] : 1.0;
  if (E == kPassk) {
    int64_t first;
    double second;
    column_extremes(n, Run<S>{x}, sm.max, first, second);
    if (first >= 0) p.Y[base + first] += wc * ((sm.max - second) * inv);
    return;
  }
  const double gpg = p.gpg_scale[c];
  if (p.direct) {
    acc_t* out = static_cast<acc_t*>(a.out) + base;
    for (int64_t k = 0; k < n; ++k) out[k] = acc_t(row_advantage(E, sm, res, load_double(x + k), inv, gpg, a.singleton));
  } else {
    double* y = p.Y + base;
    for (int64_t k = 0; k < n; ++k) y[k] += wc * row_advantage(E, sm, res, load_double(x + k), inv, gpg, a.singleton);
  }
}

// Columns c of runs g .. g + count - 1 (count 4: their moments side by side; or 1). The runs loop
// takes blocks of 4 from g0 (a multiple of 4) and the last partial block one by one. The runs'
// statistics are finished (the variance, the square root, the reciprocal) for the whole block
// before its rows: 4 independent chains instead of one chain in each run's row loop.
template <int E, typename acc_t, typename S>
FUSEDRL_HD void run_block(const GaPlan& p, const S* x, int64_t c, int64_t g, int64_t count) {
  const GroupAdvantageArgs& a = *p.a;
  const int64_t n = a.group_size;
  const acc_t* w = E == kOpo ? static_cast<const acc_t*>(a.weight) + g * n : nullptr;
  union Block {  // not zeroed: the moments functions write every field
    SegmentMoments sm[4];
    Block() {}
  } b;
  SegmentMoments* sm = b.sm;
  if (count == 4 && !w && n % 4 == 0) {
    moments_run4c(x, n, n, sm);
  } else if (count == 4) {
    moments_run4(x, w, n, n, sm);
  } else {
    sm[0] = moments_run(x, w, n);
  }
  SegmentResult res[4];
  double inv[4];
  for (int64_t j = 0; j < count; ++j) {
    res[j] = segment_result(sm[j], w != nullptr, a.singleton);
    inv[j] = 1.0 / group_denominator(a.scale, res[j], p.batch_den[c], a.eps);
  }
  for (int64_t j = 0; j < count; ++j) run_column<E, acc_t>(p, x + j * n, c, (g + j) * n, n, sm[j], res[j], inv[j]);
}

template <typename T, int E>
FUSEDRL_HD void run_groups_e(const GaPlan& p, int64_t g0, int64_t g1) {
  using acc_t = typename Acc<T>::type;
  const int64_t n = p.a->group_size;
  for (int64_t g = g0; g < g1;) {
    const int64_t count = g + 4 <= g1 ? 4 : 1;
    if (!p.X) {  // one contiguous column read in place
      run_block<E, acc_t>(p, static_cast<const T*>(p.a->values) + g * n, 0, g, count);
    } else {
      for (int64_t c = 0; c < p.C; ++c) run_block<E, acc_t>(p, p.X + c * p.M + g * n, c, g, count);
    }
    g += count;
  }
}

// Runs [g0, g1): the estimator as a constant in each loop.
template <typename T>
FUSEDRL_HD void run_groups(const GaPlan& p, int64_t g0, int64_t g1) {
  switch (p.a->estimator) {
    case kGrpo: run_groups_e<T, kGrpo>(p, g0, g1); break;
    case kRloo: run_groups_e<T, kRloo>(p, g0, g1); break;
    case kGpg: run_groups_e<T, kGpg>(p, g0, g1); break;
    case kOpo: run_groups_e<T, kOpo>(p, g0, g1); break;
    case kPassk: run_groups_e<T, kPassk>(p, g0, g1); break;
    default: run_groups_e<T, kCentered>(p, g0, g1); break;
  }
}

// Rows [r0, r1) of Y finished and written out.
template <typename T>
FUSEDRL_HD void ga_finish(const GaPlan& p, int64_t r0, int64_t r1) {
  using acc_t = typename Acc<T>::type;
  acc_t* out = static_cast<acc_t*>(p.a->out);
  for (int64_t r = r0; r < r1; ++r) out[r] = acc_t(finish_row(p.a->finish, p.batch, p.Y[r], p.a->eps));
}

// The values of the keyed passes: read in place (one column: [M], stride 1; C columns: the
// rewards' row and column strides) or from X [C, M]; One: C = 1.
template <typename T, bool InPlace, bool One>
struct Cols {
  const T* v;
  const double* X;
  int64_t M, C, rs, cs;
  FUSEDRL_HD Cols(const GaPlan& p)
      : v(static_cast<const T*>(p.a->values)), X(p.X), M(p.M), C(p.C), rs(p.a->row_stride), cs(p.a->col_stride) {}
  FUSEDRL_HD int64_t cols() const { return One ? 1 : C; }
  FUSEDRL_HD double operator()(int64_t c, int64_t r) const {
    if (InPlace) return One ? load_double(v + r) : load_double(v + r * rs + c * cs);
    return X[c * M + r];
  }
};

// Rows [r0, r1) in row order with their dense keys: body(r, g); the keys are also kept [M] for
// the later passes (a sequential read there instead of two dependent loads). The keys of a block
// of 64 rows are looked up first, independent loads many in flight, before the block's
// read-modify-writes (faster than looking the key up row by row in every pass, and than a software
// prefetch of the group entry ahead: benchmarks/NOTES.md).
template <typename Id, typename Body>
FUSEDRL_HD void rows_with_keys(const Keys<Id>& key, int32_t* kept, int64_t r0, int64_t r1, const Body& body) {
  constexpr int64_t B = 64;
  int64_t kb[B];
  for (int64_t b0 = r0; b0 < r1; b0 += B) {
    const int64_t n = std::min(B, r1 - b0);
    for (int64_t j = 0; j < n; ++j) kb[j] = key(b0 + j);
    for (int64_t j = 0; j < n; ++j) kept[b0 + j] = int32_t(kb[j]);
    for (int64_t j = 0; j < n; ++j) body(b0 + j, kb[j]);
  }
}

// Pass 1 of slice s with C > 1 columns (normalize_then_sum: grpo, no weights): each row's C
// values into its group's entry {n, shift[C], s1[C], s2[C]}, 4 columns at a time; compiled for
// AVX2 and the baseline ISA (keyed_cols_avx2 / _base; the SSE2 build of the 4-wide vectors goes
// through the stack).
template <typename T, typename Id, bool InPlace>
FUSEDRL_HD void keyed_cols(const GaPlan& p, int64_t s) {
  const Cols<T, InPlace, false> x(p);
  const int64_t C = x.cols(), G = p.G, r0 = p.M * s / p.S, r1 = p.M * (s + 1) / p.S;
  const Keys<Id> key = p.keys.get<Id>();
  const int64_t width = 1 + 3 * C;
  double* acc = p.acc + s * G * width;
  rows_with_keys(key, p.kept, r0, r1, [&](int64_t r, int64_t g) {
    double* e = acc + g * width;
    double *shift = e + 1, *s1 = shift + C, *s2 = s1 + C;
    if (e[0] == 0) {
      for (int64_t c = 0; c < C; ++c) shift[c] = x(c, r);
    }
    e[0] += 1;
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) {
      const d4 d = d4{x(c, r), x(c + 1, r), x(c + 2, r), x(c + 3, r)} - load4(shift + c);
      store4(s1 + c, load4(s1 + c) + d);
      store4(s2 + c, load4(s2 + c) + d * d);
    }
    for (; c < C; ++c) {
      const double d = x(c, r) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  });
}
template <typename T, typename Id, bool InPlace>
FUSEDRL_TARGET_AVX2 void keyed_cols_avx2(const GaPlan& p, int64_t s) {
  keyed_cols<T, Id, InPlace>(p, s);
}
template <typename T, typename Id, bool InPlace>
void keyed_cols_base(const GaPlan& p, int64_t s) {
  keyed_cols<T, Id, InPlace>(p, s);
}

// Pass 1 of slice s (see keyed_pass); E: kOpo and kPassk add their sums, any other adds none.
template <typename T, typename Id, bool InPlace, bool One, int E>
void keyed_sums(const GaPlan& p, int64_t s) {
  const Cols<T, InPlace, One> x(p);
  const int64_t C = x.cols(), G = p.G, r0 = p.M * s / p.S, r1 = p.M * (s + 1) / p.S;
  const Keys<Id> key = p.keys.get<Id>();
  double* wsum = E == kOpo ? p.wsum + s * G : nullptr;
  double* wx = E == kOpo ? p.wx + s * G : nullptr;
  double* mx = E == kPassk ? p.mx + s * G : nullptr;
  const double* W = p.W;
  if constexpr (!One) {
    (isa_level() >= kIsaAvx2 ? keyed_cols_avx2<T, Id, InPlace> : keyed_cols_base<T, Id, InPlace>)(p, s);
    return;
  }
  Sums* acc = reinterpret_cast<Sums*>(p.acc) + s * G;
  rows_with_keys(key, p.kept, r0, r1, [&](int64_t r, int64_t g) {
    for (int64_t c = 0; c < C; ++c) {
      Sums& q = acc[g * C + c];
      const double v = x(c, r);
      const double sh = q.n > 0 ? q.shift : v;
      q.n += 1;
      q.shift = sh;
      const double d = v - sh;
      q.s1 += d;
      q.s2 += d * d;
      if (E == kOpo) {  // C = 1
        wsum[g] += W[r];
        wx[g] += W[r] * d;
      }
      if (E == kPassk) mx[g] = max_nan(mx[g], v);  // C = 1
    }
  });
}

// Pass 1 over slice s, one pass: per group and column the rows, a shift (the group's first value
// in the slice), the sums of d = x - shift and of d^2 (OPO: of the weights and of w d;
// grpo_passk: the max, NaN if any value is NaN). Pass 2 (grpo_passk only, after the max is
// known): the rows equal to the max, the first of them, and the max of the others.
template <typename T, typename Id, bool InPlace, bool One>
void keyed_pass(const GaPlan& p, int phase, int64_t s) {
  const Cols<T, InPlace, One> x(p);
  const int64_t G = p.G, r0 = p.M * s / p.S, r1 = p.M * (s + 1) / p.S;
  if (phase == 2) {  // grpo_passk (C = 1)
    int64_t *ties = p.ties + s * G, *first = p.first + s * G;
    double* below = p.below + s * G;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = p.kept[r];
      const double v = x(0, r);
      if (v == p.gmax[g]) {
        if (ties[g]++ == 0) first[g] = r;
      } else {
        below[g] = max_nan(below[g], v);
      }
    }
    return;
  }
  switch (p.a->estimator) {
    case kOpo: keyed_sums<T, Id, InPlace, One, kOpo>(p, s); break;
    case kPassk: keyed_sums<T, Id, InPlace, One, kPassk>(p, s); break;
    default: keyed_sums<T, Id, InPlace, One, kGrpo>(p, s); break;
  }
}

// The slices' sums of groups [g0, g1) combined in slice order (phase 1), each slice's moved to the
// shift of the group's first slice: with delta = shift_s - shift, sum d += n_s delta,
// sum d^2 += 2 delta sum_s d + n_s delta^2. The squared deviations are sum d^2 - (sum d)^2 / n,
// which loses at most log2(2n) bits to cancellation because the shift is one of the group's
// values: |d| <= range, so sum d^2 <= n range^2, while the deviations of a set holding its min
// and max sum to at least range^2 / 2. A group of equal values has d = 0 everywhere: mean =
// shift exactly, centred rewards exactly 0. The moments go to the header's SegmentMoments with
// the shift in place of the max (its mean, var, leave-one-out and weighted mean hold for any
// shift that is one of the values). Phase 2 (grpo_passk): the first row holding the max and
// the second max.
void keyed_combine(const GaPlan& p, int phase, int64_t g0, int64_t g1) {
  const GroupAdvantageArgs& a = *p.a;
  const int64_t C = p.C, G = p.G, GC = G * C, S = p.S, width = 1 + 3 * C;
  const bool cols = C > 1 && a.estimator == kGrpo;  // the row pass reads mean and inv only
  for (int64_t g = g0; g < g1; ++g) {
    if (phase == 2) {
      int64_t first = -1, ties = 0;
      double below = -HUGE_VAL;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = p.ties[s * G + g];
        if (first < 0 && t > 0) first = p.first[s * G + g];
        ties += t;
        below = max_nan(below, p.below[s * G + g]);
      }
      p.first[g] = first;  // slice 0's entry, read no more
      p.second[g] = ties >= 2 ? p.gmax[g] : below;
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = g * C + c;
      double n = 0, shift = 0, sum = 0, sq = 0, wsum = 0, wx = 0, mx = -HUGE_VAL;
      for (int64_t s = 0; s < S; ++s) {
        const SumsRef q{p.acc + (s * G + g) * width, C};
        const double ns = q.n();
        if (ns == 0) continue;
        if (n == 0) shift = q.shift(c);
        const double delta = q.shift(c) - shift, s1 = q.s1(c);
        sq += q.s2(c) + 2 * delta * s1 + ns * delta * delta;
        sum += s1 + ns * delta;
        if (p.wsum) {
          wsum += p.wsum[s * G + g];
          wx += p.wx[s * G + g] + delta * p.wsum[s * G + g];
        }
        if (p.mx) mx = max_nan(mx, p.mx[s * GC + o]);
        n += ns;
      }
      SegmentMoments sm;
      sm.n = n;
      sm.max = shift;
      sm.shifted = sum;
      sm.sq = n > 0 ? sq - sum * (sum / n) : 0.0;
      sm.wsum = wsum;
      sm.wx = wx;
      const SegmentResult res = segment_result(sm, p.wsum != nullptr, a.singleton);
      p.inv[o] = 1.0 / group_denominator(a.scale, res, p.batch_den[c], a.eps);
      if (cols) {
        p.mean[o] = res.mean;
      } else {  // (72 bytes an entry: 580 KB at 65,536 rows, K = 4, which cols does not write)
        p.mom[o] = sm;
        p.res[o] = res;
      }
      if (p.mx) p.gmax[o] = mx;
    }
  }
}

// Pass 4 over rows [r0, r1) with C > 1 columns (normalize_then_sum: grpo): row_advantage's grpo
// from the [G, C] means and 1 / denominators (contiguous per group), weighted and summed in
// column order into Y. For AVX2 and the baseline ISA, as keyed_cols.
template <typename T, bool InPlace>
FUSEDRL_HD void keyed_rows_cols(const GaPlan& p, int64_t r0, int64_t r1) {
  const Cols<T, InPlace, false> x(p);
  const int64_t C = x.cols();
  const double* w = p.a->weights;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g = p.kept[r];
    const double *mu = p.mean + g * C, *inv = p.inv + g * C;
    double y = 0;
    for (int64_t c = 0; c < C; ++c) y += w[c] * ((x(c, r) - mu[c]) * inv[c]);
    p.Y[r] = y;
  }
}
template <typename T, bool InPlace>
FUSEDRL_TARGET_AVX2 void keyed_rows_cols_avx2(const GaPlan& p, int64_t r0, int64_t r1) {
  keyed_rows_cols<T, InPlace>(p, r0, r1);
}
template <typename T, bool InPlace>
void keyed_rows_cols_base(const GaPlan& p, int64_t r0, int64_t r1) {
  keyed_rows_cols<T, InPlace>(p, r0, r1);
}

// Pass 4 over rows [r0, r1): every row's advantage (to out, or Y when not direct).
template <typename T, bool InPlace, bool One, int E>
void keyed_rows_e(const GaPlan& p, int64_t r0, int64_t r1) {
  using acc_t = typename Acc<T>::type;
  const GroupAdvantageArgs& a = *p.a;
  const Cols<T, InPlace, One> x(p);
  const int64_t C = x.cols();
  acc_t* out = static_cast<acc_t*>(a.out);
  const bool direct = p.direct;
  const int singleton = a.singleton;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g = p.kept[r];
    if (E == kPassk) {
      p.Y[r] = r == p.first[g] ? (p.gmax[g] - p.second[g]) * p.inv[g] : 0.0;
      continue;
    }
    double y = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = g * C + c;
      const double adv = row_advantage(E, p.mom[o], p.res[o], x(c, r), p.inv[o], p.gpg_scale[c], singleton);
      if (direct) {
        out[r] = acc_t(adv);
      } else {
        y += (a.combine == kNormalizeThenSum ? a.weights[c] : 1.0) * adv;
      }
    }
    if (!direct) p.Y[r] = y;
  }
}

template <typename T, bool InPlace, bool One>
void keyed_rows(const GaPlan& p, int64_t r0, int64_t r1) {
  if constexpr (!One) {
    if (p.a->estimator == kGrpo) {  // (keyed_combine's cols)
      (isa_level() >= kIsaAvx2 ? keyed_rows_cols_avx2<T, InPlace> : keyed_rows_cols_base<T, InPlace>)(p, r0, r1);
      return;
    }
  }
  switch (p.a->estimator) {
    case kGrpo: keyed_rows_e<T, InPlace, One, kGrpo>(p, r0, r1); break;
    case kRloo: keyed_rows_e<T, InPlace, One, kRloo>(p, r0, r1); break;
    case kGpg: keyed_rows_e<T, InPlace, One, kGpg>(p, r0, r1); break;
    case kOpo: keyed_rows_e<T, InPlace, One, kOpo>(p, r0, r1); break;
    case kPassk: keyed_rows_e<T, InPlace, One, kPassk>(p, r0, r1); break;
    default: keyed_rows_e<T, InPlace, One, kCentered>(p, r0, r1); break;
  }
}

// The keyed passes and their combines, run by each of cnt threads (tid) with a barrier between
// steps.
template <typename T, typename Id, bool InPlace, bool One, typename Barrier>
void keyed_all(const GaPlan& p, int64_t tid, int64_t cnt, const Barrier& barrier) {
  const int64_t S = p.S, G = p.G, width = 1 + 3 * p.C;
  // each slice's sums zeroed by the thread that adds into them (in its cache, not the caller's)
  const int64_t s0 = S * tid / cnt, s1 = S * (tid + 1) / cnt;
  std::memset(p.acc + s0 * G * width, 0, sizeof(double) * size_t((s1 - s0) * G * width));
  for (int phase = 1; phase <= (p.ties ? 2 : 1); ++phase) {
    for (int64_t s = s0; s < s1; ++s) keyed_pass<T, Id, InPlace, One>(p, phase, s);
    barrier();
    keyed_combine(p, phase, G * tid / cnt, G * (tid + 1) / cnt);
    barrier();
  }
  keyed_rows<T, InPlace, One>(p, p.M * tid / cnt, p.M * (tid + 1) / cnt);
}

template <typename T, typename Id, bool InPlace, bool One>
void keyed_run(const GaPlan& p, int nt) {
  if (nt <= 1) {
    keyed_all<T, Id, InPlace, One>(p, 0, 1, [] {});
    return;
  }
#pragma omp parallel num_threads(nt)
  keyed_all<T, Id, InPlace, One>(p, omp_get_thread_num(), omp_get_num_threads(), [] {
#pragma omp barrier
  });
}

// The keyed passes for the values' layout: one contiguous column read in place, one gathered
// column, or C columns.
template <typename T, typename Id>
void keyed_layouts(const GaPlan& p, int use) {
  if (!p.X && p.C > 1) {
    keyed_run<T, Id, true, false>(p, use);
  } else if (!p.X) {
    keyed_run<T, Id, true, true>(p, use);
  } else if (p.C == 1) {
    keyed_run<T, Id, false, true>(p, use);
  } else {
    keyed_run<T, Id, false, false>(p, use);
  }
}

using PlanFn = void (*)(const GaPlan&, int64_t, int64_t);
FUSEDRL_ISA_VARIANTS(ga_gather_f32, GaPlan, ga_gather, float)
FUSEDRL_ISA_VARIANTS(ga_gather_bf16, GaPlan, ga_gather, bf16_t)
FUSEDRL_ISA_VARIANTS(ga_gather_f16, GaPlan, ga_gather, f16_t)
FUSEDRL_ISA_VARIANTS(ga_gather_f64, GaPlan, ga_gather, double)
FUSEDRL_ISA_VARIANTS(run_groups_f32, GaPlan, run_groups, float)
FUSEDRL_ISA_VARIANTS(run_groups_bf16, GaPlan, run_groups, bf16_t)
FUSEDRL_ISA_VARIANTS(run_groups_f16, GaPlan, run_groups, f16_t)
FUSEDRL_ISA_VARIANTS(run_groups_f64, GaPlan, run_groups, double)
FUSEDRL_ISA_VARIANTS(ga_finish_f32, GaPlan, ga_finish, float)
FUSEDRL_ISA_VARIANTS(ga_finish_f64, GaPlan, ga_finish, double)
FUSEDRL_ISA_VARIANTS(moments_f32, MomentsJob, moments_job, float)
FUSEDRL_ISA_VARIANTS(moments_bf16, MomentsJob, moments_job, bf16_t)
FUSEDRL_ISA_VARIANTS(moments_f16, MomentsJob, moments_job, f16_t)
FUSEDRL_ISA_VARIANTS(moments_f64, MomentsJob, moments_job, double)
#undef FUSEDRL_ISA_VARIANTS

using MomentsFn = void (*)(const MomentsJob&, int64_t, int64_t);

// moments_run over n values of type S, through the widest ISA.
template <typename S>
SegmentMoments whole_moments(const S* x, int64_t n) {
  static const MomentsFn fn = std::is_same<S, float>::value    ? moments_f32()
                              : std::is_same<S, bf16_t>::value ? moments_bf16()
                              : std::is_same<S, f16_t>::value  ? moments_f16()
                                                               : moments_f64();
  SegmentMoments m;
  fn(MomentsJob{x, &m}, n, 0);
  return m;
}

struct GaKernels {
  PlanFn gather, groups, finish;
};

template <typename T>
GaKernels ga_kernels() {
  if (std::is_same<T, float>::value) return {ga_gather_f32(), run_groups_f32(), ga_finish_f32()};
  if (std::is_same<T, bf16_t>::value) return {ga_gather_bf16(), run_groups_bf16(), ga_finish_f32()};
  if (std::is_same<T, f16_t>::value) return {ga_gather_f16(), run_groups_f16(), ga_finish_f32()};
  return {ga_gather_f64(), run_groups_f64(), ga_finish_f64()};
}

template <typename T, typename acc_t>
int group_advantages_impl(const GroupAdvantageArgs& a) {
  const int64_t M = a.M;
  Scratch& sc = scratch();
  GaPlan p{};
  p.a = &a;
  p.M = M;
  p.C = a.combine == kNormalizeThenSum ? a.K : 1;
  p.scalarize = a.combine != kCombineNone && a.combine != kNormalizeThenSum;
  const GaKernels fn = ga_kernels<T>();
  // Threads (each output element is written by one thread from the same inputs in the same
  // order: the results do not depend on the count).
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, (M * p.C) / 16384)));
  auto parallel = [&](int64_t n, const auto& body) {
    const int use = static_cast<int>(std::min<int64_t>(nt, std::max<int64_t>(n, 1)));
    if (use <= 1) {
      body(int64_t(0), n);
      return;
    }
#pragma omp parallel num_threads(use)
    {
      const int64_t tid = omp_get_thread_num(), cnt = omp_get_num_threads();
      body(n * tid / cnt, n * (tid + 1) / cnt);
    }
  };
  // 1. the values in row order X [C, M] (scalarized unless C = K), unless one contiguous column
  //    is read in place (a separate pass: faster than gathering run by run inside the groups
  //    loop); the keyed passes read OPO's weights from W, runs read them in place
  std::vector<double>&X = sc.X, &W = sc.W, &Y = sc.Y;
  // (keyed normalize_then_sum reads the columns in place: the [C, M] doubles of X are 4x the
  // bytes of float32 rewards, and no longer fit in L2 at 65,536 rows, K = 4; not with the batch
  // scale, whose per-column moments read X)
  const bool cols_in_place = a.ids && p.C > 1 && !p.scalarize && a.scale != kScaleBatch;
  if (!cols_in_place && (p.scalarize || p.C > 1 || a.row_stride != 1 || (a.ids && a.estimator == kOpo))) {
    X.resize(p.C * M);
    W.resize(a.ids && a.estimator == kOpo ? M : 0);
    p.X = X.data();
    p.W = W.empty() ? nullptr : W.data();
    parallel(M, [&](int64_t r0, int64_t r1) { fn.gather(p, r0, r1); });
  }
  // 2. batch statistics: the batch std (scale "batch") and gpg's M / max(#nonzero, 1), per column
  std::vector<double> batch_den(p.C, 1.0), gpg_scale(p.C, 1.0);
  for (int64_t c = 0; c < p.C; ++c) {
    const double* xc = p.X ? p.X + c * M : nullptr;
    const T* vc = static_cast<const T*>(a.values);
    if (a.scale == kScaleBatch) {
      const SegmentMoments bm = xc ? whole_moments(xc, M) : whole_moments(vc, M);
      batch_den[c] = sqrt(segment_result(bm, false, a.singleton).var) + a.eps;
    }
    if (a.estimator == kGpg) {
      int64_t nz = 0;
      for (int64_t r = 0; r < M; ++r) nz += (xc ? xc[r] : load_double(vc + r)) != 0.0;
      gpg_scale[c] = double(M) / double(std::max<int64_t>(nz, 1));
    }
  }
  p.batch_den = batch_den.data();
  p.gpg_scale = gpg_scale.data();
  p.direct = p.C == 1 && a.finish == kFinishNone && a.estimator != kPassk;
  if (!p.direct) {
    if (a.ids) {
      Y.resize(M);  // the keyed row pass writes every row
    } else {
      Y.assign(M, 0.0);  // the runs add into it
    }
    p.Y = Y.data();
  }
  // 3. the groups' statistics and every row's advantage (summed over the columns with their
  //    weights for normalize_then_sum)
  if (!a.ids) {
    const int64_t G = a.group_size > 0 ? M / a.group_size : 0;
    if (a.estimator == kPassk && a.group_size == 1 && G) {
      release_if_big(sc);
      return kGroupTooSmall;
    }
    // blocks of 4 runs: a run's path (in a block of 4, or alone in the last partial block) and so
    // its rounding do not depend on the thread count
    parallel((G + 3) / 4, [&](int64_t b0, int64_t b1) { fn.groups(p, 4 * b0, std::min(4 * b1, G)); });
  } else {
    int64_t G;
    p.keys = a.ids_int32 ? make_keys(static_cast<const int32_t*>(a.ids), a.ids_stride, M, sc, nt, G)
                         : make_keys(static_cast<const int64_t*>(a.ids), a.ids_stride, M, sc, nt, G);
    const int64_t S = std::max<int64_t>(1, std::min<int64_t>(8, M / 32768));
    const size_t SG = size_t(S * G), GC = size_t(G * p.C);
    p.G = G;
    p.S = S;
    sc.kept.resize(size_t(M));  // (make_keys sized it)
    p.kept = sc.kept.data();
    sc.acc.resize(SG * size_t(1 + 3 * p.C));  // zeroed by keyed_all
    sc.mean.resize(p.C > 1 ? GC : 0);
    p.mean = sc.mean.data();
    sc.inv.resize(GC);
    sc.mom.resize(GC);
    sc.res.resize(GC);
    p.acc = sc.acc.data();
    p.inv = sc.inv.data();
    p.mom = sc.mom.data();
    p.res = sc.res.data();
    if (a.estimator == kOpo) {
      sc.wsum.assign(SG, 0.0);
      sc.wx.assign(SG, 0.0);
      p.wsum = sc.wsum.data();
      p.wx = sc.wx.data();
    }
    if (a.estimator == kPassk) {
      sc.mx.assign(SG, -HUGE_VAL);
      sc.gmax.resize(G);
      sc.ties.assign(SG, 0);
      sc.first.assign(SG, -1);
      sc.below.assign(SG, -HUGE_VAL);
      sc.second.resize(G);
      p.mx = sc.mx.data();
      p.gmax = sc.gmax.data();
      p.ties = sc.ties.data();
      p.first = sc.first.data();
      p.below = sc.below.data();
      p.second = sc.second.data();
    }
    const int use = static_cast<int>(std::min<int64_t>(nt, S));
    if (p.keys.int32) {
      keyed_layouts<T, int32_t>(p, use);
    } else {
      keyed_layouts<T, int64_t>(p, use);
    }
    if (a.estimator == kPassk) {
      for (int64_t g = 0; g < G; ++g) {
        if (p.mom[g].n < 2) {
          release_if_big(sc);
          return kGroupTooSmall;
        }
      }
    }
  }
  // 4. the batch finish, in one parallel region: the moments of Y over fixed chunks of rows (by
  //    M, not by the thread count), combined in chunk order by every thread (Chan et al.'s
  //    pairwise update of the mean and the squared deviations), then the rows: no thread waits
  //    between two regions while one takes the moments.
  if (!p.direct) {
    const bool stats = a.finish != kFinishNone;
    constexpr int64_t kChunk = 8192;
    const int64_t NC = stats ? (M + kChunk - 1) / kChunk : 0;
    std::vector<SegmentMoments> part(static_cast<size_t>(NC));
    auto finish = [&](int64_t tid, int64_t cnt, const auto& barrier) {
      for (int64_t k = NC * tid / cnt; k < NC * (tid + 1) / cnt; ++k) {
        part[size_t(k)] = whole_moments(p.Y + k * kChunk, std::min(kChunk, M - k * kChunk));
      }
      GaPlan q = p;
      q.batch = SegmentResult{0, 0, 0};
      if (NC) {
        barrier();
        double n = 0, mean = 0, sq = 0;
        for (int64_t k = 0; k < NC; ++k) {
          const SegmentMoments& m = part[size_t(k)];
          const double nk = m.n, tot = n + nk, delta = segment_mean(m) - mean;
          mean += delta * (nk / tot);
          sq += m.sq + delta * delta * (n * nk / tot);
          n = tot;
        }
        SegmentMoments bm;
        bm.n = n;
        bm.max = mean;  // the mean as the shift: shifted = 0
        bm.sq = sq;
        q.batch = segment_result(bm, false, kSingletonZero);
      }
      fn.finish(q, M * tid / cnt, M * (tid + 1) / cnt);
    };
    const int use = static_cast<int>(std::min<int64_t>(nt, std::max<int64_t>(M / 8192, 1)));
    if (use <= 1) {
      finish(0, 1, [] {});
    } else {
#pragma omp parallel num_threads(use)
      finish(omp_get_thread_num(), omp_get_num_threads(), [] {
#pragma omp barrier
      });
    }
  }
  release_if_big(sc);
  return kGroupOk;
}

}  // namespace

int group_advantages(const GroupAdvantageArgs& a) {
  switch (a.dtype) {
    case kFloat32: return group_advantages_impl<float, float>(a);
    case kBFloat16: return group_advantages_impl<bf16_t, float>(a);
    case kFloat16: return group_advantages_impl<f16_t, float>(a);
    case kFloat64: return group_advantages_impl<double, double>(a);
    default: return kGroupBadDtype;
  }
}


}  // namespace cpu
}  // namespace fusedrl
