// Segment (group) statistics on the CPU. Dense group ids are first sorted into a CSR layout by a
// stable counting sort (rows of a group in increasing row order); contiguous fixed-size groups
// need none. Groups are then spread over OpenMP threads, each group reduced sequentially by one
// thread, so the results do not depend on the thread count. The per-group math is
// fusedrl/segments.h, shared with the CUDA kernel. group_advantages (the second half) is one call
// from rewards to advantages: runs of group_size rows, or raw ids keyed and summed in row order.
#include "fusedrl/segments_args.h"
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

// group_advantages' sums of one group over a slice of rows (keyed layout), C columns: the rows,
// then per column the shift (the group's first value), the sums of d = x - shift and of d^2, as
// 1 + 3C doubles {n, shift[C], s1[C], s2[C]} (one entry per group: a row's C columns update
// side by side; C = 1 is Sums).
struct Sums {
  double n, shift, s1, s2;
};
struct SumsRef {
  const double* e;
  int64_t C;
  FUSEDRL_HD double n() const { return e[0]; }
  FUSEDRL_HD double shift(int64_t c) const { return e[1 + c]; }
  FUSEDRL_HD double s1(int64_t c) const { return e[1 + C + c]; }
  FUSEDRL_HD double s2(int64_t c) const { return e[1 + 2 * C + c]; }
};

// Host scratch reused across calls by each calling thread: a fresh multi-page std::vector costs a
// page fault per 4 KiB on first touch (measured here: a 65,536-row group_advantages call went from
// 1.17 to 1.07 ms, 1 thread). Kept while its capacity is at most kKeepBytes, released after a
// bigger call.
struct Scratch {
  std::vector<int64_t> slot, keys, vals, offsets, order, next, ties, first;
  std::vector<double> acc, X, W, Y, mx, wsum, wx, below, gmax, inv, mean, second;
  std::vector<int32_t> number, kept;
  std::vector<uint8_t> seen;
  std::vector<SegmentMoments> mom;
  std::vector<SegmentResult> res;
  size_t bytes() const;
};
constexpr size_t kKeepBytes = size_t(64) << 20;

size_t Scratch::bytes() const {
  size_t b = seen.capacity() + 4 * (number.capacity() + kept.capacity()) + 8 * (slot.capacity() + keys.capacity() + vals.capacity() + offsets.capacity() +
                  order.capacity() + next.capacity() + ties.capacity() + first.capacity() +
                  X.capacity() + W.capacity() + Y.capacity() + acc.capacity() + mean.capacity() +
                  mx.capacity() + wsum.capacity() + wx.capacity() + below.capacity() + gmax.capacity() +
                  inv.capacity() + second.capacity());
  return b + sizeof(SegmentMoments) * mom.capacity() +
         sizeof(SegmentResult) * res.capacity();
}

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
FUSEDRL_HD void group_rows(const SegmentArgs& a, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) segment_group<T, typename Acc<T>::type>(a, g);
}

using GroupsFn = void (*)(const SegmentArgs&, int64_t, int64_t);

FUSEDRL_ISA_VARIANTS(groups_f32, SegmentArgs, group_rows, float)
FUSEDRL_ISA_VARIANTS(groups_bf16, SegmentArgs, group_rows, bf16_t)
FUSEDRL_ISA_VARIANTS(groups_f16, SegmentArgs, group_rows, f16_t)
FUSEDRL_ISA_VARIANTS(groups_f64, SegmentArgs, group_rows, double)

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
// Group advantages in one call (group_advantages_impl below): the layout's statistics, every
// row's advantage, the combine and the batch finish, deterministic whatever the thread count.

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
// squared deviations) run side by side instead of one after another: 14-27% faster on runs of 16.
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
// insert. With the block's statistics finished together (run_block) and a multiply for the
// division of every row: 116 -> 103 us for the kernel on groups of 16, K = 1 (65,536 rows, 1
// thread, min of 5 alternated runs of 800 calls).
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

// ---- the keyed layout ----

// id - lo as an index, for id in [lo, lo + range]: int64 ids in 64-bit arithmetic; 32-bit ids
// (int32 ids, or the low 32 bits of int64 ids when range < 2^32) modulo 2^32, exact for any
// range < 2^32.
FUSEDRL_HD uint64_t id_offset(int64_t id, uint64_t lo) { return uint64_t(id) - lo; }
FUSEDRL_HD uint64_t id_offset(int32_t id, uint64_t lo) { return uint32_t(id) - uint32_t(lo); }

