// Masked scans along T on the CPU: GAE (with the truncated-response bootstrap and optional
// whitening), discounted returns and prefix sums, with the per-step math of fusedrl/scan.h.
//
// Each row's scan is a sequential recurrence, so rows are the parallel dimension: OpenMP threads
// take blocks of kRows consecutive rows (block boundaries at fixed multiples of kRows, the same for
// any thread count), and each block walks T once with its kRows independent carries interleaved,
// which hides the latency of the carry chain (kRows: see its comment). Masked tokens are never used (their values only
// reach selects), so NaN padding is harmless. No ISA variants: the work is latency-bound, not
// vector-bound, and one baseline build keeps every row's arithmetic identical (no FMA contraction
// in one variant and not another), hence bitwise-identical results under any thread count.
//
// Whitening: while a row is scanned, its valid advantages are summed in double shifted by the
// row's first scanned one (count, sum d, sum d^2), and its valid range [lo, hi] is noted. One
// thread then merges the rows' moments in row order (moments_merge), and the valid range of each row is rescaled in place:
// the whitening adds one read and one write of the valid advantages and a read of the mask there.
#include "fusedrl/scan_args.h"

#include <algorithm>
#include <cmath>
#include <omp.h>

#include "fusedrl/scan.h"

namespace fusedrl {
namespace cpu {
namespace {

// Rows scanned together. Two chains hide the latency of the carry. More rows do not pay: the rows
// walk T in lockstep, so at a power-of-two row stride every stream of every row (rewards, values,
// mask, advantages, returns) falls in the same L1 set, and 4 rows' 20 streams thrash an 8-way L1;
// two rows' 10 streams do not (measurements: benchmarks/NOTES.md).
constexpr int kRows = 2;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

FUSEDRL_HD float load(const float* p, int64_t i) { return p[i]; }
FUSEDRL_HD double load(const double* p, int64_t i) { return p[i]; }
FUSEDRL_HD float load(const bf16_t* p, int64_t i) { return to_float(p[i]); }
FUSEDRL_HD float load(const f16_t* p, int64_t i) { return to_float(p[i]); }

template <typename M> FUSEDRL_HD bool is_valid(const M* p, int64_t i) { return p[i] != M(0); }

// The reverse scan of rows [b0, b0 + R): GAE when HAS_V, discounted returns otherwise.
// Whitening side outputs of a row, gathered during its scan (W): the count n, the sums of
// d = A - k and d^2 in double with the shift k = the row's first scanned valid advantage, the
// range [lo, hi] of its valid tokens. (A bit copy of wide masks for the rescale pass was tried:
// building it in the loop cost more than re-reading an int64 mask over the valid range.)
struct RowWhiten {
  double n, k, s1, s2;
  int64_t lo, hi;
};

template <typename T, typename M, bool HAS_V, bool W, int R>
void reverse_block(const ScanArgs& a, int64_t b0, RowWhiten* rw) {
  using acc_t = typename Acc<T>::type;
  const acc_t gamma = acc_t(a.gamma);
  const acc_t decay = acc_t(a.gamma * a.lam);
  const acc_t* boot = static_cast<const acc_t*>(a.bootstrap);
  const T* x[R];
  const T* v[R];
  const M* m[R];
  acc_t* out[R];
  acc_t* ret[R];
  acc_t c[R], vn[R];
  double n[R], k[R], s1[R], s2[R];
  int64_t lo[R], hi[R];
  for (int j = 0; j < R; ++j) {
    n[j] = k[j] = s1[j] = s2[j] = 0.0;
    lo[j] = a.T;
    hi[j] = -1;
    const int64_t b = b0 + j;
    x[j] = static_cast<const T*>(a.x) + b * a.x_stride;
    v[j] = HAS_V ? static_cast<const T*>(a.values) + b * a.values_stride : nullptr;
    m[j] = static_cast<const M*>(a.mask) + b * a.mask_stride;
    out[j] = static_cast<acc_t*>(a.out) + b * a.T;
    ret[j] = HAS_V ? static_cast<acc_t*>(a.returns) + b * a.T : nullptr;
    c[j] = acc_t(0);
    vn[j] = (HAS_V && boot) ? boot[b] : acc_t(0);
  }
  for (int64_t t = a.T - 1; t >= 0; --t) {
    for (int j = 0; j < R; ++j) {
      const bool ok = is_valid(m[j], t);
      const acc_t r = load(x[j], t);
      if (HAS_V) {
        const acc_t val = load(v[j], t);
        const acc_t s = scan_step(gae_delta(r, val, vn[j], gamma), c[j], decay);
        out[j][t] = ok ? s : acc_t(0);
        ret[j][t] = ok ? s + val : acc_t(0);
        c[j] = ok ? s : c[j];
        vn[j] = ok ? val : vn[j];
        if (W) {
          const double sd = double(s);
          k[j] = (ok && n[j] == 0.0) ? sd : k[j];
          const double d = ok ? sd - k[j] : 0.0;
          s1[j] += d;
          s2[j] += d * d;
          n[j] += ok ? 1.0 : 0.0;
          hi[j] = (ok && hi[j] < 0) ? t : hi[j];
          lo[j] = ok ? t : lo[j];
        }
      } else {
        const acc_t s = scan_step(r, c[j], decay);
        out[j][t] = ok ? s : acc_t(0);
        c[j] = ok ? s : c[j];
      }
    }
  }
  if (W) {
    for (int j = 0; j < R; ++j) {
      rw[j].n = n[j];
      rw[j].k = k[j];
      rw[j].s1 = s1[j];
      rw[j].s2 = s2[j];
      rw[j].lo = lo[j];
      rw[j].hi = hi[j];
    }
  }
}

// Rescales the valid advantages of row b in [lo, hi] (outside it every token is masked: 0 stays).
template <typename T, typename M>
void whiten_row(const ScanArgs& a, int64_t b, const M* m, int64_t lo, int64_t hi, double mean, double scale) {
  using acc_t = typename Acc<T>::type;
  acc_t* o = static_cast<acc_t*>(a.out) + b * a.T;
  for (int64_t t = lo; t <= hi; ++t) {
    const acc_t w = acc_t(whiten_value(double(o[t]), mean, scale));
    o[t] = is_valid(m, t) ? w : o[t];  // masked tokens stay 0
  }
}

// The prefix sum of rows [b0, b0 + R).
template <typename T, typename M, int R> void prefix_block(const ScanArgs& a, int64_t b0) {
  using acc_t = typename Acc<T>::type;
  const T* x[R];
  const M* m[R];
  acc_t* out[R];
  acc_t s[R];
  for (int j = 0; j < R; ++j) {
    const int64_t b = b0 + j;
    x[j] = static_cast<const T*>(a.x) + b * a.x_stride;
    m[j] = static_cast<const M*>(a.mask) + b * a.mask_stride;
    out[j] = static_cast<acc_t*>(a.out) + b * a.T;
    s[j] = acc_t(0);
  }
  for (int64_t t = 0; t < a.T; ++t) {
    for (int j = 0; j < R; ++j) {
      const bool ok = is_valid(m[j], t);
      const acc_t n = s[j] + load(x[j], t);
      out[j][t] = ok ? n : acc_t(0);
      s[j] = ok ? n : s[j];
    }
  }
}

// Threads for B rows of T tokens in `blocks` row blocks: at most one per block, and one per
// kMinTokensPerThread tokens (waking a thread costs more than a small scan; on a loaded machine a
// barrier can wait a whole time slice). The results do not depend on the count.
constexpr int64_t kMinTokensPerThread = int64_t(1) << 16;

int threads_for(const ScanArgs& a, int64_t blocks) {
  const int64_t by_work = (a.B * a.T + kMinTokensPerThread - 1) / kMinTokensPerThread;
  return static_cast<int>(std::max<int64_t>(1, std::min({a.num_threads, blocks, by_work})));
}

template <typename T, typename M, bool HAS_V, bool W> void run_reverse(const ScanArgs& a) {
  const int64_t B = a.B;
  const int64_t blocks = (B + kRows - 1) / kRows;
  RowWhiten* rws = static_cast<RowWhiten*>(a.workspace);  // workspace: RowWhiten [B]
  double mean = 0.0, scale = 1.0;
#pragma omp parallel num_threads(threads_for(a, blocks))
  {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t b0 = k * kRows;
      if (b0 + kRows <= B) {
        reverse_block<T, M, HAS_V, W, kRows>(a, b0, W ? rws + b0 : nullptr);
      } else {
        for (int64_t b = b0; b < B; ++b) reverse_block<T, M, HAS_V, W, 1>(a, b, W ? rws + b : nullptr);
      }
    }
    if (W) {
      // implicit barrier after the omp for; one thread merges the rows in index order
#pragma omp single
      {
        MomentState tot = moments_empty();
        for (int64_t b = 0; b < B; ++b) tot = moments_merge(tot, moments_from_shifted_sums(rws[b].n, rws[b].k, rws[b].s1, rws[b].s2));
        whiten_coeffs(tot, &mean, &scale);
      }
      // implicit barrier after single: mean and scale are visible to every thread
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        whiten_row<T, M>(a, b, static_cast<const M*>(a.mask) + b * a.mask_stride, rws[b].lo, rws[b].hi, mean,
                         scale);
      }
    }
  }
}

template <typename T, typename M> void run_prefix(const ScanArgs& a) {
  const int64_t B = a.B;
  const int64_t blocks = (B + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(threads_for(a, blocks))
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t b0 = k * kRows;
    if (b0 + kRows <= B) {
      prefix_block<T, M, kRows>(a, b0);
    } else {
      for (int64_t b = b0; b < B; ++b) prefix_block<T, M, 1>(a, b);
    }
  }
}

// Calls F<T, M>::run(a) for the dtype and mask codes; false for an unknown code.
template <template <typename, typename> class F> bool by_types(const ScanArgs& a) {
  auto with_mask = [&](auto tag) -> bool {
    using T = decltype(tag);
    switch (a.mask_code) {
      case kMaskByte: F<T, uint8_t>::run(a); return true;
      case kMaskInt32: F<T, int32_t>::run(a); return true;
      case kMaskInt64: F<T, int64_t>::run(a); return true;
      case kMaskFloat32: F<T, float>::run(a); return true;
      case kMaskFloat64: F<T, double>::run(a); return true;
      default: return false;
    }
  };
  switch (a.dtype) {
    case kFloat32: return with_mask(float());
    case kBFloat16: return with_mask(bf16_t());
    case kFloat16: return with_mask(f16_t());
    case kFloat64: return with_mask(double());
    default: return false;
  }
}

template <typename T, typename M> struct ReverseOp {
  static void run(const ScanArgs& a) {
    if (a.values && a.whiten) run_reverse<T, M, true, true>(a);
    else if (a.values) run_reverse<T, M, true, false>(a);
    else run_reverse<T, M, false, false>(a);
  }
};
template <typename T, typename M> struct PrefixOp {
  static void run(const ScanArgs& a) { run_prefix<T, M>(a); }
};

}  // namespace

bool reverse_scan(const ScanArgs& a) {
  if (a.B <= 0 || a.T <= 0) return a.dtype >= 0 && a.dtype <= 3;
  return by_types<ReverseOp>(a);
}

bool prefix_sum(const ScanArgs& a) {
  if (a.B <= 0 || a.T <= 0) return a.dtype >= 0 && a.dtype <= 3;
  return by_types<PrefixOp>(a);
}

}  // namespace cpu
}  // namespace fusedrl
