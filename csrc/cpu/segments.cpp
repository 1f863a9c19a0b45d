// Segment (group) statistics on the CPU. Dense group ids are first sorted into a CSR layout by a
// stable counting sort (rows of a group in increasing row order); contiguous fixed-size groups
// need none. Groups are then spread over OpenMP threads, each group reduced sequentially by one
// thread, so the results do not depend on the thread count. The per-group math is
// fusedrl/segments.h, shared with the CUDA kernel.
#include "cpu/segments.h"
#include "cpu/isa.h"

#include <algorithm>
#include <limits>
#include <vector>
#include <omp.h>

#include "fusedrl/segments.h"

namespace fusedrl {
namespace cpu {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

inline double load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline double load(const bf16_t* p) { return to_float(*p); }
inline double load(const f16_t* p) { return to_float(*p); }

template <typename T>
void group_rows(const SegmentArgs& a, int64_t g0, int64_t g1) {
  using acc_t = typename Acc<T>::type;
  const T* v = static_cast<const T*>(a.values);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  acc_t* count = static_cast<acc_t*>(a.count);
  acc_t* mean = static_cast<acc_t*>(a.mean);
  acc_t* var = static_cast<acc_t*>(a.var);
  acc_t* sd = static_cast<acc_t*>(a.std);
  acc_t* loo = static_cast<acc_t*>(a.loo);
  acc_t* gmax = static_cast<acc_t*>(a.max);
  acc_t* second = static_cast<acc_t*>(a.second);
  acc_t* wmean = static_cast<acc_t*>(a.wmean);
  const int64_t C = a.C, rs = a.row_stride, cs = a.col_stride;
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t g = g0; g < g1; ++g) {
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
    count[g] = acc_t(n);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = g * C + c;
      if (n == 0) {
        mean[o] = var[o] = sd[o] = gmax[o] = second[o] = wmean[o] = 0;
        a.argmax[o] = 0;
        continue;
      }
      const T* col = v + c * cs;
      SegmentMoments s;
      s.n = double(n);
      double m = -inf;
      for (int64_t k = 0; k < n; ++k) m = max_nan(m, load(col + (rows ? rows[k] : base + k) * rs));
      s.max = m;
      int64_t am = -1;
      double sec = -inf;
      for (int64_t k = 0; k < n; ++k) {
        const int64_t r = rows ? rows[k] : base + k;
        const double x = load(col + r * rs);
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
        const double d = load(col + (rows ? rows[k] : base + k) * rs) - mu;
        s.sq += d * d;
      }
      const SegmentResult res = segment_result(s, w != nullptr, a.singleton);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t r = rows ? rows[k] : base + k;
        loo[r * C + c] = acc_t(segment_loo_value(s, load(col + r * rs), a.singleton));
      }
      mean[o] = acc_t(res.mean);
      var[o] = acc_t(res.var);
      sd[o] = acc_t(std::sqrt(res.var));
      gmax[o] = acc_t(m);
      second[o] = acc_t(sec);
      wmean[o] = acc_t(res.wmean);
      a.argmax[o] = am < 0 ? a.M : am;  // no row equals a NaN max (the reference's sentinel M)
    }
  }
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
  std::vector<int64_t> offsets, order;
  if (a.index) {
    // stable counting sort of the rows by group id: the CSR layout
    offsets.assign(G + 1, 0);
    order.resize(M > 0 ? M : 1);
    for (int64_t r = 0; r < M; ++r) ++offsets[a.index[r] + 1];
    for (int64_t g = 0; g < G; ++g) offsets[g + 1] += offsets[g];
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t r = 0; r < M; ++r) order[next[a.index[r]]++] = r;
    a.offsets = offsets.data();
    a.order = order.data();
  }
  // The split only decides which thread reduces which group: the results do not depend on it.
  const int64_t work = M * (a.C > 0 ? a.C : 1);
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work / 8192));
  const int nt = static_cast<int>(std::min<int64_t>(want, G));
  if (nt == 1) {
    fn(a, 0, G);
    return true;
  }
#pragma omp parallel num_threads(nt)
  {
    const int64_t tid = omp_get_thread_num(), cnt = omp_get_num_threads();
    fn(a, G * tid / cnt, G * (tid + 1) / cnt);
  }
  return true;
}

}  // namespace cpu
}  // namespace fusedrl
