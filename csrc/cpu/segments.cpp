// Segment (group) statistics on the CPU. Dense group ids are first sorted into a CSR layout by a
// stable counting sort (rows of a group in increasing row order); contiguous fixed-size groups
// need none. Groups are then spread over OpenMP threads, each group reduced sequentially by one
// thread, so the results do not depend on the thread count. The per-group math is
// fusedrl/segments.h, shared with the CUDA kernel.
#include "cpu/segments.h"
#include "cpu/isa.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>

#include "fusedrl/segments.h"

namespace fusedrl {
namespace cpu {
namespace {

// Host scratch reused across calls by each calling thread: a fresh multi-page std::vector costs a
// page fault per 4 KiB on first touch (measured here: a 65,536-row group_advantages call went from
// 1.17 to 1.07 ms, 1 thread). Kept while its capacity is at most kKeepBytes, released after a
// bigger call.
struct Scratch {
  std::vector<int64_t> slot, table, keys, vals, offsets, order, next;
  std::vector<double> X, W, Y;
  size_t bytes() const {
    return 8 * (slot.capacity() + table.capacity() + keys.capacity() + vals.capacity() + offsets.capacity() +
                order.capacity() + next.capacity() + X.capacity() + W.capacity() + Y.capacity());
  }
};
constexpr size_t kKeepBytes = size_t(64) << 20;

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

void release_if_big(Scratch& s) {
  if (s.bytes() > kKeepBytes) s = Scratch();
}

// The CSR layout of dense ids in [0, G): rows of group g at order[offsets[g] ..], in row order
// (a stable counting sort).
template <typename Id>
void csr(const Id* index, int64_t M, int64_t G, Scratch& s) {
  s.offsets.assign(G + 1, 0);
  s.order.resize(M > 0 ? M : 1);
  for (int64_t r = 0; r < M; ++r) ++s.offsets[index[r] + 1];
  for (int64_t g = 0; g < G; ++g) s.offsets[g + 1] += s.offsets[g];
  s.next.assign(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t r = 0; r < M; ++r) s.order[s.next[index[r]]++] = r;
}

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T>
void group_rows(const SegmentArgs& a, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) segment_group<T, typename Acc<T>::type>(a, g);
}

using GroupsFn = void (*)(const SegmentArgs&, int64_t, int64_t);

FUSEDRL_ISA_VARIANTS(groups_f32, SegmentArgs, group_rows, float)
FUSEDRL_ISA_VARIANTS(groups_bf16, SegmentArgs, group_rows, bf16_t)
FUSEDRL_ISA_VARIANTS(groups_f16, SegmentArgs, group_rows, f16_t)
FUSEDRL_ISA_VARIANTS(groups_f64, SegmentArgs, group_rows, double)
#undef FUSEDRL_ISA_VARIANTS

const GroupsFn kGroups[4] = {groups_f32(), groups_bf16(), groups_f16(), groups_f64()};

}  // namespace

bool segment_stats(const SegmentArgs& in) {
  if (in.dtype < 0 || in.dtype > 3) return false;
  const GroupsFn fn = kGroups[in.dtype];
  SegmentArgs a = in;
  const int64_t G = a.G, M = a.M;
  if (G <= 0) return true;
  Scratch& sc = scratch();
  if (a.index) {
    csr(a.index, M, G, sc);
    a.offsets = sc.offsets.data();
    a.order = sc.order.data();
  }
  // The split only decides which thread reduces which group: the results do not depend on it.
  const int64_t work = M * (a.C > 0 ? a.C : 1);
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work / 8192));
  const int nt = static_cast<int>(std::min<int64_t>(want, G));
  if (nt == 1) {
    fn(a, 0, G);
  } else {
#pragma omp parallel num_threads(nt)
    {
      const int64_t tid = omp_get_thread_num(), cnt = omp_get_num_threads();
      fn(a, G * tid / cnt, G * (tid + 1) / cnt);
    }
  }
  release_if_big(sc);
  return true;
}

// ------------------------------------------------------------------------------------------------
// Group advantages in one call: densify the ids, gather the (scalarized) rewards into group order,
// per group the column statistics and every row's advantage, then the batch finish. Everything
// after the densify is a function of the groups' rows in row order, so the result is the same
// under any thread count.