// The dense key (group) of row r of raw ids: number[id_r - lo] (int32), looked up by pass 1 as it
// reads the row (rows_with_keys). Id: the type the ids are read as (int32 or int64).
template <typename Id>
struct Keys {
  const Id* ids;
  int64_t stride;
  uint64_t lo;
  const int32_t* number;
  int64_t operator()(int64_t r) const { return number[id_offset(ids[r * stride], lo)]; }
};

// Where the dense keys come from (make_keys): raw ids (int32 or int64), or the low 32 bits of
// int64 ids, with their numbering; or the hash path's int64 keys with number = identity.
struct KeySource {
  const void* ids;
  bool int32;
  int64_t stride;
  uint64_t lo;
  const int32_t* number;
  template <typename Id>
  Keys<Id> get() const {
    return Keys<Id>{static_cast<const Id*>(ids), stride, lo, number};
  }
};

// The min and max of rows [r0, r1) of ids (to *lo and *hi); for contiguous ids a loop the compiler
// vectorizes (in the ISA variants: AVX2 compares int64, the baseline ISA cannot). With low set
// (int64 ids), also their low 32 bits to low [M].
template <typename I>
struct MinMaxJob {
  const I* ids;
  int64_t stride;
  int64_t *lo, *hi;
  int32_t* low;
};

template <typename I>
FUSEDRL_HD void minmax_body(const MinMaxJob<I>& j, int64_t r0, int64_t r1) {
  const I* ids = j.ids;
  const int64_t stride = j.stride;
  int64_t lo = int64_t(ids[r0 * stride]), hi = lo;
  int32_t* low = j.low;
  if (stride == 1) {
    I l = ids[r0], h = l;
    for (int64_t r = r0; r < r1; ++r) {  // (gcc unswitches on low: both loops vectorized)
      l = ids[r] < l ? ids[r] : l;
      h = ids[r] > h ? ids[r] : h;
      if (low) low[r] = int32_t(uint32_t(ids[r]));
    }
    lo = int64_t(l);
    hi = int64_t(h);
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t v = int64_t(ids[r * stride]);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      if (low) low[r] = int32_t(uint32_t(v));
    }
  }
  *j.lo = lo;
  *j.hi = hi;
}

using MinMax32Fn = void (*)(const MinMaxJob<int32_t>&, int64_t, int64_t);
using MinMax64Fn = void (*)(const MinMaxJob<int64_t>&, int64_t, int64_t);
FUSEDRL_ISA_VARIANTS(minmax_i32, MinMaxJob<int32_t>, minmax_body, int32_t)
FUSEDRL_ISA_VARIANTS(minmax_i64, MinMaxJob<int64_t>, minmax_body, int64_t)

MinMax32Fn minmax_fn(const int32_t*) {
  static const MinMax32Fn fn = minmax_i32();
  return fn;
}
MinMax64Fn minmax_fn(const int64_t*) {
  static const MinMax64Fn fn = minmax_i64();
  return fn;
}

// marks[id - base] = 1 for the ids of rows [r0, r1). A function of its own with restrict
// pointers: in a lambda capturing by reference, the byte store may alias the captures, which the
// profile showed reloaded from the stack on every row.
template <typename I>
void mark_ids(const I* __restrict ids, int64_t stride, uint64_t base, uint8_t* __restrict marks, int64_t r0,
              int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) marks[id_offset(ids[r * stride], base)] = 1;
}