namespace {

// Group number (by first appearance) of every row of raw ids; returns G.
template <typename I>
int64_t densify(const I* ids, int64_t stride, int64_t M, Scratch& sc) {
  std::vector<int64_t>& slot = sc.slot;
  slot.resize(M);
  if (M == 0) return 0;
  int64_t lo = int64_t(ids[0]), hi = lo;
  for (int64_t r = 1; r < M; ++r) {
    const int64_t v = int64_t(ids[r * stride]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  int64_t G = 0;
  const uint64_t range = uint64_t(hi) - uint64_t(lo);  // no overflow for any int64 pair
  if (range < uint64_t(4 * M + 1024)) {  // a direct table
    std::vector<int64_t>& table = sc.table;
    table.assign(range + 1, -1);
    for (int64_t r = 0; r < M; ++r) {
      int64_t& t = table[uint64_t(int64_t(ids[r * stride])) - uint64_t(lo)];
      if (t < 0) t = G++;
      slot[r] = t;
    }
    return G;
  }
  // open addressing, linear probing, at most half full
  int bits = 4;
  while ((int64_t(1) << bits) < 2 * M) ++bits;
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  std::vector<int64_t>&keys = sc.keys, &vals = sc.vals;
  keys.resize(mask + 1);
  vals.assign(mask + 1, -1);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t v = int64_t(ids[r * stride]);
    uint64_t h = (uint64_t(v) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
    while (vals[h] >= 0 && keys[h] != v) h = (h + 1) & mask;
    if (vals[h] < 0) {
      keys[h] = v;
      vals[h] = G++;
    }
    slot[r] = vals[h];
  }
  return G;
}

// Reader over a contiguous run of doubles (the gathered rewards of one group).
struct DoubleRun {
  const double* v;
  const double* weight;
  bool has_weight;
  double x(int64_t k) const { return v[k]; }
  double w(int64_t k) const { return weight[k]; }
};

SegmentResult batch_result(const double* v, int64_t M, int singleton) {
  return segment_result(column_moments(M, DoubleRun{v, nullptr, false}), false, singleton);
}

template <typename T, typename acc_t>
int group_advantages_impl(const GroupAdvantageArgs& a) {
  const int64_t M = a.M, K = a.K;
  const T* R = static_cast<const T*>(a.values);
  const int64_t C = a.combine == kNormalizeThenSum ? K : 1;
  // 1. the group layout: CSR (rows of group g at order[offsets[g] ..], in row order) or runs
  Scratch& sc = scratch();
  const std::vector<int64_t>& offsets = sc.offsets;
  int64_t G;
  if (a.ids) {
    G = a.ids_int32 ? densify(static_cast<const int32_t*>(a.ids), a.ids_stride, M, sc)
                    : densify(static_cast<const int64_t*>(a.ids), a.ids_stride, M, sc);
    csr(sc.slot.data(), M, G, sc);
  } else {
    G = a.group_size > 0 ? M / a.group_size : 0;
  }
  const int64_t* ord = a.ids ? sc.order.data() : nullptr;
  auto group_of = [&](int64_t g, int64_t& base, int64_t& n) {
    base = ord ? offsets[g] : g * a.group_size;
    n = ord ? offsets[g + 1] - base : a.group_size;
  };
  if (a.estimator == kPassk) {
    for (int64_t g = 0; g < G; ++g) {
      int64_t base, n;
      group_of(g, base, n);
      if (n < 2) {
        release_if_big(sc);
        return kGroupTooSmall;
      }
    }
  }
  // 2. the rewards in group order, X[c * M + p] for the p-th row of the layout (scalarized unless
  //    C = K), when the rows must be gathered (ids) or scalarized (a combine); contiguous groups of
  //    one column per objective are read in place.
  std::vector<double>&X = sc.X, &W = sc.W, &Y = sc.Y;
  const bool scalarize = a.combine != kCombineNone && a.combine != kNormalizeThenSum;
  const bool gathered = ord != nullptr || scalarize;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  X.resize(gathered ? C * M : 0);
  W.resize(gathered && a.estimator == kOpo ? M : 0);
  // Threads for the gather and the groups (each output element is written by one thread from
  // the same inputs in the same order: the results do not depend on the count).
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(a.num_threads, (M * C) / 16384));
  const int nt = static_cast<int>(std::min<int64_t>(want, std::max<int64_t>(G, 1)));
  auto parallel = [&](int64_t n, const auto& body) {
    if (nt <= 1) {
      body(int64_t(0), n);
      return;
    }
#pragma omp parallel num_threads(nt)
    {
      const int64_t tid = omp_get_thread_num(), cnt = omp_get_num_threads();
      body(n * tid / cnt, n * (tid + 1) / cnt);
    }
  };
  auto gather = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = ord ? ord[p] : p;
      const T* row = R + r * a.row_stride;
      if (scalarize) {
        X[p] = combine_row(a.combine, row, a.col_stride, K, a.weights, a.ideal, a.var_coef);
      } else {
        for (int64_t c = 0; c < C; ++c) X[c * M + p] = load_double(row + c * a.col_stride);
      }
      if (!W.empty()) W[p] = double(weight[r]);
    }
  };
  if (gathered) parallel(M, gather);
  // The reader of column c over layout rows [base, base + n).
  const bool has_w = a.estimator == kOpo;
  auto run_of = [&](int64_t c, int64_t base) {
    return DoubleRun{X.data() + c * M + base, W.empty() ? nullptr : W.data() + base, has_w};
  };
  auto rows_of = [&](int64_t c, int64_t base) {
    return StridedRows<T, acc_t>{R + c * a.col_stride, a.row_stride, nullptr, base, weight, has_w};
  };
  // 3. batch statistics: the batch std (scale "batch") and gpg's M / max(#nonzero, 1), per column
  std::vector<double> batch_den(C, 1.0), gpg_scale(C, 1.0);
  auto batch_stats = [&](int64_t c, const auto& in) {
    if (a.scale == kScaleBatch) {
      batch_den[c] = sqrt(segment_result(column_moments(M, in), false, a.singleton).var) + a.eps;
    }
    if (a.estimator == kGpg) {
      int64_t nz = 0;
      for (int64_t p = 0; p < M; ++p) nz += in.x(p) != 0.0;
      gpg_scale[c] = double(M) / double(std::max<int64_t>(nz, 1));
    }
  };
  for (int64_t c = 0; c < C; ++c) {
    if (gathered) {
      batch_stats(c, DoubleRun{X.data() + c * M, nullptr, false});
    } else {
      batch_stats(c, StridedRows<T, acc_t>{R + c * a.col_stride, a.row_stride, nullptr, 0, nullptr, false});
    }
  }
  // 4. per group: the statistics of each column and every row's advantage (summed over the
  //    columns with their weights for normalize_then_sum), in group order. One column and no
  //    batch finish: each row's advantage goes straight to out (no Y, no last pass).
  acc_t* out = static_cast<acc_t*>(a.out);
  const bool direct = C == 1 && a.finish == kFinishNone && a.estimator != kPassk;
  if (!direct) Y.assign(M, 0.0);
  auto column = [&](const auto& in, int64_t c, int64_t base, int64_t n) {
    const double wc = a.combine == kNormalizeThenSum ? a.weights[c] : 1.0;
    double* y = direct ? nullptr : Y.data() + base;
    if (a.estimator == kPassk) {
      const ColumnStats st = column_stats(n, in);
      const SegmentResult res = segment_result(st.s, false, a.singleton);
      const double den = group_denominator(a.scale, res, batch_den[c], a.eps);
      if (st.first >= 0) y[st.first] += wc * ((st.s.max - st.second) / den);
      return;
    }
    const SegmentMoments sm = column_moments(n, in);
    const SegmentResult res = segment_result(sm, has_w, a.singleton);
    const double den = group_denominator(a.scale, res, batch_den[c], a.eps);
    // the estimator as a constant in each loop (no switch per row)
    auto rows = [&](auto est) {
      constexpr int e = decltype(est)::value;
      if (direct && !ord) {
        for (int64_t k = 0; k < n; ++k) out[base + k] = acc_t(row_advantage(e, sm, res, in.x(k), den, gpg_scale[c], a.singleton));
      } else if (direct) {
        for (int64_t k = 0; k < n; ++k) out[ord[base + k]] = acc_t(row_advantage(e, sm, res, in.x(k), den, gpg_scale[c], a.singleton));
      } else {
        for (int64_t k = 0; k < n; ++k) y[k] += wc * row_advantage(e, sm, res, in.x(k), den, gpg_scale[c], a.singleton);
      }
    };
    switch (a.estimator) {
      case kGrpo: rows(std::integral_constant<int, kGrpo>()); break;
      case kRloo: rows(std::integral_constant<int, kRloo>()); break;
      case kGpg: rows(std::integral_constant<int, kGpg>()); break;
      case kOpo: rows(std::integral_constant<int, kOpo>()); break;
      default: rows(std::integral_constant<int, kCentered>()); break;
    }
  };
  auto groups = [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      int64_t base, n;
      group_of(g, base, n);
      if (n == 0) continue;
      for (int64_t c = 0; c < C; ++c) {
        if (gathered) {
          column(run_of(c, base), c, base, n);
        } else {
          column(rows_of(c, base), c, base, n);
        }
      }
    }
  };
  parallel(G, groups);
  // 5. the batch finish, and the rows back to row order
  if (!direct) {
    SegmentResult batch{0, 0, 0};
    if (a.finish != kFinishNone) batch = batch_result(Y.data(), M, kSingletonZero);
    for (int64_t p = 0; p < M; ++p) out[ord ? ord[p] : p] = acc_t(finish_row(a.finish, batch, Y[p], a.eps));
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