// The dense keys of raw ids and their number G. When the ids span less than 4 M + 1024 values,
// the ids present are marked with plain byte stores (nt threads, each over its slice of rows into
// its own byte map: no read-modify-write chain, unlike a bitmap's OR) and numbered in increasing
// order, 8 at a time (the exclusive prefix count of 8 bytes of 0/1 is one multiplication); pass 1
// then looks each row's key up in number [range] (int32) as it reads the row, instead of a
// separate pass storing them. int64 ids: the min/max pass also stores their low 32 bits in
// sc.kept [M] (which pass 1 then overwrites with the keys), and the marking and pass 1 read those
// (offsets modulo 2^32, exact as range < 2^32): the 8-byte ids are read once, not three times
// (at 65,536 rows their 512 KB do not stay in a 512 KB L2 between passes). Else a hash table
// (open addressing, one thread) numbers them by first appearance into sc.slot [M] and number is
// the identity.
template <typename I>
KeySource make_keys(const I* ids, int64_t stride, int64_t M, Scratch& sc, int nt, int64_t& G) {
  G = 0;
  KeySource out{ids, std::is_same<I, int32_t>::value, stride, 0, nullptr};
  if (M == 0) return out;
  const int64_t parts = std::min<int64_t>(nt, 8);
  int64_t los[8], his[8];
  auto in_parts = [&](const auto& body) {
    if (parts <= 1) {
      body(int64_t(0));
      return;
    }
#pragma omp parallel num_threads(static_cast<int>(parts))
    body(int64_t(omp_get_thread_num()));
  };
  const auto minmax = minmax_fn(ids);
  sc.kept.resize(size_t(M));
  int32_t* low = std::is_same<I, int64_t>::value ? sc.kept.data() : nullptr;
  in_parts([&](int64_t t) {
    minmax(MinMaxJob<I>{ids, stride, los + t, his + t, low}, M * t / parts, M * (t + 1) / parts);
  });
  const int64_t lo = *std::min_element(los, los + parts), hi = *std::max_element(his, his + parts);
  const uint64_t range = uint64_t(hi) - uint64_t(lo);  // no overflow for any int64 pair
  if (range < uint64_t(4 * M + 1024) && range < (uint64_t(1) << 32)) {
    if (low) out = KeySource{low, true, 1, 0, nullptr};
    const int64_t span = int64_t(range) + 1, padded = (span + 7) & ~int64_t(7);
    std::vector<uint8_t>& seen = sc.seen;
    seen.resize(size_t(parts * padded));
    in_parts([&](int64_t t) {
      uint8_t* own = seen.data() + t * padded;
      std::memset(own, 0, size_t(padded));
      if (low) {
        mark_ids(low, 1, uint64_t(lo), own, M * t / parts, M * (t + 1) / parts);
      } else {
        mark_ids(ids, stride, uint64_t(lo), own, M * t / parts, M * (t + 1) / parts);
      }
    });
    std::vector<int32_t>& number = sc.number;
    number.resize(size_t(padded));
    int32_t* num = number.data();
    uint64_t n = 0;
    for (int64_t i = 0; i < padded; i += 8) {
      uint64_t any = 0;
      for (int64_t t = 0; t < parts; ++t) {
        uint64_t w;
        std::memcpy(&w, seen.data() + t * padded + i, 8);
        any |= w;
      }
      // bytes of 0/1: byte j of any * 0x0101.. is the count of bytes 0..j (little-endian byte
      // order), at most 8, so no carries; minus any: the count before byte j
      const uint64_t incl = any * 0x0101010101010101ull, excl = incl - any;
      for (int j = 0; j < 8; ++j) num[i + j] = int32_t(n + ((excl >> (8 * j)) & 0xff));
      n += incl >> 56;
    }
    G = int64_t(n);
    out.lo = uint64_t(lo);
    out.number = num;
    return out;
  }
  int bits = 4;  // open addressing, linear probing, at most half full
  while ((int64_t(1) << bits) < 2 * M) ++bits;
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  std::vector<int64_t>&keys = sc.keys, &vals = sc.vals, &slot = sc.slot;
  keys.resize(mask + 1);
  vals.assign(mask + 1, -1);
  slot.resize(M);
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
  std::vector<int32_t>& number = sc.number;
  number.resize(size_t(G));
  for (int64_t g = 0; g < G; ++g) number[g] = int32_t(g);
  return KeySource{slot.data(), false, 1, 0, number.data()};
}

// ---- group advantages ----
// Two layouts. Runs (group_size): each group's rows are contiguous, one thread reduces a group
// with moments_run (the header's summation order). Keyed (raw ids): every row gets a dense key
// (its group), then one pass over the rows in row order adds each row into its group's sums
// (keyed_sums: shifted by a group value, so one pass gives the mean and the variance) and a
// second pass writes every row's advantage: the rows are read in order and only the per-group
// arrays are accessed at random, which beats sorting the rows into groups (the random reads and
// writes of [M] arrays a sort needs cost ~4 ns a row on this machine; the first version, a
// counting sort, took 0.9 ms at 65,536 rows, 2 threads; this one about 0.3 ms). The pass runs
// over S slices of rows, S fixed by M (one per 32,768 rows, at most 8; not by the thread count:
// fewer, larger slices measured faster than one per 16,384 rows), each slice into its own sums,
// combined in slice order: each group's sums are in a fixed order whatever the number of threads.

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
    // stays in L1 across the columns (a whole column pass per column: 7% slower for the call at
    // K = 4, groups of 16, 1 thread)
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
// read-modify-writes (the call measured 12% faster, 1 thread, than with the key looked up row by
// row in every pass; a software prefetch of the group entry 8 rows ahead measured 6% slower).
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
  //    is read in place (a separate pass: gathering run by run inside the groups loop measured
  //    slower); the keyed passes read OPO's weights from W, runs read them in place
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
  //    pairwise update of the mean and the squared deviations), then the rows. Before, one thread
  //    took the moments between two regions while the other slept: 560 -> 513 us for the kernel
  //    at 65,536 shuffled ids, normalize_then_sum K = 4, 2 threads.
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
